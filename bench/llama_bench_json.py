#!/usr/bin/env python3
"""Runs llama.cpp's own `llama-bench` binary and prints its results in the JSON shape that
bench/compare.sh reads from `modu bench --json` (llama-bench's field names plus `test`,
`samples_ns`/`samples_ts` and `peak_rss_bytes`, the child's peak RSS from getrusage).

usage: llama_bench_json.py LLAMA_BENCH -m MODEL -t THREADS -p PP -n TG -r REPS
llama-bench has no time-to-first-token test, so none is reported (compare.sh shows n/a).
"""
import json
import resource
import subprocess
import sys


def main() -> int:
    exe, args = sys.argv[1], sys.argv[2:]
    opts = dict(zip(args[::2], args[1::2]))
    for need in ("-m", "-t", "-p", "-n", "-r"):
        if need not in opts:
            print(f"llama_bench_json.py: missing {need}", file=sys.stderr)
            return 2
    cmd = [exe, "-m", opts["-m"], "-t", opts["-t"], "-r", opts["-r"], "-o", "json",
           "-p", opts["-p"], "-n", opts["-n"]]
    # Both tests in one process, as `modu bench -p PP -n TG` does; 0 skips a test.
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        print(f"llama_bench_json.py: {' '.join(cmd)} exited with {proc.returncode}",
              file=sys.stderr)
        return 1
    results = json.loads(proc.stdout)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    out = []
    for o in results:
        n_prompt, n_gen = int(o["n_prompt"]), int(o["n_gen"])
        if n_prompt and n_gen:
            continue
        o["test"] = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"
        o["peak_rss_bytes"] = peak
        out.append(o)
    if not out:
        print("llama_bench_json.py: llama-bench reported no pp/tg test", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
