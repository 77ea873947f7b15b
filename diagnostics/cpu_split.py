#!/usr/bin/env python3
"""Where the CPU goes: a `perf script` of a sampled profile, split by kind.

Each sample is put under the first thing its stack shows: the crypto
(libsecp256k1, Keccak), the system call it is in (by its `__x64_sys_*`
frame), interrupts and scheduling, idle, the allocator, memory copies, or
the crate of the leaf frame (redb, libp2p, noise, tokio, the perun crates).

Every sampling event counts (`cpu-clock`, `cycles`); tracepoints do not.

Whole profile (e.g. taken during the 100-channel run):

    perf record -a -g -F 2999 -o /tmp/perf.data -- sleep 3
    perf script -i /tmp/perf.data -F comm,pid,tid,time,event,trace,ip,sym > /tmp/perf.txt
    python3 diagnostics/cpu_split.py /tmp/perf.txt

The same profile by what the stack was doing (`--by-task`: crypto, the
proposer's `propose`, the responder's handlers, the stores' writer
threads, the wire, libp2p, tokio, idle; BENCHMARKS.md's split of the
100-channel run by task):

    python3 diagnostics/cpu_split.py /tmp/perf.txt --by-task

Per sequential update and per process: run the benchmark with
`PERUN_BENCH_MARKS=1` and record its markers as well, every one of them
(the sampling frequency goes on the sampling event only: a global `-F`
would sample the tracepoint too and lose markers). Only samples inside a
measured `pay` count, divided by the number of updates; pass the same
frequency.

    PERUN_BENCH_MARKS=1 target/release/examples/bench --only durable &
    perf record -a -g -e cpu-clock/freq=9999/ -e syscalls:sys_enter_statx \
        -o /tmp/perf.data -- sleep 8
    perf script -i /tmp/perf.data -F comm,pid,tid,time,event,trace,ip,sym > /tmp/perf.txt
    python3 diagnostics/cpu_split.py /tmp/perf.txt --per-update 9999

With `--crypto-callers` as well, the crypto is split by the first `perun_`
frame above it (whose signature check or signing it is): BENCHMARKS.md's
recovery inside an update against the floor's.
"""

import collections
import re
import sys

import markers

HEADER = re.compile(r"\s*(.+?)\s+(-?\d+)/(-?\d+)\s+([\d.]+):\s+(\S+):\s*(.*)")
SYSCALL = re.compile(r"(?:__x64_sys_|__do_sys_|__se_sys_)(\w+)")
CRATES = [
    ("redb", "redb"),
    ("yamux", "libp2p"),
    ("libp2p", "libp2p"),
    ("multistream", "libp2p"),
    ("snow", "noise"),
    ("ring_core", "noise"),
    ("perun_wire", "wire"),
    ("perun_persistence", "persistence"),
    ("perun_client", "client"),
    ("perun_channel", "channel"),
    ("perun_wallet", "wallet"),
    ("tracing", "tracing"),
    ("serde", "serde"),
    ("tokio", "tokio"),
    ("hashbrown", "hash maps"),
]


def samples(path):
    """Yields (comm, pid, tid, time, event, trace text, frames leaf first)."""
    head, frames = None, []
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                if head:
                    yield (*head, frames)
                head, frames = None, []
            elif not line.startswith("\t"):
                m = HEADER.match(line)
                if m:
                    # Recorded without stacks, no blank line ends a sample.
                    if head:
                        yield (*head, frames)
                    head = (m.group(1), int(m.group(2)), int(m.group(3)), float(m.group(4)),
                            m.group(5), m.group(6))
                    frames = []
            else:
                parts = line.strip().split(" ", 1)
                if len(parts) == 2:
                    frames.append(parts[1].rsplit(" (", 1)[0])
    if head:
        yield (*head, frames)


