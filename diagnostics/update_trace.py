#!/usr/bin/env python3
"""Splits slow sequential durable updates by where their time went, from
`perf script -F comm,tid,cpu,time,event,trace` of update_trace.sh."""
import bisect
import collections
import re
import sys

import markers

LINE = re.compile(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)")
events, switches, timeline = [], [], []
for line in open(sys.argv[1]):
    m = LINE.match(line)
    if not m:
        continue
    comm, tid, cpu, t, event, rest = m.groups()
    tid, cpu, t, event = int(tid), int(cpu), float(t), event.split(":")[1]
    if event == "sys_enter_statx":
        events.append((t, tid, markers.is_start(rest)))
        timeline.append((t, f"cpu{cpu} {comm} marker"))
    elif event in ("sys_enter_fdatasync", "sys_exit_fdatasync"):
        events.append((t, tid, event))
        timeline.append((t, f"cpu{cpu} {comm} {event}"))
    elif event == "sched_switch":
        n = re.search(r"prev_comm=(.+?) prev_pid=\d+ prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.+?) next_pid=(\d+)", rest)
        switches.append((t, cpu, n.group(3)))
        timeline.append((t, f"cpu{cpu} {n.group(1)}({n.group(2)}) -> {n.group(3)}"))

updates = markers.updates(e for e in events if isinstance(e[2], bool))
syncs, open_ = [], {}
for t, tid, e in events:
    if e == "sys_enter_fdatasync":
        open_[tid] = t
    elif e == "sys_exit_fdatasync" and tid in open_:
        syncs.append((open_.pop(tid), t))
syncs.sort()
starts = [s for s, _ in syncs]
lat = sorted((b - a) * 1e6 for a, b in updates)
if not lat:
    sys.exit("no marked updates in the trace (was PERUN_BENCH_MARKS set?)")
p50 = lat[len(lat) // 2]
print(f"{len(updates)} updates, p50 {p50:.0f} us, p99 {lat[int(len(lat) * 0.99)]:.0f} us")

runs = collections.defaultdict(list)  # what each CPU ran, as segments
last = {}
for t, cpu, comm in switches:
    if cpu in last:
        runs[cpu].append((last[cpu][0], t, last[cpu][1]))
    last[cpu] = (t, comm)


def ran(a, b):
    c = collections.Counter()
    for segs in runs.values():
        for s0, s1, comm in segs:
            if s1 >= a and s0 <= b:
                c[re.sub(r"\d+$", "", comm)] += (min(s1, b) - max(s0, a)) * 1e6
    return c


def in_sync(a, b):
    j = bisect.bisect_left(starts, a - 0.01)
    return sum(max(0.0, min(s1, b) - max(s0, a)) for s0, s1 in syncs[j:j + 50]) * 1e6


slow = [(a, b) for a, b in updates if (b - a) * 1e6 > 2 * p50]
disk = [u for u in slow if in_sync(*u) >= 0.4 * (u[1] - u[0]) * 1e6]
other = [u for u in slow if u not in disk]
print(f"{len(slow)} slower than 2 x p50: {len(disk)} mostly in fdatasync, {len(other)} not")
total = collections.Counter()
for a, b in other:
    total.update(ran(a, b))
n = max(1, len(other))
print("per 'not' update, us each CPU ran:", {k: int(v / n) for k, v in total.most_common(6)})
fast = [u for u in updates if (u[1] - u[0]) * 1e6 <= p50][:300]
total = collections.Counter()
for a, b in fast:
    total.update(ran(a, b))
print("per fast update, us each CPU ran:", {k: int(v / max(1, len(fast))) for k, v in total.most_common(6)})
for label, u in (("slow, not in fdatasync", other[:1]), ("fast", fast[50:51])):
    for a, b in u:
        print(f"--- {label}: {(b - a) * 1e6:.0f} us")
        for t, what in timeline:
            if a - 1e-4 <= t <= b + 1e-4:
                print(f"  {(t - a) * 1e6:+7.0f} us  {what}")
