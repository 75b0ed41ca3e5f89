#!/usr/bin/env bash
# Loopback scale-out, no cluster needed: three `modu serve` processes (one thread each) with
# the same 24 random rank-16 modules registered and `--module-mem` room for about 8 each,
# behind three front ends in turn:
#   roundrobin  HAProxy `balance roundrobin`
#   hash        HAProxy `balance hash req.body,json_query('$.model')` + `hash-type consistent`
#               (module affinity by consistent hashing of the request's model)
#   router      bench/scaleout/router.py: GAIE's LoRA-affinity rule on modu's vllm:* metrics
# Each run is the same closed-loop streaming load (load.py: C clients for D seconds, every
# client cycling through all modules). Reported per front end: requests, errors, aggregate
# completion tok/s, TTFT p50/p99 and the module reloads/evictions the servers counted
# (modu_module_reloads_total / modu_module_evictions_total).
#
#   bench/scaleout/run.sh            # CLIENTS=6 SECONDS_PER_RUN=60 TOKENS=16 ROUNDS=1
#
# Needs haproxy (Debian package) and python3. Loopback only; every process is stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLIENTS=${CLIENTS:-6}
SECS=${SECONDS_PER_RUN:-60}
TOKENS=${TOKENS:-16}
ROUNDS=${ROUNDS:-1}
MODULES=24
PER_SERVER=8
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
command -v haproxy >/dev/null || { echo "run.sh: haproxy is required (apt-get install haproxy)" >&2; exit 1; }
cargo build --quiet --release -p modu-cli
MODU=target/release/modu
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# 24 deterministic random modules (GGUF-LoRA, rank 16, all seven projections).
"$MODU" bench serve -m "$MODEL" --modules $MODULES --module-dir "$WORK/modules" -c 1 -n 1 >/dev/null
MODS=()
for i in $(seq 0 $((MODULES - 1))); do MODS+=(--module "m$i=$WORK/modules/bench-m$i.gguf"); done
BYTES=$(stat -c %s "$WORK/modules/bench-m0.gguf")
MIB=$(( (BYTES * PER_SERVER + BYTES / 2) / 1048576 ))
echo "modules: $MODULES x $((BYTES / 1048576)) MiB; --module-mem $MIB MiB per server (~$PER_SERVER resident)" >&2

BACKENDS=()
for k in 1 2 3; do
    port=$((18100 + k))
    "$MODU" serve -m "$MODEL" -t 1 --port $port --parallel 4 --module-mem "$MIB" "${MODS[@]}" \
        2>"$WORK/serve$k.log" &
    PIDS+=($!)
    BACKENDS+=("http://127.0.0.1:$port")
done
for b in "${BACKENDS[@]}"; do
    for _ in $(seq 600); do curl -sf "$b/health" >/dev/null && break; sleep 0.2; done
    curl -sf "$b/health" >/dev/null || { echo "run.sh: $b did not come up" >&2; exit 1; }
done

counter() { # sum of a counter over the servers
    local name=$1 sum=0 v
    for b in "${BACKENDS[@]}"; do
        v=$(curl -sf "$b/metrics" | awk -v n="$name" '$1 == n {print $2}')
        sum=$(python3 -c "print($sum + ${v:-0})")
    done
    echo "$sum"
}

haproxy_cfg() { # $1 = balance line
    cat <<CFG
global
  maxconn 256
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend fe
  bind 127.0.0.1:18100
  option http-buffer-request
  default_backend be
backend be
  $1
  server s1 127.0.0.1:18101
  server s2 127.0.0.1:18102
  server s3 127.0.0.1:18103
CFG
}

echo "front_end round requests errors tok_per_s ttft_p50_s ttft_p99_s reloads evictions"
for round in $(seq "$ROUNDS"); do
for fe in roundrobin hash router; do
    case $fe in
        roundrobin) haproxy_cfg "balance roundrobin" >"$WORK/ha.cfg"; haproxy -f "$WORK/ha.cfg" -db & ;;
        hash) haproxy_cfg "balance hash req.body,json_query('\$.model')
  hash-type consistent" >"$WORK/ha.cfg"; haproxy -f "$WORK/ha.cfg" -db & ;;
        router) python3 bench/scaleout/router.py --port 18100 \
                    --backend "${BACKENDS[0]}" --backend "${BACKENDS[1]}" --backend "${BACKENDS[2]}" & ;;
    esac
    fe_pid=$!
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:18100/" 2>/dev/null && break; sleep 0.1; done
    r0=$(counter modu_module_reloads_total); e0=$(counter modu_module_evictions_total)
    out=$(python3 bench/scaleout/load.py http://127.0.0.1:18100 --clients "$CLIENTS" \
          --modules $MODULES --seconds "$SECS" --tokens "$TOKENS")
    r1=$(counter modu_module_reloads_total); e1=$(counter modu_module_evictions_total)
    kill $fe_pid; wait $fe_pid 2>/dev/null || true
    python3 - "$fe" "$round" "$out" "$r0" "$r1" "$e0" "$e1" <<'PY'
import json, sys
fe, rnd, out, r0, r1, e0, e1 = sys.argv[1:]
o = json.loads(out)
print(fe, rnd, o["requests"], o["errors"], o["tok_per_s"],
      round(o["ttft_p50_s"] or 0, 3), round(o["ttft_p99_s"] or 0, 3),
      int(float(r1) - float(r0)), int(float(e1) - float(e0)))
PY
done
done
