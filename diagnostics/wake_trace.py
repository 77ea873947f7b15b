#!/usr/bin/env python3
"""Prints the timelines of three sequential durable updates near the p50,
from `perf script -F comm,pid,tid,cpu,time,event,trace` of
`update_trace.sh --wakes`: who ran on which CPU, who woke whom, and the
store's writes and syncs. Then accounts for the time of the updates
between the 40th and the 60th percentile, step by step (`account`)."""
import bisect
import collections
import re
import sys

import markers

LINE = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)")
SWITCH = re.compile(r"prev_comm=(.+?) prev_pid=\d+ prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.+?) next_pid=(\d+)")
WAKE = re.compile(r"comm=(.+?) pid=(\d+).*target_cpu=(\d+)")

events = []
process = {}  # tid -> pid
for line in open(sys.argv[1]):
    m = LINE.match(line)
    if m:
        comm, pid, tid, cpu, t, event, rest = m.groups()
        process[int(tid)] = int(pid)
        events.append((float(t), int(tid), int(cpu), comm, event.split(":")[1], rest))

marks = [(t, tid, markers.is_start(rest)) for t, tid, _, _, e, rest in events if e == "sys_enter_statx"]
if not marks:
    sys.exit("no marked updates in the trace (was PERUN_BENCH_MARKS set?)")
marker_tid = markers.marker_tid(marks)
updates = markers.updates(marks)
lat = sorted((b - a) * 1e6 for a, b in updates)
p50 = lat[len(lat) // 2]
print(f"{len(updates)} updates, p50 {p50:.0f} us (times include the tracing's cost)")

times = [e[0] for e in events]
near = [u for u in updates if abs((u[1] - u[0]) * 1e6 - p50) < 15][:3]
for a, b in near:
    print(f"--- {(b - a) * 1e6:.0f} us")
    i, j = bisect.bisect_left(times, a - 20e-6), bisect.bisect_right(times, b + 20e-6)
    for t, tid, cpu, comm, e, rest in events[i:j]:
        if e == "sched_switch":
            n = SWITCH.search(rest)
            what = f"{n.group(1)}({n.group(2)}) -> {n.group(3)}/{n.group(4)}"
        elif e == "sched_wakeup":
            n = WAKE.search(rest)
            what = f"wakes {n.group(1)}/{n.group(2)} on cpu{int(n.group(3))}"
        else:
            what = e.replace("sys_", "")
        print(f"{(t - a) * 1e6:+7.0f} us  cpu{cpu} {comm}/{tid} {what}")

# The account: each update's time, step by step, from the first event of
# each step. Alice is the marker's process, Bob the process that receives
# her request; a store's write is the `pwrite64` just before its
# `fdatasync`, on the store's thread (`perun-redb-writ*`, woken for it: the
# hand-off) or on the caller's (no hand-off: that step is 0).
ALICE = process[marker_tid]
WRITER = "perun-redb-writ"
STEPS = [
    ("Alice: propose until the request is sent", "wire"),
    ("wire: request to Bob's recvfrom", "wire"),
    ("Bob: check the commit, stage, sign", "cpu"),
    ("Bob: hand-off to his store's thread, if any", "hand-off"),
    ("Bob: write + fdatasync", "fsync"),
    ("Bob: back from the store to the reply's sendto", "hand-off"),
    ("wire: reply to Alice's recvfrom", "wire"),
    ("Alice: deliver, check, complete", "cpu"),
    ("Alice: hand-off to her store's thread, if any", "hand-off"),
    ("Alice: write + fdatasync", "fsync"),
    ("Alice: back from the store to the caller", "hand-off"),
]


def account(a, b):
    """The step boundaries of the update in [a, b], or None if a step's
    event is missing (then the update is left out)."""
    i = bisect.bisect_left(times, a)
    j = bisect.bisect_right(times, b)
    window = events[i:j]

    def first(pred, after):
        for ev in window:
            if ev[0] >= after and pred(ev):
                return ev
        return None

    def of(ev, alice):
        return (process.get(ev[1]) == ALICE) == alice

    def sync_of(alice, after):
        """(the write's pwrite, its fdatasync's exit) of a store thread."""
        enter = first(lambda e: e[4] == "sys_enter_fdatasync" and of(e, alice), after)
        if enter is None:
            return None
        writes = [e for e in window if e[1] == enter[1] and e[4] == "sys_enter_pwrite64" and after <= e[0] <= enter[0]]
        done = first(lambda e: e[1] == enter[1] and e[4] == "sys_exit_fdatasync", enter[0])
        return (writes[-1][0] if writes else enter[0], done[0]) if done else None

    def woke_writer(alice, after, before):
        for ev in window:
            if after <= ev[0] <= before and ev[4] == "sched_wakeup":
                n = WAKE.search(ev[5])
                if n and n.group(1).startswith(WRITER) and (process.get(int(n.group(2))) == ALICE) == alice:
                    return ev[0]
        return None

    def call(syscall, alice, after):
        ev = first(lambda e: e[4] == syscall and of(e, alice), after)
        return None if ev is None else ev[0]

    def store(alice, after):
        """The store's thread woken (or, on the caller's thread, the
        write), the write, the sync's end."""
        sync = sync_of(alice, after)
        if sync is None:
            return None
        # A store thread that was not asleep needs no wake-up: no hand-off.
        return (woke_writer(alice, after, sync[0]) or sync[0], *sync)

    # Times are seconds since boot: never 0, so `and` chains on None only.
    a_send = call("sys_enter_sendto", True, a)
    b_recv = a_send and call("sys_enter_recvfrom", False, a_send)
    b_store = b_recv and store(False, b_recv)
    b_send = b_store and call("sys_enter_sendto", False, b_store[2])
    a_recv = b_send and call("sys_enter_recvfrom", True, b_send)
    a_store = a_recv and store(True, a_recv)
    if not a_store or a_store[2] > b:
        return None
    marks = [a, a_send, b_recv, *b_store, b_send, a_recv, *a_store, b]
    return [(y - x) * 1e6 for x, y in zip(marks, marks[1:])]


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


band = [u for u in updates if lat[len(lat) * 2 // 5] <= (u[1] - u[0]) * 1e6 <= lat[len(lat) * 3 // 5]]
rows = [r for r in (account(a, b) for a, b in band) if r is not None]
print(f"\n--- account of {len(rows)} updates between the 40th and the 60th percentile "
      f"({len(band) - len(rows)} left out: a step's event missing); median per step, us")
kinds = collections.defaultdict(float)
for k, (name, kind) in enumerate(STEPS):
    m = median([r[k] for r in rows])
    kinds[kind] += m
    print(f"{m:7.0f}  {kind:9} {name}")
print(f"{sum(kinds.values()):7.0f}  sum of the medians (the updates' median: {median([sum(r) for r in rows]):.0f})")
for kind, total in kinds.items():
    print(f"{total:7.0f}  {kind}")
