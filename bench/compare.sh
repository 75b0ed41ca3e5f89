#!/usr/bin/env bash
# modu vs llama.cpp on the same GGUF files, same machine, same thread counts.
#
# For each model and thread count the two engines run ALTERNATELY, one process each per round
# (and the engine that goes first alternates too), so drift on a shared machine — other jobs,
# thermal state, page cache — lands on both sides instead of on whichever ran last. Each
# process warms up once and then times every test (-k times; default 1), and the table shows the
# median over the rounds:
#
#   ppN     prefill: N random prompt tokens into a fresh KV cache           (tokens/s)
#   tgN     decode: N greedy single-token steps after a 1-token prompt     (tokens/s)
#   ttftN   first token after an N-token prompt, fresh cache                (ms)
#   peak RSS                                                                (MiB, VmHWM)
#
# The ratio column is modu / llama.cpp: above 1 is modu faster for t/s rows; below 1 is modu
# better for ms and MiB rows. llama.cpp is driven through llama-cpp-python
# (bench/llama_cpp_bench.py: n_ctx 2048, n_batch 512, flash attention on); no llama.cpp code
# lives in this repository.
#
# Run it on an otherwise idle machine. llama.cpp's worker threads spin-wait at their barriers,
# so when other processes compete for the cores one descheduled worker stalls the others and its
# times collapse (10x seen on a loaded 2-core box), while modu's rayon workers sleep: a busy
# machine flatters modu. The script warns when the load average is high and records it per run.
#
# llama.cpp is either llama.cpp's own `llama-bench` binary (LLAMA_BENCH=/path/to/llama-bench:
# what llama.cpp users run; built outside this repository with cmake; no TTFT row, since
# llama-bench has no such test; bench/llama_bench_json.py converts its JSON), or, by default,
# the llama-cpp-python sdist on PyPI: the first run creates a venv OUTSIDE
# the repository (${MODU_BENCH_VENV:-$HOME/.cache/modu/bench-venv}) and `pip install
# llama-cpp-python`, which compiles the bundled llama.cpp with CMake for this CPU (native flags
# by default; needs a C/C++ compiler and cmake; 10+ minutes on 2 cores). Pin a version with
# LLAMA_CPP_PYTHON_VERSION=0.3.36. Point MODU_BENCH_VENV at an existing venv to reuse it.
#
# Usage: bench/compare.sh [-m MODELS] [-t THREADS] [-r ROUNDS] [-k REPS] [-p N] [-n N]
#                         [-f N] [-o OUT.json]
#   -m  models, comma-separated names or paths (default: qwen2.5-coder-0.5b-instruct,gemma-3-270m)
#   -t  thread counts, comma-separated (default: 2,1)
#   -r  rounds per engine (default 5; fewer is allowed for smoke tests, but is not a result)
#   -k  timed repetitions per process (default 1)
#   -p  prefill length (default 512); -n decode length (default 128); -f TTFT prompt (default 16)
#   -o  raw results as JSON (default: $TMPDIR/modu-compare-DATE.json)
# Environment: MODU_BIN (default: build target/release/modu), LLAMA_BENCH, MODU_BENCH_VENV,
# MODU_HOME, MODU_KERNELS (passed to modu: forces a lower kernel level).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

models="qwen2.5-coder-0.5b-instruct,gemma-3-270m"
threads="2,1"
rounds=5
reps=1
pp=512
tg=128
ttft=16
out=""
while getopts "m:t:r:k:p:n:f:o:h" opt; do
    case "$opt" in
    m) models="$OPTARG" ;;
    t) threads="$OPTARG" ;;
    r) rounds="$OPTARG" ;;
    k) reps="$OPTARG" ;;
    p) pp="$OPTARG" ;;
    n) tg="$OPTARG" ;;
    f) ttft="$OPTARG" ;;
    o) out="$OPTARG" ;;
    h)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) exit 2 ;;
    esac
done
[[ -n "$out" ]] || out="${TMPDIR:-/tmp}/modu-compare-$(date -u +%Y%m%dT%H%M%SZ).json"
load1="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)"
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    echo "warning: load average $load1: other work is running; the results will be noisy and" \
        "biased against llama.cpp (see the header of this script)" >&2
fi
if ((rounds < 5)); then
    echo "note: $rounds round(s) < 5: fine for a smoke test, too few for a comparison" >&2
fi

# --- llama.cpp (llama-cpp-python) venv, outside the repository -------------------------------
if [[ -n "${LLAMA_BENCH:-}" ]]; then
    [[ -x "$LLAMA_BENCH" ]] || { echo "LLAMA_BENCH=$LLAMA_BENCH is not an executable" >&2; exit 1; }
    py="$(command -v python3)"
    llama_version="llama-bench ($LLAMA_BENCH)"
else
    venv="${MODU_BENCH_VENV:-$HOME/.cache/modu/bench-venv}"
    if ! "$venv/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
        echo "creating $venv and building llama.cpp from the llama-cpp-python sdist (10+ min)..." >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --upgrade pip
        "$venv/bin/pip" install --no-binary=llama-cpp-python numpy \
            "llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"
    fi
    py="$venv/bin/python"
    llama_version="llama-cpp-python $("$py" -c 'import llama_cpp; print(llama_cpp.__version__)')"
fi

