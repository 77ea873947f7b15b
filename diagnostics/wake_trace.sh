#!/usr/bin/env bash
# Traces the sequential durable updates with their thread hand-offs and
# wake-ups; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --example bench
out=$(mktemp -d)
PERUN_BENCH_MARKS=1 target/release/examples/bench --only durable --out "$out/summary.json" > "$out/bench.log" 2>&1 &
bench=$!
# The sequential part starts within two seconds; the trace covers part of it.
sleep 2
perf record -a -o "$out/trace.data" \
  -e syscalls:sys_enter_statx,syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync \
  -e sched:sched_switch,sched:sched_wakeup,syscalls:sys_enter_futex \
  -e syscalls:sys_enter_pwrite64,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom \
  -- sleep 5 2>/dev/null
wait "$bench"
grep -E "^(update_latency_p50_ms|durable_p99_over_p50) " "$out/bench.log"
perf script -i "$out/trace.data" -F comm,tid,cpu,time,event,trace 2>/dev/null | grep -v "^ *perf " > "$out/trace.txt"
python3 diagnostics/wake_trace.py "$out/trace.txt"
echo "trace kept in $out"
