#!/usr/bin/env python3
"""Does it matter where a log record falls in a 4 KiB page?

Small writes + `fdatasync` into a preallocated file, each after 150 µs of
busy CPU (as an update's two syncs are spaced), four kinds interleaved in
random order: 400 bytes appended, 1,200 bytes appended anywhere, 1,200
bytes kept inside one page, 1,200 bytes always straddling two. Prints each
kind's p50 (BENCHMARKS.md, issue 17, "Record alignment in the log").

    python3 diagnostics/log_alignment.py [DIR] [ROUNDS]
"""

import os
import random
import statistics
import sys
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else "target/bench/tmp"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
REGION = 2 << 20
PAGE = 4096

os.makedirs(DIR, exist_ok=True)
path = os.path.join(DIR, "log-alignment.bin")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.pwrite(fd, b"\0" * (4 * REGION), 0)
os.fsync(fd)
kinds = {"400 B appended": 0, "1200 B anywhere": 1, "1200 B in one page": 2,
         "1200 B straddling": 3}
pos = {k: 0 for k in kinds}
took = {k: [] for k in kinds}


def one(kind):
    n = 400 if kind.startswith("400") else 1200
    p = pos[kind]
    if kind == "1200 B in one page" and p % PAGE + n > PAGE:
        p = (p // PAGE + 1) * PAGE
    if kind == "1200 B straddling":
        p = (p // PAGE) * PAGE + PAGE - 600
    if p + n > REGION - 2 * PAGE:
        p = 0 if kind != "1200 B straddling" else PAGE - 600
    t = time.perf_counter()
    os.pwrite(fd, os.urandom(n), kinds[kind] * REGION + p)
    os.fdatasync(fd)
    took[kind].append(time.perf_counter() - t)
    pos[kind] = p + (PAGE if kind == "1200 B straddling" else n)
    t = time.perf_counter()
    while time.perf_counter() - t < 150e-6:
        pass


order = list(kinds)
for _ in range(ROUNDS):
    random.shuffle(order)
    for k in order:
        one(k)
for k in kinds:
    print(f"{k:22s} p50 {1e6 * statistics.median(took[k]):6.1f} µs")
os.close(fd)
os.unlink(path)
