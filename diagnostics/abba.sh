#!/usr/bin/env bash
# Interleaved comparison of two bench binaries (or one binary under two
# environments): runs them in the order A B B A A B B A A B B A, six runs
# each, and prints medians. This guest drifts between a slow and a fast
# spell within minutes, and a fixed A-then-B order favours one side.
#
#   cp target/release/examples/bench /tmp/bench-a   # before the change
#   cargo build --release --example bench && cp target/release/examples/bench /tmp/bench-b
#   diagnostics/abba.sh tag X=1 X=1 /tmp/bench-a /tmp/bench-b
#
# ONLY picks the bench parts (default `durable`), KEYS the figures shown.
set -euo pipefail
tag=$1 env_a=$2 env_b=$3 bin_a=$4 bin_b=${5:-$4}
only=${ONLY:-durable}
out=${TMPDIR:-/tmp}/abba-$tag
mkdir -p "$out"
i=0
for side in a b b a a b b a a b b a; do
  i=$((i + 1))
  if [ "$side" = a ]; then env "$env_a" "$bin_a" --only "$only" --out "$out/a-$i.json" >/dev/null 2>&1
  else env "$env_b" "$bin_b" --only "$only" --out "$out/b-$i.json" >/dev/null 2>&1; fi
done
python3 - "$out" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
keys = os.environ.get("KEYS", "aggregate_cpu_bound_ratio aggregate_cpu_ms_per_update "
                      "aggregate_cores_busy update_latency_p50_ms").split()
for side in "ab":
    runs = sorted(glob.glob(f"{out}/{side}-*.json"), key=lambda f: int(f.rsplit("-", 1)[1][:-5]))
    figs = [json.load(open(f)) for f in runs]
    figs = [d.get("figures", d) for d in figs]
    print(side)
    for k in keys:
        v = [d[k] for d in figs if d.get(k) is not None]
        if v:
            print(f"  {k:34s} median {statistics.median(v):9.4f}  " + " ".join(f"{x:.4f}" for x in v))
PY