# --- modu ------------------------------------------------------------------------------------
if [[ -z "${MODU_BIN:-}" ]]; then
    (cd "$root" && cargo build --release --quiet -p modu-cli)
    MODU_BIN="${CARGO_TARGET_DIR:-$root/target}/release/modu"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# One line per run: engine, model, threads, round, path of its JSON, 1-minute load before it.
index="$work/index.tsv"
: >"$index"

IFS=, read -r -a model_list <<<"$models"
IFS=, read -r -a thread_list <<<"$threads"
for spec in "${model_list[@]}"; do
    if [[ -f "$spec" ]]; then
        path="$spec"
    else
        # `modu pull` fetches the model if needed and prints its path last on its line.
        path="$("$MODU_BIN" pull "$spec" | tail -n 1 | awk '{print $NF}')"
    fi
    [[ -f "$path" ]] || {
        echo "could not resolve model $spec (got '$path')" >&2
        exit 1
    }
    for t in "${thread_list[@]}"; do
        for ((r = 1; r <= rounds; r++)); do
            order=(llama modu)
            ((r % 2 == 0)) && order=(modu llama)
            for engine in "${order[@]}"; do
                f="$work/$engine-$(basename "$path")-t$t-r$r.json"
                load="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)"
                echo "[$(date -u +%H:%M:%S)] $spec  threads=$t  round $r/$rounds  $engine" >&2
                if [[ $engine == llama && -n "${LLAMA_BENCH:-}" ]]; then
                    "$py" "$here/llama_bench_json.py" "$LLAMA_BENCH" -m "$path" -t "$t" \
                        -p "$pp" -n "$tg" -r "$reps" >"$f" 2>"$f.err" ||
                        { cat "$f.err" >&2; exit 1; }
                elif [[ $engine == llama ]]; then
                    "$py" "$here/llama_cpp_bench.py" -m "$path" -t "$t" -p "$pp" -n "$tg" \
                        --ttft "$ttft" -r "$reps" >"$f" 2>"$f.err" ||
                        { cat "$f.err" >&2; exit 1; }
                else
                    "$MODU_BIN" bench -m "$path" -t "$t" -p "$pp" -n "$tg" --ttft "$ttft" \
                        -r "$reps" --json >"$f" 2>"$f.err" ||
                        { cat "$f.err" >&2; exit 1; }
                fi
                printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$engine" "$spec" "$t" "$r" "$f" "$load" >>"$index"
            done
        done
    done
done

# --- summary ---------------------------------------------------------------------------------
"$py" - "$index" "$out" "$llama_version" "$("$MODU_BIN" --version)" <<'EOF'
import json, platform, statistics, sys, time

index, out, llama_version, modu_version = sys.argv[1:5]
runs = []
for line in open(index):
    engine, model, threads, rnd, path, load = line.rstrip("\n").split("\t")
    runs.append({"engine": engine, "model": model, "threads": int(threads), "round": int(rnd),
                 "loadavg_before": float(load), "results": json.load(open(path))})

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), platform.machine())
json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu,
           "llama_cpp": llama_version, "modu": modu_version, "runs": runs},
          open(out, "w"), indent=1)

# metric -> list of per-run values, keyed by (model, threads, row, engine)
vals = {}
rows = []
def add(key, row, engine, v):
    k = key + (row,)
    if k not in rows:
        rows.append(k)
    vals.setdefault(k + (engine,), []).append(v)
for run in runs:
    key = (run["model"], run["threads"])
    for o in run["results"]:
        test = o["test"]
        if test.startswith("ttft"):
            for ns in o["samples_ns"]:
                add(key, f"{test} ms", run["engine"], ns / 1e6)
        else:
            for ts in o["samples_ts"]:
                add(key, f"{test} t/s", run["engine"], ts)
    last = run["results"][-1]
    add(key, "peak RSS MiB", run["engine"], last["peak_rss_bytes"] / 2**20)
    add(key, "RSS above start MiB", run["engine"],
        (last["peak_rss_bytes"] - (last.get("rss_baseline_bytes") or 0)) / 2**20)

commit = next((o.get("build_commit") for r in runs if r["engine"] == "llama" for o in r["results"]), None)
if commit:
    llama_version += f" build {commit}" if commit != "unknown" else ""
kernels = next((o.get("kernels") for r in runs if r["engine"] == "modu" for o in r["results"]), "?")
print(f"\n{cpu}; modu: {modu_version} (kernels: {kernels}); llama.cpp: {llama_version}")
print("medians over rounds; ratio = modu/llama.cpp (t/s: >1 modu faster; ms, MiB: <1 modu better)\n")
hdr = f"| {'model':<28} | {'thr':>3} | {'test':<20} | {'llama.cpp':>10} | {'modu':>10} | {'ratio':>6} | {'n':>3} |"
print(hdr)
print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
for k in rows:
    model, threads, row = k
    l = vals.get(k + ("llama",), [])
    m = vals.get(k + ("modu",), [])
    lm = statistics.median(l) if l else float("nan")
    mm = statistics.median(m) if m else float("nan")
    ratio = mm / lm if l and m and lm else float("nan")
    print(f"| {model[:28]:<28} | {threads:>3} | {row:<20} | {lm:>10.2f} | {mm:>10.2f} | {ratio:>6.3f} | {min(len(l), len(m)):>3} |")
loads = [r["loadavg_before"] for r in runs]
print(f"\nload average before runs: {min(loads):.2f}..{max(loads):.2f}; raw results: {out}")
EOF
