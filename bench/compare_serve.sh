#!/usr/bin/env bash
# Serving throughput side by side: llama.cpp's llama-server vs modu serve on the same GGUF file,
# the same thread count and the same load generator (`modu bench serve`: N concurrent streaming
# clients × M tokens, greedy, ignore_eos, a distinct prompt per request). "agg" is all tokens
# over the wall time (prompts' prefill included); "decode" sums each client's rate from its
# first to its last token (prefill and the wait for a first token left out).
#
# Rounds alternate between the two servers (a fresh server process per round). With -l K both
# servers get the same K random rank-R LoRA adapters (written by modu as GGUF-LoRA files, which
# llama-server loads with --lora) and client c uses adapter c mod K: modu by module name in one
# mixed batch, llama-server by per-request `lora` scales.
#
# llama-server is NOT part of this repository: build it from llama.cpp's public source outside
# the repo (cmake -B build && cmake --build build --target llama-server) and point
# LLAMA_SERVER at the binary. Run on an otherwise idle machine (see bench/compare.sh).
#
# Usage: LLAMA_SERVER=/path/llama-server bench/compare_serve.sh [-m MODEL] [-c CLIENTS]
#            [-n TOKENS] [-t THREADS] [-r ROUNDS] [-l MODULES] [-R RANK]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
model="qwen2.5-coder-0.5b-instruct"
clients="1,8"
tokens=128
threads=2
rounds=3
modules=0
rank=16
while getopts "m:c:n:t:r:l:R:h" opt; do
    case "$opt" in
    m) model="$OPTARG" ;;
    c) clients="$OPTARG" ;;
    n) tokens="$OPTARG" ;;
    t) threads="$OPTARG" ;;
    r) rounds="$OPTARG" ;;
    l) modules="$OPTARG" ;;
    R) rank="$OPTARG" ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
    esac
done
: "${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary built outside this repository}"
MODU_BIN="${MODU_BIN:-$root/target/release/modu}"
[[ -x "$MODU_BIN" ]] || (cd "$root" && cargo build --release -p modu-cli)
path="$("$MODU_BIN" pull "$model" | tail -n 1 | awk '{print $NF}')"
[[ -f "$path" ]] || { echo "could not resolve model $model" >&2; exit 1; }
max_clients=$(tr ',' '\n' <<<"$clients" | sort -n | tail -1)
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
moddir="$work/modules"
lora_args=()
modu_mod_args=()
if [[ "$modules" -gt 0 ]]; then
    # Writes the modules (deterministic) and checks modu can serve them.
    "$MODU_BIN" bench serve -m "$path" -t "$threads" -c 1 -n 2 --modules "$modules" \
        --module-rank "$rank" --module-dir "$moddir" --json >/dev/null
    for f in "$moddir"/*.gguf; do lora_args+=(--lora "$f"); done
    modu_mod_args=(--modules "$modules" --module-rank "$rank" --module-dir "$moddir")
fi
echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg); model $(basename "$path"), $threads threads, clients $clients, $tokens tokens, modules $modules (rank $rank)"
for r in $(seq 1 "$rounds"); do
    port=$((18000 + RANDOM % 2000))
    "$LLAMA_SERVER" -m "$path" -t "$threads" -np "$max_clients" -c $((max_clients * 1024)) \
        --host 127.0.0.1 --port "$port" "${lora_args[@]}" >"$work/llama-$r.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 120); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        sleep 0.5
    done
    llama_pick=()
    [[ "$modules" -gt 0 ]] && llama_pick=(--llama-lora "$modules")
    "$MODU_BIN" bench serve --url "http://127.0.0.1:$port" -c "$clients" -n "$tokens" \
        "${llama_pick[@]}" --json >"$work/llama-$r.json"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    "$MODU_BIN" bench serve -m "$path" -t "$threads" -c "$clients" -n "$tokens" \
        --parallel "$max_clients" "${modu_mod_args[@]}" --json >"$work/modu-$r.json"
done
python3 - "$work" "$rounds" <<'EOF'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
def load(engine):
    runs = [json.load(open(f"{work}/{engine}-{r}.json")) for r in range(1, rounds + 1)]
    by = {}
    for run in runs:
        for row in run:
            by.setdefault(row["clients"], []).append(row)
    return by
ll, mo = load("llama"), load("modu")
print("| clients | llama-server agg tok/s | modu agg tok/s | ratio | llama decode tok/s | modu decode tok/s | ratio | llama TTFT p50 ms | modu TTFT p50 ms | llama ITL p50 ms | modu ITL p50 ms |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for c in sorted(mo):
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    a, b = med(ll[c], "agg_tps"), med(mo[c], "agg_tps")
    da, db = med(ll[c], "decode_tps"), med(mo[c], "decode_tps")
    print(f"| {c} | {a:.1f} | {b:.1f} | {b / a:.2f} | {da:.1f} | {db:.1f} | {db / da:.2f} | "
          f"{med(ll[c], 'ttft_p50_ms'):.0f} | {med(mo[c], 'ttft_p50_ms'):.0f} | "
          f"{med(ll[c], 'itl_p50_ms'):.1f} | {med(mo[c], 'itl_p50_ms'):.1f} |")
# Each engine against its own single stream (the first client count), per round pairs' medians.
base = min(mo)
for c in sorted(mo):
    if c == base:
        continue
    for name, e in (("llama-server", ll), ("modu", mo)):
        agg = statistics.median(r["agg_tps"] for r in e[c]) / statistics.median(r["agg_tps"] for r in e[base])
        dec = statistics.median(r["decode_tps"] for r in e[c]) / statistics.median(r["decode_tps"] for r in e[base])
        print(f"{name}: {c} clients / {base}: agg {agg:.2f}x, decode {dec:.2f}x")
errs = sum(r["errors"] for e in (ll, mo) for rows in e.values() for r in rows)
if errs:
    print(f"WARNING: {errs} failed requests")
EOF
