#!/usr/bin/env python3
"""Where the idle CPU time goes, from a trace of context switches.

    perf record -a -e sched:sched_switch -e sched:sched_wakeup -o s.data -- sleep 1
    perf script -i s.data -F cpu,time,event,trace > s.txt
    python3 diagnostics/idle_gaps.py s.txt

(record it during the 100-channel run: a second after the bench prints
"opened 90 more channels"). Each CPU is idle from a switch to `swapper`
until its next switch. Prints how long all CPUs were idle at
once, and the idle periods of one CPU while another ran: their count,
their share of all CPUs' time and their median length. BENCHMARKS.md's
"Where the idle CPU goes" comes from it.
"""

import bisect
import re
import statistics
import sys

LINE = re.compile(r"\s*\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:.*prev_comm=(\S+).*next_comm=(\S+)")


def main():
    periods = []  # (cpu, start, end)
    idle_since = {}
    first = last = None
    with open(sys.argv[1]) as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            cpu, t, prev, nxt = int(m.group(1)), float(m.group(2)), m.group(3), m.group(4)
            first = t if first is None else first
            last = t
            # The next switch on a CPU that went idle ends its idle period
            # (whatever its `prev_comm` says: perf may show the idle task
            # under the last task's name).
            if cpu in idle_since:
                periods.append((cpu, idle_since.pop(cpu), t))
            if nxt.startswith("swapper"):
                idle_since[cpu] = t
    if not periods:
        sys.exit("no idle periods in the trace")
    cpus = sorted({p[0] for p in periods})
    span = last - first
    # How many CPUs are idle between period boundaries (a sweep).
    events = sorted([(s, 1) for _, s, _ in periods] + [(e, -1) for _, _, e in periods])
    times, idle_after = [], []
    idle_now, since, all_idle = 0, None, 0.0
    for t, d in events:
        if idle_now == len(cpus) and since is not None:
            all_idle += t - since
        idle_now += d
        since = t
        times.append(t)
        idle_after.append(idle_now)

    def idle_at(t):
        i = bisect.bisect_right(times, t) - 1
        return idle_after[i] if i >= 0 else 0

    # One CPU's idle periods while another ran (judged at their midpoint).
    alone = [e - s for _, s, e in periods if idle_at((s + e) / 2) < len(cpus)]
    print(f"trace: {span * 1e3:.0f} ms on {len(cpus)} CPUs")
    print(f"all CPUs idle at once: {all_idle * 1e3:.1f} ms")
    print(
        f"one CPU idle while another ran: {len(alone)} periods, "
        f"{sum(alone) / (span * len(cpus)) * 100:.1f} % of all CPUs' time, "
        f"median {statistics.median(alone) * 1e6:.0f} µs"
    )


if __name__ == "__main__":
    main()
