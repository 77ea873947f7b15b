#!/usr/bin/env python3
"""Who calls `malloc`, by the first frames outside the allocator.

    python3 diagnostics/malloc_callers.py PERF_SCRIPT [--per N] [--without S] [--only S] [--depth D]

PERF_SCRIPT is `perf script -F comm,ip,sym` of a recording of glibc's
`malloc` as a uprobe with DWARF stacks (glibc has no frame pointers):

    perf probe -x /lib/x86_64-linux-gnu/libc.so.6 malloc
    perf record -e probe_libc:malloc --call-graph dwarf,16384 -o m.data -- \\
        target/release/deps/allocations-<hash> --nocapture
    perf script -i m.data -F comm,ip,sym > m.txt
    perf probe -d 'probe_libc:*'

Each call is put under its first D (default 2) frames that are not the
allocator, the standard library's collections and copies, or a future's
poll wrapper. `--per N` divides the counts by N (the updates the recording
covers, for calls per update; perf may drop samples under load, so read
shares, not totals), `--without S` leaves out stacks with a frame
containing S (e.g. `redb`), `--only S` keeps only those. BENCHMARKS.md's
"where the other 82 are" comes from it.
"""

import argparse
import collections

SKIP = [
    "malloc", "alloc::", "core::ptr", "RawVec", "__rust", "<alloc", "Clone>::clone",
    "realloc", "from_iter", "to_vec", "Vec<T", "core::mem", "hashbrown", "<core::",
    "std::sys", "core::iter", "<T as", "Box<T>", "core::fmt", "alloc_", "spec_",
    "String", "format", "Arc<T", "MaybeDone", "PollFn", "Pin<P>", "Instrumented",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("script")
    ap.add_argument("--per", type=float, default=1.0)
    ap.add_argument("--without")
    ap.add_argument("--only")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    counts = collections.Counter()
    total = 0
    with open(a.script) as f:
        blocks = f.read().split("\n\n")
    for b in blocks:
        lines = [l.strip() for l in b.strip().split("\n") if l.strip()]
        if len(lines) < 2:
            continue
        frames = [l.split(" ", 1)[1] if " " in l else l for l in lines[1:]]
        if a.without and any(a.without in f for f in frames):
            continue
        if a.only and not any(a.only in f for f in frames):
            continue
        total += 1
        ours = [f for f in frames[1:] if not any(s in f for s in SKIP)]
        counts[" < ".join(f[:70] for f in ours[: a.depth]) or "(none)"] += 1
    print(f"{total / a.per:.1f} calls (per {a.per:g})")
    for k, v in counts.most_common(a.top):
        print(f"{v / a.per:8.1f}  {k}")


if __name__ == "__main__":
    main()
