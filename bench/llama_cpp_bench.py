#!/usr/bin/env python3
"""Time llama.cpp (through llama-cpp-python) the way `modu bench` times modu.

`bench/compare.sh` runs this and `modu bench --json` alternately on the same GGUF file and
compares the two. The tests mirror modu's exactly, so a row of one is the same work as the row
of the other:

* ppN: a fresh context (`reset`, which makes the next `eval` drop the KV cache), then one
  `eval` of N random token ids (llama.cpp splits it into n_batch = 512 chunks, as llama-bench
  does).
* tgN: a 1-token prompt (untimed), then N single-token `eval`s, each fed the greedy pick of
  the previous one's logits.
* ttftN: a fresh context, an N-token prompt and the greedy first token.

Each test runs once to warm up and then `-r` times. Output: a JSON array on stdout with the
field names of `modu bench --json` (llama-bench's), plus the process's peak RSS (VmHWM) and its
RSS before the model was loaded (the Python runtime's share, so the model's own footprint can be
told apart).

`Llama.eval` adds a little Python work per call (about 0.1 ms: batch setup, bookkeeping), which
is under 1% of a decode step for these models; it is part of the measured llama.cpp time.
"""

import argparse
import ctypes
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import llama_cpp


def status_kib(field):
    """A kB field of /proc/self/status, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mean_sd(v):
    if not v:
        return 0.0, 0.0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True, help="GGUF path")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("-p", "--n-prompt", default="512", help="comma-separated; 0 = none")
    ap.add_argument("-n", "--n-gen", default="128", help="comma-separated; 0 = none")
    ap.add_argument("--ttft", type=int, default=0, help="prompt length of the TTFT test; 0 = none")
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-warmup", action="store_true")
    a = ap.parse_args()

    pps = [int(x) for x in a.n_prompt.split(",") if int(x) > 0]
    tgs = [int(x) for x in a.n_gen.split(",") if int(x) > 0]
    need = max(pps + [n + 1 for n in tgs] + [a.ttft, 1])

    rss_baseline = status_kib("VmRSS")
    llm = llama_cpp.Llama(
        model_path=a.model,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_ctx=max(2048, need),
        n_batch=512,
        n_ubatch=512,
        flash_attn=True,
        n_gpu_layers=0,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    rng = random.Random(a.seed)

    def rand_tokens(n):
        return [rng.randrange(n_vocab) for _ in range(n)]

    def greedy():
        # Only the last position of each batch has logits (logits_all=False): row -1.
        ptr = llm._ctx.get_logits_ith(-1)
        row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
        return int(row.argmax())

    def once(kind, n):
        if kind in ("pp", "ttft"):
            toks = rand_tokens(n)
            llm.reset()
            t0 = time.perf_counter_ns()
            llm.eval(toks)
            if kind == "ttft":
                greedy()
            return time.perf_counter_ns() - t0
        llm.reset()
        llm.eval(rand_tokens(1))
        tok = greedy()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            llm.eval([tok])
            tok = greedy()
        return time.perf_counter_ns() - t0

    tests = [("pp", n) for n in pps] + [("tg", n) for n in tgs]
    if a.ttft > 0:
        tests.append(("ttft", a.ttft))
    build = "llama.cpp via llama-cpp-python " + llama_cpp.__version__
    out = []
    for kind, n in tests:
        if not a.no_warmup:
            once(kind, n)
        ns = [once(kind, n) for _ in range(a.repetitions)]
        ts = [n * 1e9 / max(v, 1) for v in ns]
        avg_ns, sd_ns = mean_sd(ns)
        avg_ts, sd_ts = mean_sd(ts)
        n_prompt, n_gen = {"pp": (n, 0), "tg": (0, n), "ttft": (n, 1)}[kind]
        o = {
            "build": build,
            "backends": "CPU",
            "model_filename": a.model,
            "n_threads": a.threads,
            "n_batch": 512,
            "n_prompt": n_prompt,
            "n_gen": n_gen,
            "test": f"{kind}{n}",
            "avg_ns": round(avg_ns),
            "stddev_ns": round(sd_ns),
            "avg_ts": avg_ts,
            "stddev_ts": sd_ts,
            "samples_ns": ns,
            "samples_ts": ts,
            "peak_rss_bytes": (status_kib("VmHWM") or 0) * 1024,
            "rss_baseline_bytes": (rss_baseline or 0) * 1024,
        }
        if kind == "ttft":
            o["avg_ms"] = avg_ns / 1e6
            o["stddev_ms"] = sd_ns / 1e6
        out.append(o)
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
