#!/usr/bin/env python3
"""Who wakes a thread during the sequential updates: every `futex` wake
inside a measured `pay`, per update, by the first frames of its stack
outside the runtime's and the standard library's own.

A tokio task woken from a worker usually needs no system call (it goes in
the worker's next slot); a `futex` wake means another thread had to be
woken, which on this guest costs an IPI to a halted vCPU and often a
preemption. BENCHMARKS.md ("Who wakes whom during a sequential update")
reads its counts.

    CARGO_TARGET_DIR=target/prof CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \\
        RUSTFLAGS="-C force-frame-pointers=yes" cargo build --release --example bench
    PERUN_BENCH_MARKS=1 target/prof/release/examples/bench --only durable &
    perf record -a -g -e syscalls:sys_enter_futex,syscalls:sys_enter_statx \\
        -o /tmp/fx.data -- sleep 6
    perf script -i /tmp/fx.data -F comm,pid,tid,time,event,trace,ip,sym > /tmp/fx.txt
    python3 diagnostics/wake_callers.py /tmp/fx.txt [DEPTH] [--raw] [--wait] [--all]

`--raw` prints whole stacks instead (the runtime's frames too): the wakes
tokio's scheduler makes itself (a worker that found work wakes another)
show there as `worker::Context::run`. `--wait` counts the `futex` waits
instead of the wakes (a contended lock shows there, e.g. a
`PendingGuard::drop`). `--all` counts the whole recording, not only the
measured updates, and prints totals (the 100-channel run has no markers).

Every process on the machine counts while a measured update runs (the
bench's two, and anything else). Only `futex` calls count: a worker
parked on tokio's I/O driver is woken by an eventfd `write` instead.
"""

import collections
import re
import sys

import cpu_split
import markers

OP = re.compile(r"op: (0x[0-9a-f]+)")
FUTEX_WAIT, FUTEX_WAKE, FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET = 0, 1, 9, 10
# Frames that say nothing about who asked for the wake.
PLUMBING = (
    "syscall", "futex", "std::", "parking_lot", "tokio::", "core::", "alloc::",
    "[unknown]", "__GI", "pthread", "mio::", "futures_", "event_listener",
    "<core::", "<alloc::", "<std::", "<tokio::", "<futures", "<tracing::",
)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    raw = "--raw" in sys.argv
    ops = (FUTEX_WAIT, FUTEX_WAIT_BITSET) if "--wait" in sys.argv else (FUTEX_WAKE, FUTEX_WAKE_BITSET)
    depth = int(args[1]) if len(args) > 1 else 3
    recs = list(cpu_split.samples(args[0]))
    marks = [(t, tid, markers.is_start(trace))
             for _, _, tid, t, event, trace, _ in recs if event.endswith("sys_enter_statx")]
    spans = markers.updates(marks)
    whole = "--all" in sys.argv
    inside = (lambda _: True) if whole else markers.within(spans)

    counts, wakes = collections.Counter(), 0
    for comm, _, _, t, event, trace, stack in recs:
        if not event.endswith("sys_enter_futex") or not inside(t):
            continue
        if int(OP.search(trace).group(1), 16) & 0x7F not in ops:
            continue
        wakes += 1
        if raw:
            frames = [f for f in stack if not f.startswith(("syscall", "[unknown]"))][:12]
        else:
            frames = [f for f in stack if not f.startswith(PLUMBING)][:depth]
        counts[(comm[:15],) + tuple(f[:100] for f in frames)] += 1
    kind = "waits" if "--wait" in sys.argv else "wakes"
    if whole:
        n = 1
        print(f"{wakes} futex {kind} in the recording")
    else:
        n = max(len(spans), 1)
        print(f"{len(spans)} updates, {wakes / n:.2f} futex {kind} per update")
    for key, c in counts.most_common(25):
        sep = "\n        " if raw else " | "
        print(f"{c / n:6.2f}  " + sep.join(key))


if __name__ == "__main__":
    main()
