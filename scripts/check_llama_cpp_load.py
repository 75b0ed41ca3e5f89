#!/usr/bin/env python3
"""Check that a modu-quantized GGUF loads in llama.cpp and gives the same predictions as modu.

Loads MODEL with llama-cpp-python, runs the prompt, then greedily generates N tokens, and
compares every step's top-K log-probabilities with `modu run --json --logprobs K --temp 0`:
the same greedy tokens, and the max |Δ logprob| of modu's top tokens.

Needs llama-cpp-python (not a dependency of the Rust test suite), e.g.
    /tmp/tokwork/venv/bin/python scripts/check_llama_cpp_load.py MODEL.gguf [--modu target/release/modu]

Exit status 0 when llama.cpp loads the file, the greedy tokens agree, and the chosen token's
log-prob differences stay under --tol (default 0.1 nats). For scale: on the unmodified
llama-quantize Q4_K_M file, modu and llama-cpp-python differ by up to ~0.04 on the chosen token
and ~0.25 over the top-5 (low-probability tokens move more), the usual CPU-build spread.
"""
import argparse
import json
import math
import subprocess
import sys


def log_softmax(xs):
    m = max(xs)
    s = sum(math.exp(x - m) for x in xs)
    lse = m + math.log(s)
    return [x - lse for x in xs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--modu", default="target/release/modu")
    ap.add_argument("--prompt", default="The capital of France is Paris. The capital of Korea is")
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--tol", type=float, default=0.1)
    ap.add_argument("--near-tie", type=float, default=0.1,
                    help="accept a different greedy token when llama.cpp's log-prob of modu's "
                         "token is within this of its own top one (float-order ties)")
    a = ap.parse_args()

    out = subprocess.run(
        [a.modu, "run", "-m", a.model, "--json", "--logprobs", str(a.k), "-n", str(a.n),
         "--temp", "0", "--ignore-eos", "-t", "2", "-p", a.prompt],
        check=True, capture_output=True, text=True,
    ).stdout
    mo = json.loads(out)

    import llama_cpp  # noqa: E402  (only needed here)

    llm = llama_cpp.Llama(model_path=a.model, logits_all=True, n_ctx=512, verbose=False,
                          n_threads=2)
    prompt = mo["prompt_tokens"]
    toks = list(prompt)
    llm.reset()
    llm.eval(toks)
    worst = 0.0
    worst_k = 0.0
    agree = True
    for step, gen in enumerate(mo["tokens"]):
        logits = llm.scores[llm.n_tokens - 1].tolist()
        lp = log_softmax(logits)
        top = max(range(len(lp)), key=lambda i: lp[i])
        d = max(abs(lp[t["id"]] - t["logprob"]) for t in gen["top"])
        d1 = abs(lp[gen["id"]] - gen["logprob"])
        worst = max(worst, d1)
        worst_k = max(worst_k, d)
        ok = top == gen["id"] or lp[top] - lp[gen["id"]] < a.near_tie
        agree &= ok
        print(f"step {step}: modu {gen['id']:>6} ({gen['logprob']:.4f})  llama.cpp {top:>6} "
              f"({lp[top]:.4f})  |Δ| top-1 {d1:.4f}, max over top-{a.k} {d:.4f}  {('ok' if top == gen['id'] else 'near tie') if ok else 'DIFF'}")
        llm.eval([gen["id"]])  # follow modu's path so the contexts stay identical
    print(f"loaded in llama.cpp: yes; greedy agree: {agree}; worst |Δlogprob| of the chosen "
          f"token: {worst:.4f}; over the top-{a.k}: {worst_k:.4f}")
    sys.exit(0 if agree and worst < a.tol else 1)


if __name__ == "__main__":
    main()
