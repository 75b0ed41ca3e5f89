#!/usr/bin/env python3
"""Time to first token with a shared system prompt, against a running OpenAI-compatible server.

Streams the same ~500-token system prompt (chat template included) with a few different user
messages, one request at a time, and prints each request's time to the first content chunk,
its prompt and reused (`usage.prompt_tokens_details.cached_tokens`) token counts, and the later
requests' TTFT as a share of the first one's. Against a fresh `modu serve` the first request
prefills everything and the later ones reuse the cached prefix blocks.

Usage: modu serve -t 2 --port 8080 &  python3 bench/prefix_ttft.py http://127.0.0.1:8080 [RULES]
(RULES: lines of the system prompt, about 20 tokens each; default 25.)
Standard library only.
"""
import json
import sys
import time
import urllib.request

base = sys.argv[1].rstrip("/")
rules = int(sys.argv[2]) if len(sys.argv) > 2 else 25
model = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
system = "You are a careful assistant. Follow these rules.\n" + "".join(
    f"Rule {i}: when asked about topic number {i}, answer briefly and politely.\n"
    for i in range(1, rules + 1)
)


def stream(user):
    body = {
        "model": model,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ],
    }
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.time()
    ttft, usage = None, None
    with urllib.request.urlopen(req) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            v = json.loads(line[6:])
            if v.get("usage"):
                usage = v["usage"]
            choices = v.get("choices") or []
            if choices and choices[0]["delta"].get("content") and ttft is None:
                ttft = time.time() - t0
    if ttft is None or usage is None:
        sys.exit("the server streamed no content or no usage")
    return ttft, usage


times = []
for user in ["Say hello.", "Say goodbye.", "What does rule 3 say?", "Which rule is about topic 7?"]:
    t, u = stream(user)
    times.append(t)
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    print(f"TTFT {t * 1e3:7.1f} ms   prompt {u['prompt_tokens']} tokens, cached {cached}")
print("later / first: " + ", ".join(f"{t / times[0] * 100:.0f} %" for t in times[1:]))
