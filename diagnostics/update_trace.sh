#!/usr/bin/env bash
# Traces the sequential durable updates system-wide; see README.md.
# `--wakes` also records the thread hand-offs and prints timelines instead.
set -euo pipefail
cd "$(dirname "$0")/.."
events=syscalls:sys_enter_statx,syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync,sched:sched_switch
analyse=diagnostics/update_trace.py
fields=comm,tid,cpu,time,event,trace
parts=durable
span=7
if [ "${1:-}" = "--wakes" ]; then
  events=$events,sched:sched_wakeup,syscalls:sys_enter_futex,syscalls:sys_enter_pwrite64,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom
  analyse=diagnostics/wake_trace.py
  fields=comm,pid,tid,cpu,time,event,trace
  # The floor's parts, measured under the same tracing, to compare with.
  parts=floor,durable
  span=9
fi
cargo build --release --example bench
out=$(mktemp -d)
PERUN_BENCH_MARKS=1 target/release/examples/bench --only "$parts" --out "$out/summary.json" > "$out/bench.log" 2>&1 &
bench=$!
# The sequential part starts within a second or two; the trace covers it.
perf record -a -o "$out/trace.data" -e "$events" -- sleep "$span" 2>/dev/null
wait "$bench"
grep -E "^(update_latency_p50_ms|update_latency_p99_ms|durable_p99_over_p50|floor_[a-z_]*_ms) " "$out/bench.log"
# perf's own syscalls are not the bench's.
perf script -i "$out/trace.data" -F "$fields" 2>/dev/null | grep -v "^ *perf " > "$out/trace.txt"
python3 "$analyse" "$out/trace.txt"
echo "trace kept in $out"
