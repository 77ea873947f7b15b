#!/usr/bin/env python3
"""The disk's own sync tail: small in-place writes, each made durable,
nothing else running. See README.md."""
import collections
import mmap
import os
import sys
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else "target/bench/tmp"
SECS = float(sys.argv[2]) if len(sys.argv) > 2 else 6.0
SIZE = 16 << 20
REC = 4096  # O_DIRECT needs aligned sizes and offsets


def run(label, flags, sync):
    path = os.path.join(DIR, "disk-sync-tail.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 0)
    os.write(fd, b"\0" * SIZE)  # preallocated: a write changes data only
    os.fsync(fd)
    os.close(fd)
    fd = os.open(path, os.O_RDWR | flags)
    buf = mmap.mmap(-1, REC)  # page-aligned, as O_DIRECT needs
    buf.write(b"x" * REC)
    lat, pos, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < SECS:
        t = time.perf_counter()
        os.pwrite(fd, buf, pos)
        if sync:
            os.fdatasync(fd)
        lat.append((t - t0, (time.perf_counter() - t) * 1e6))
        pos = (pos + REC) % SIZE
        time.sleep(0.0003)  # leave the device idle a moment, as updates do
    os.close(fd)
    os.unlink(path)
    s = sorted(d for _, d in lat)
    p50, p99 = s[len(s) // 2], s[int(len(s) * 0.99)]
    print(f"{label}: {len(s)} syncs, p50 {p50:.0f} us, p99 {p99:.0f} us, p99/p50 {p99 / p50:.2f}")
    slow = collections.Counter(round(t, 1) for t, d in lat if d > 2 * p50)
    print("  100 ms windows with >= 3 slow syncs:", sorted(k for k, v in slow.items() if v >= 3))


os.makedirs(DIR, exist_ok=True)
run("write + fdatasync", 0, True)
run("O_DSYNC", os.O_DSYNC, False)
run("O_DIRECT|O_DSYNC", os.O_DIRECT | os.O_DSYNC, False)
run("O_DIRECT + fdatasync", os.O_DIRECT, True)