def kind(frames):
    leaf = frames[0] if frames else ""
    if "secp256k1" in leaf:
        return "crypto: secp256k1"
    if "keccak" in leaf or "sha3" in leaf:
        return "crypto: keccak"
    for f in frames:
        m = SYSCALL.match(f)
        if m:
            return "syscall: " + m.group(1)
    if any("do_idle" in f or "safe_halt" in f for f in frames):
        return "idle"
    if any(f.startswith(("asm_", "entry_SYSCALL", "irqentry", "sysvec", "ret_from_fork", "worker_thread"))
           for f in frames) or leaf.startswith(("_raw", "finish_task_switch")):
        if any("irq" in f or "sysvec" in f for f in frames):
            return "kernel: interrupts"
        if any("schedule" in f for f in frames):
            return "kernel: scheduling"
        return "kernel: other"
    if leaf.startswith(("malloc", "_int_", "cfree", "free", "unlink_chunk", "malloc_consolidate", "realloc")):
        return "allocator"
    if "memmove" in leaf or "memcpy" in leaf or "memset" in leaf:
        return "memory copies"
    for key, name in CRATES:
        if key in leaf:
            return name
    return "other"


# `--by-task`: what each sample's stack was doing, first match wins.
TASKS = [
    ("crypto", re.compile(r"secp256k1|keccak|Keccak")),
    ("propose (the proposer's update)", re.compile(r"perun_client::update::propose")),
    ("handle_update (the responder's)", re.compile(r"perun_client::dispatch::spawn|perun_client::update::handle_update")),
    ("commit delivery", re.compile(r"perun_client::update::handle_commit|perun_client::deliver")),
    ("dispatch task", re.compile(r"perun_client::dispatch::dispatch")),
    ("wire lanes and node", re.compile(r"perun_wire::")),
    ("libp2p (swarm, yamux, noise)", re.compile(r"libp2p|yamux|noise|multistream")),
    ("bench", re.compile(r"bench::")),
    ("tokio scheduler, timers", re.compile(r"tokio::runtime::scheduler|tokio::runtime::time")),
]


def task(comm, frames):
    if comm == "swapper":
        return "idle"
    crypto = TASKS[0][1]
    if comm.startswith("perun-redb"):
        return "crypto" if any(crypto.search(f) for f in frames) else "store writer thread"
    for name, pat in TASKS:
        if any(pat.search(f) for f in frames):
            return name
    return "other"


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    if "--by-task" in args:
        args.remove("--by-task")
        cpu = [r for r in samples(args[0]) if not r[4].startswith("syscalls:")]
        if not cpu:
            sys.exit("no sampled events in the profile")
        c = collections.Counter(task(r[0], r[6]) for r in cpu)
        for k, v in c.most_common():
            print("%6.2f %%  %s" % (100 * v / len(cpu), k))
        return
    callers = "--crypto-callers" in args
    if callers:
        args.remove("--crypto-callers")
    per_update = None
    if "--per-update" in args:
        i = args.index("--per-update")
        per_update = float(args[i + 1])
        del args[i:i + 2]
    recs = list(samples(args[0]))
    cpu = [r for r in recs if not r[4].startswith("syscalls:")]
    if not cpu:
        sys.exit("no sampled events in the profile")
    if per_update is None:
        c = collections.Counter(kind(r[6]) for r in cpu)
        for k, v in c.most_common():
            print("%6.2f %%  %s" % (100 * v / len(cpu), k))
        return
    marks = [(t, tid, markers.is_start(trace))
             for _, _, tid, t, event, trace, _ in recs
             if "statx" in event and markers.FLAGS.search(trace)]
    if not marks:
        sys.exit("no update markers: run with PERUN_BENCH_MARKS=1, record "
                 "syscalls:sys_enter_statx and keep `trace` in perf script's fields")
    spans = markers.updates(marks)
    if not spans:
        sys.exit("no complete update between the markers")
    inside = markers.within(spans)
    by = collections.defaultdict(collections.Counter)
    for comm, pid, _, t, _, _, frames in cpu:
        if inside(t):
            k = kind(frames)
            if callers and k.startswith("crypto"):
                k += " < " + next((f for f in frames if f.startswith("perun_")), "?")
            by[(pid, comm)][k] += 1
    n = len(spans)
    us = lambda count: count / per_update / n * 1e6
    print("%d updates, mean %.1f µs" % (n, sum(b - a for a, b in spans) / n * 1e6))
    for (pid, comm), c in sorted(by.items(), key=lambda x: -sum(x[1].values())):
        print("%s (%d): %.1f µs of CPU per update" % (comm, pid, us(sum(c.values()))))
        for k, v in c.most_common(12):
            print("   %7.1f µs  %s" % (us(v), k))


if __name__ == "__main__":
    main()
