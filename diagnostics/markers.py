"""The bench's update markers in a trace (`PERUN_BENCH_MARKS=1`): a
`statx` without flags before each measured `pay`, one with
`AT_SYMLINK_NOFOLLOW` after it."""

import bisect
import collections
import re

FLAGS = re.compile(r"flags: (0x[0-9a-f]+)")


def is_start(trace):
    """True for a start marker, False for an end, from a `sys_enter_statx`
    event's trace text."""
    return int(FLAGS.search(trace).group(1), 16) == 0


def updates(marks):
    """(start, end) of each measured update from (time, tid, is_start)
    markers. They come from the thread that runs the measured loop, the one
    with the most of them (other `statx` calls of the process are not
    markers); a start with no end before the next start is not an update."""
    marks = sorted(marks)
    if not marks:
        return []
    loop = marker_tid(marks)
    spans, start = [], None
    for t, tid, starts in marks:
        if tid != loop:
            continue
        if starts:
            start = t
        elif start is not None:
            if t - start < 1.0:
                spans.append((start, t))
            start = None
    return spans


def marker_tid(marks):
    """The thread that wrote the most markers."""
    return collections.Counter(tid for _, tid, _ in marks).most_common(1)[0][0]


def within(spans):
    """A test of whether a time falls inside one of `spans` (as `updates`
    returns them: in order, not overlapping)."""
    starts = [a for a, _ in spans]

    def inside(t):
        i = bisect.bisect_right(starts, t) - 1
        return i >= 0 and t <= spans[i][1]

    return inside
