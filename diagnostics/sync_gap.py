#!/usr/bin/env python3
"""How a small durable write's cost depends on what came before it.

    python3 diagnostics/sync_gap.py [DIR] [ROUNDS]

In DIR (default `target/bench/tmp`), with every variant interleaved so a
slow spell of the disk meets them all alike, p50 in µs of `pwrite` of 500
bytes + `fdatasync`, in preallocated files:

1. back to back, or each after 160 µs of busy CPU (about half the floor
   without its fsyncs: what an update does between its two syncs); and
   each in one file, or alternating between two (an update's two stores);
2. one write in each of four files in turn, each after the same pause,
   one file for each way to make the write durable: buffered +
   `fdatasync`, `O_DIRECT` (4 KiB aligned block) + `fdatasync`,
   `O_DIRECT|O_DSYNC`, and `RWF_DSYNC`.

BENCHMARKS.md ("Where the gap to the floor lies") quotes its output.
"""

import mmap
import os
import statistics
import sys
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else "target/bench/tmp"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 800
GAP_US = 160
SIZE = 4 << 20
RECORD = b"\x5a" * 500


def spin(us):
    end = time.perf_counter_ns() + us * 1000
    while time.perf_counter_ns() < end:
        pass


def prepared(name, flags=0):
    path = os.path.join(DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.pwrite(fd, b"\0" * SIZE, 0)
    os.fsync(fd)
    os.close(fd)
    return os.open(path, os.O_RDWR | flags)


class File:
    """Appends records in a preallocated file, the way `mode` says."""

    def __init__(self, name, mode="buffered"):
        flags = {"direct": os.O_DIRECT, "direct+dsync": os.O_DIRECT | os.O_DSYNC}.get(mode, 0)
        self.fd, self.mode, self.pos = prepared(name, flags), mode, 0
        self.block = mmap.mmap(-1, 4096)  # aligned, for O_DIRECT
        self.block.write(b"\x5a" * 4096)

    def write(self):
        t = time.perf_counter_ns()
        if self.mode == "buffered":
            os.pwrite(self.fd, RECORD, self.pos)
            os.fdatasync(self.fd)
        elif self.mode == "rwf_dsync":
            os.pwritev(self.fd, [RECORD], self.pos, os.RWF_DSYNC)
        else:
            os.pwritev(self.fd, [memoryview(self.block)], self.pos // 4096 * 4096)
            if self.mode == "direct":
                os.fdatasync(self.fd)
        self.pos = (self.pos + len(RECORD)) % (SIZE - 4096)
        return (time.perf_counter_ns() - t) / 1000


def main():
    os.makedirs(DIR, exist_ok=True)
    one, a, b = File("gap-one.bin"), File("gap-a.bin"), File("gap-b.bin")
    modes = {m: File(f"gap-{m}.bin", m) for m in ("buffered", "direct", "direct+dsync", "rwf_dsync")}
    took = {k: [] for k in ("one file, back to back", "alternating, back to back",
                            "one file, after the pause", "alternating, after the pause")}
    took.update({m: [] for m in modes})
    for _ in range(ROUNDS):
        for gap in (0, GAP_US):
            when = "back to back" if gap == 0 else "after the pause"
            for f in (one, one):
                spin(gap)
                took[f"one file, {when}"].append(f.write())
            for f in (a, b):
                spin(gap)
                took[f"alternating, {when}"].append(f.write())
        for m, f in modes.items():
            spin(GAP_US)
            took[m].append(f.write())
    print(f"p50 of {ROUNDS * 2} syncs each, µs (pause {GAP_US} µs of busy CPU):")
    for k, v in took.items():
        if k in modes:
            continue
        print(f"  {statistics.median(v):6.1f}  {k}")
    print(f"after the pause, by way of making the write durable ({ROUNDS} each):")
    for m in modes:
        print(f"  {statistics.median(took[m]):6.1f}  {m}")
    for name in ("one", "a", "b", *modes):
        os.remove(os.path.join(DIR, f"gap-{name}.bin"))


if __name__ == "__main__":
    main()
