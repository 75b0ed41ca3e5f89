#!/usr/bin/env python3
"""Closed-loop streaming load against one OpenAI-compatible URL (a proxy in front of several
modu servers): C clients, each sending completions one after another for D seconds; request j
of client c uses module (c + j * C) % M, so every client visits every module. Prints one JSON
object: requests, errors, completion tokens, aggregate tok/s, TTFT p50/p99.

    load.py URL --clients 6 --modules 24 --seconds 60 --tokens 16
"""
import argparse
import json
import threading
import time
import urllib.request


def one(url, model, tokens, timeout):
    body = json.dumps({"model": model, "prompt": f"Module {model} says:", "max_tokens": tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    ttft, n = None, 0
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"])
            if ev["choices"][0].get("text"):
                n += 1
                if ttft is None:
                    ttft = time.monotonic() - t0
    return ttft if ttft is not None else time.monotonic() - t0, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--modules", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    stop = time.monotonic() + a.seconds
    lock = threading.Lock()
    ttfts, tokens, errors, reqs = [], [0], [], [0]

    def client(c):
        j = 0
        while time.monotonic() < stop:
            model = f"m{(c + j * a.clients) % a.modules}"
            j += 1
            try:
                t, n = one(a.url, model, a.tokens, a.timeout)
                with lock:
                    ttfts.append(t)
                    tokens[0] += n
                    reqs[0] += 1
            except Exception as e:  # counted, never retried
                with lock:
                    errors.append(str(e)[:200])

    t0 = time.monotonic()
    th = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = time.monotonic() - t0
    ttfts.sort()
    q = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else None
    print(json.dumps({"requests": reqs[0], "errors": len(errors), "error_samples": errors[:3],
                      "completion_tokens": tokens[0], "wall_s": round(wall, 2),
                      "tok_per_s": round(tokens[0] / wall, 2),
                      "ttft_p50_s": q(0.5), "ttft_p99_s": q(0.99)}))


if __name__ == "__main__":
    main()
