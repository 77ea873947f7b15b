#!/usr/bin/env python3
"""Prints the timelines of three sequential durable updates near the p50,
from `perf script -F comm,tid,cpu,time,event,trace` of
`update_trace.sh --wakes`: who
ran on which CPU, who woke whom, and the store's writes and syncs."""
import bisect
import collections
import re
import sys

LINE = re.compile(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)")
SWITCH = re.compile(r"prev_comm=(.+?) prev_pid=\d+ prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.+?) next_pid=(\d+)")
WAKE = re.compile(r"comm=(.+?) pid=(\d+).*target_cpu=(\d+)")

events = []
for line in open(sys.argv[1]):
    m = LINE.match(line)
    if m:
        comm, tid, cpu, t, event, rest = m.groups()
        events.append((float(t), int(tid), int(cpu), comm, event.split(":")[1], rest))

# Markers come from the thread that runs the measured loop (see update_trace.py).
marks = []
for t, tid, _, _, e, rest in events:
    if e == "sys_enter_statx":
        flags = int(re.search(r"flags: (0x[0-9a-f]+)", rest).group(1), 16)
        marks.append((t, tid, "start" if flags == 0 else "end"))
if not marks:
    sys.exit("no marked updates in the trace (was PERUN_BENCH_MARKS set?)")
marker_tid = collections.Counter(tid for _, tid, _ in marks).most_common(1)[0][0]
updates, start = [], None
for t, tid, kind in marks:
    if tid != marker_tid:
        continue
    if kind == "start":
        start = t
    elif start is not None:
        if t - start < 1.0:
            updates.append((start, t))
        start = None
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
