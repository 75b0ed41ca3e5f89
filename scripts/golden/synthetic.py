#!/usr/bin/env python3
"""Make the synthetic-model goldens in tests/golden/synthetic/ with llama.cpp.

For every architecture `modu synth` knows, write its tiny random-weight model (real tokenizer
metadata from the Qwen or Gemma model in modu's cache), tokenize an English, a Korean and a code
prompt with llama-tokenize and record llama.cpp's greedy continuation with top-10 probabilities
(`llama_greedy.cpp`, built here against the llama.cpp library; llama-server cannot be used: it
fails requests whose random output starts inside a UTF-8 character). For the architectures with
their own pre-tokenizer, also llama-tokenize's ids of the shared tokenization strings. The
output has the layout of ../shared/golden's files.

    python3 scripts/golden/synthetic.py --llama-src /path/to/llama.cpp \
        [--modu target/release/modu] [--arch exaone4 ...]

llama.cpp: ngxson/llama.cpp at 3f545bec (the commit of the real-model goldens), built with
`cmake -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-tokenize`
(CPU only). Only Python's standard library and g++ are used.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "golden", "synthetic")
ARCHS = ["llama", "qwen2", "gemma3", "exaone", "exaone4", "exaone4-swa"]
# Architectures whose pre-tokenizer differs from their vocabulary model's.
OWN_PRE = {"llama": "llama-bpe", "exaone": "exaone", "exaone4": "exaone4"}
PROMPTS = [
    ("en", "The history of the printing press begins"),
    ("ko", "대한민국의 수도는 서울이고, 옛날 옛적에 한 마을에"),
    ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
]
N_PREDICT = 32
SEED = 1
THREADS = 2
LLAMA_COMMIT = "3f545beccee69d9975f466ec7e45fd9aacd8ba90"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenize(llama_bin, model, text, parse_special=True):
    with tempfile.NamedTemporaryFile("wb", delete=False) as f:
        f.write(text.encode())
        path = f.name
    try:
        r = subprocess.run(
            [os.path.join(llama_bin, "llama-tokenize"), "-m", model, "-f", path, "--ids",
             "--no-escape", "--log-disable", *([] if parse_special else ["--no-parse-special"])],
            check=True, capture_output=True, text=True)
    finally:
        os.unlink(path)
    return json.loads(r.stdout.strip().splitlines()[-1])


def greedy(tool, model, prompts):
    """llama_greedy's steps for each prompt (lists of ids)."""
    inp = "".join(" ".join(map(str, ids)) + "\n" for ids in prompts)
    r = subprocess.run([tool, model, str(N_PREDICT), str(THREADS)], input=inp, check=True,
                       capture_output=True, text=True)
    out, steps = [], []
    for line in r.stdout.splitlines():
        if line == "end":
            out.append(steps)
            steps = []
            continue
        f = line.split()
        assert f[0] == "step"
        top = [{"id": int(f[2 + 2 * k + 1]), "prob": float(f[2 + 2 * k])} for k in range(10)]
        steps.append({"id": int(f[1]), "probs_reported": True, "top": top})
    assert len(out) == len(prompts)
    return out


def tokenize_cases(llama_bin, model, shared):
    cases = []
    for c in shared["cases"]:
        cases.append({"index": c["index"], "text": c["text"], "utf8_hex": c["utf8_hex"],
                      "ids_parse_special": tokenize(llama_bin, model, c["text"], True),
                      "ids_no_parse_special": tokenize(llama_bin, model, c["text"], False)})
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-src", required=True, help="llama.cpp checkout with build/bin")
    ap.add_argument("--modu", default=os.path.join(ROOT, "target", "release", "modu"))
    ap.add_argument("--arch", nargs="*", default=ARCHS)
    a = ap.parse_args()
    llama_bin = os.path.join(a.llama_src, "build", "bin")
    os.makedirs(OUT, exist_ok=True)
    work = tempfile.mkdtemp(prefix="modu-synth-")
    tool = os.path.join(work, "llama_greedy")
    subprocess.run(
        ["g++", "-O2", "-std=c++17", "-I", os.path.join(a.llama_src, "include"),
         "-I", os.path.join(a.llama_src, "ggml", "include"),
         os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_greedy.cpp"),
         "-L", llama_bin, "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{llama_bin}",
         "-o", tool], check=True)
    shared_tok = json.load(open(os.path.join(ROOT, "tests", "golden", "qwen-tokenize-public.json")))
    for arch in a.arch:
        model = os.path.join(work, f"{arch}.gguf")
        synth_cmd = ["modu", "synth", "--arch", arch, "--seed", str(SEED), "-o", f"{arch}.gguf"]
        subprocess.run([a.modu, *synth_cmd[1:-1], model], check=True)
        digest = sha256(model)
        prompt_ids = [tokenize(llama_bin, model, text) for _, text in PROMPTS]
        runs = greedy(tool, model, prompt_ids)
        cases = []
        for (cid, text), ids, steps in zip(PROMPTS, prompt_ids, runs):
            cases.append({"id": cid, "prompt_text": text, "prompt_ids": ids,
                          "generated_ids": [s["id"] for s in steps], "steps": steps})
            print(f"{arch} {cid}: {len(ids)} prompt tokens, first ids "
                  f"{[s['id'] for s in steps[:6]]}", file=sys.stderr)
        meta = {
            "arch": arch, "synth_command": " ".join(synth_cmd), "model_sha256": digest,
            "producer": "llama.cpp: llama-tokenize (prompt ids, special tokens parsed, BOS per "
                        "model default) and scripts/golden/llama_greedy.cpp (greedy steps) via "
                        "scripts/golden/synthetic.py",
            "llama_cpp_commit": LLAMA_COMMIT,
            "context": f"n_ctx 4096, one sequence, {THREADS} threads, flash attention auto, f16 KV",
            "n_predict": N_PREDICT,
            "probs_note": "prob = softmax of the raw logits over the full vocabulary; top = 10 "
                          "highest, descending",
        }
        with open(os.path.join(OUT, f"{arch}-greedy.json"), "w") as f:
            json.dump({"meta": meta, "cases": cases}, f, ensure_ascii=False, indent=1)
            f.write("\n")
        if arch in OWN_PRE:
            tok = {"meta": {"arch": arch, "pre_tokenizer": OWN_PRE[arch], "model_sha256": digest,
                            "synth_command": " ".join(synth_cmd),
                            "producer": "llama.cpp llama-tokenize -m MODEL -f FILE --ids "
                                        "--no-escape --log-disable [--no-parse-special]",
                            "llama_cpp_commit": LLAMA_COMMIT,
                            "strings": "the cases of tests/golden/qwen-tokenize-public.json"},
                   "cases": tokenize_cases(llama_bin, model, shared_tok)}
            with open(os.path.join(OUT, f"{arch}-tokenize.json"), "w") as f:
                json.dump(tok, f, ensure_ascii=False, indent=1)
                f.write("\n")


if __name__ == "__main__":
    main()
