#!/usr/bin/env python3
"""How long each `fdatasync` took, by how long the disk was idle before it.

    python3 diagnostics/fsync_idle.py TRACE_TXT

TRACE_TXT is the `trace.txt` that `diagnostics/update_trace.sh --wakes`
keeps (it prints the directory at the end). Every `fdatasync` is paired
with the `pwrite64` just before it on the same thread (its size names the
writer: the floor's probe writes 400 bytes, Alice's log records about
370, Bob's about 610), and sorted by the time since the last `fdatasync`
of any process ended. Prints, per writer, size and idle group, the count
and the p50 in µs (groups of 30 syncs or more). BENCHMARKS.md's table
"What the sequential floor asks of this guest's disk" comes from it.
"""

import collections
import re
import statistics
import sys

LINE = re.compile(r"\s*(\S+)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):(.*)")
GROUPS = [(20, "under 20 µs"), (100, "20-100 µs"), (200, "100-200 µs"), (400, "200-400 µs")]


def group(gap_us):
    for bound, name in GROUPS:
        if gap_us < bound:
            return name
    return "400 µs or more"


def main():
    last_exit = None
    entered = {}
    size = {}
    took = collections.defaultdict(list)
    with open(sys.argv[1]) as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            comm, _pid, tid, _cpu, t, event, rest = m.groups()
            t = float(t)
            if event.endswith("sys_enter_pwrite64"):
                count = re.search(r"count: (0x[0-9a-f]+)", rest)
                if count:
                    size[tid] = int(count.group(1), 16)
            elif event.endswith("sys_enter_fdatasync"):
                gap = None if last_exit is None else (t - last_exit) * 1e6
                entered[tid] = (t, comm, size.get(tid), gap)
            elif event.endswith("sys_exit_fdatasync") and tid in entered:
                t0, c, n, gap = entered.pop(tid)
                last_exit = t
                if gap is not None and n is not None:
                    took[(c, n, group(gap))].append((t - t0) * 1e6)
    print(f"{'writer':18s} {'bytes':>6s}  {'idle before':16s} {'syncs':>6s} {'p50 µs':>7s}")
    for (c, n, g), v in sorted(took.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        if len(v) >= 30:
            print(f"{c:18s} {n:6d}  {g:16s} {len(v):6d} {statistics.median(v):7.0f}")


if __name__ == "__main__":
    main()
