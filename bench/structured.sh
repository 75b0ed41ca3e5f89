#!/usr/bin/env bash
# Constrained vs unconstrained decoding under load: `modu bench serve` with 8 concurrent clients,
# each with its own JSON schema (--structured; a schema no output completes within -n tokens, so
# every request generates exactly -n tokens, as the unconstrained ones do with ignore_eos),
# alternating with the same run unconstrained, R times each. Prints the median aggregate tok/s
# of both, their ratio, and the grammar-mask p50/p99 the server measured.
#
# Usage: bench/structured.sh [-m MODEL] [-c CLIENTS] [-n TOKENS] [-r RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=qwen2.5-coder-0.5b-instruct clients=8 n=128 runs=3
while getopts "m:c:n:r:" o; do
    case $o in m) model=$OPTARG ;; c) clients=$OPTARG ;; n) n=$OPTARG ;; r) runs=$OPTARG ;; *) exit 2 ;; esac
done
cargo build --quiet --release -p modu-cli
modu=target/release/modu
out=$(mktemp -d)
for r in $(seq 1 "$runs"); do
    $modu bench serve -m "$model" -c "$clients" -n "$n" --json > "$out/plain-$r.json"
    $modu bench serve -m "$model" -c "$clients" -n "$n" --json --structured > "$out/structured-$r.json"
done
python3 - "$out" "$runs" <<'PY'
import json, statistics, sys
d, runs = sys.argv[1], int(sys.argv[2])
def load(kind):
    return [json.load(open(f"{d}/{kind}-{r}.json"))[0] for r in range(1, runs + 1)]
plain, cons = load("plain"), load("structured")
for rows in (plain, cons):
    for row in rows:
        assert row["errors"] == 0 and row["tokens"] == row["requests"] * row["n_gen"], row
p = statistics.median(r["agg_tps"] for r in plain)
c = statistics.median(r["agg_tps"] for r in cons)
print(f"unconstrained: {p:.1f} tok/s (runs {[round(r['agg_tps'], 1) for r in plain]})")
print(f"constrained:   {c:.1f} tok/s (runs {[round(r['agg_tps'], 1) for r in cons]})")
print(f"ratio constrained/unconstrained: {c / p:.3f}")
print("mask p50 µs per run:", [round(r.get("mask_p50_us", float("nan"))) for r in cons],
      "p99 µs:", [round(r.get("mask_p99_us", float("nan"))) for r in cons])
print("TTFT p50 ms plain/constrained:", statistics.median(r["ttft_p50_ms"] for r in plain),
      statistics.median(r["ttft_p50_ms"] for r in cons))
PY
