"""Drives `modu serve` with the official openai client, unchanged: chat (plain and streaming,
with usage), completions, and typed errors. Run by openai_client.rs with the server's base URL;
prints one line per check and exits non-zero on the first failure."""

import sys

import openai
from openai import OpenAI

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)

r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
)
text = r.choices[0].message.content
assert isinstance(text, str) and text, r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
assert 1 <= r.usage.completion_tokens <= 8, r.usage
print("chat ok", r.usage.completion_tokens)

parts = []
usage = None
finish = None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == text, (parts, text)
assert finish in ("stop", "length"), finish
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage
print("stream ok", len(parts))

c = client.completions.create(model=model, prompt="The sky is", max_tokens=5, temperature=0)
assert c.choices[0].text and c.usage.completion_tokens == 5, c
print("completion ok")

models = client.models.list()
assert any(m.id == model for m in models.data), models
print("models ok")

try:
    client.chat.completions.create(
        model="no-such-model", messages=[{"role": "user", "content": "x"}]
    )
    sys.exit("no error for an unknown model")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e), e
    print("not found ok")

try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], temperature=7
    )
    sys.exit("no error for temperature=7")
except openai.BadRequestError as e:
    assert "temperature" in str(e), e
    print("bad request ok")

print("ALL OK")
