"""Structured output and tool calls with the official openai client, unchanged: `parse` with a
Pydantic model (nested model, enum, bounds, pattern), a tool-call round trip (tool_calls, a
`tool` message, the final answer), parsed tool arguments, and streamed `delta.tool_calls`.
Run by openai_client.rs against a server on Qwen2.5-Coder-0.5B-Instruct; prints one line per
check and exits non-zero on the first failure."""

import json
import sys
from typing import List, Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, Field

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
# `parse` left the beta namespace in newer clients; use whichever this one has.
parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse


class Address(BaseModel):
    city: str = Field(max_length=20)
    postal_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=130)
    role: Literal["customer", "agent", "manager"]
    address: Address
    tags: List[str] = Field(max_length=3)


for seed, text in [
    (1, "김민수 고객(42세)은 서울 06236에 삽니다. 정보를 정리해 주세요."),
    (2, "Extract: Jane Roe, 35, an agent from Boston 02108."),
]:
    r = parse(
        model=model,
        messages=[{"role": "user", "content": text}],
        response_format=Person,
        temperature=0.7,
        seed=seed,
        max_tokens=200,
    )
    p = r.choices[0].message.parsed
    assert isinstance(p, Person), r
    assert r.choices[0].finish_reason == "stop", r
    print("parse ok", p.model_dump_json())


class GetWeather(BaseModel):
    """Current weather for a city."""

    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]


tools = [openai.pydantic_function_tool(GetWeather)]
messages = [{"role": "user", "content": "What's the weather in Seoul? Use celsius."}]
r = parse(model=model, messages=messages, tools=tools, tool_choice="required", temperature=0, max_tokens=120)
msg = r.choices[0].message
assert r.choices[0].finish_reason == "tool_calls", r
call = msg.tool_calls[0]
assert call.function.name == "GetWeather", call
assert isinstance(call.function.parsed_arguments, GetWeather), call
print("tool call ok", call.function.arguments)

messages.append(msg)
messages.append(
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": -2, "sky": "snow"})}
)
r = client.chat.completions.create(model=model, messages=messages, tools=tools, temperature=0, max_tokens=60)
final = r.choices[0].message
assert not final.tool_calls and final.content, r
assert r.choices[0].finish_reason == "stop", r
print("round trip ok", final.content.replace("\n", " ")[:60])

calls = {}
finish = None
stream = client.chat.completions.create(
    model=model, messages=messages[:1], tools=tools, tool_choice="required", temperature=0,
    max_tokens=120, stream=True,
)
for chunk in stream:
    for c in chunk.choices:
        for tc in c.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            if tc.function.name:
                entry["name"] += tc.function.name
            if tc.function.arguments:
                entry["arguments"] += tc.function.arguments
        if c.finish_reason:
            finish = c.finish_reason
assert finish == "tool_calls", finish
assert calls and all(v["name"] == "GetWeather" for v in calls.values()), calls
for v in calls.values():
    GetWeather.model_validate_json(v["arguments"])
print("stream tool calls ok", len(calls))

try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 5}}},
    )
    sys.exit("no error for an invalid schema")
except openai.BadRequestError as e:
    assert "schema" in str(e), e
    print("bad schema ok")

print("ALL OK")
