"""The Anthropic Messages API (`POST /v1/messages`) through the official `anthropic` client against a live server:
tool-use round trips and thinking blocks from a `ScriptedModel` (streamed and not), the exact SSE event sequence,
stop sequences, system prompts, forced tool calls on a random checkpoint, x-api-key auth and Anthropic's error
shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from gemma4 import gemma4_checkpoint, scripted_pipeline
from serving import LiveServer
from test_chat import ARGS, TOOLS, weather_script

from dgemma.generate import Pipeline
from dgemma.server import create_app

KEY = "an-s3cret"
A_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def script(context: str) -> str:
    if "Speak like a pirate." in context:
        return "Arr, it be sunny."
    if "Count to four" in context:
        return "one two three four"
    return weather_script(context)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return scripted_pipeline(tmp_path_factory.mktemp("scripted"), script)


@pytest.fixture(scope="module")
def live(pipe):
    with LiveServer(create_app(pipe, model_id="g4")) as s:
        yield s


@pytest.fixture(scope="module")
def client(live):
    return anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0, timeout=120)


def _message(client, stream: bool, **kw) -> anthropic.types.Message:
    kw = {"model": "g4", "max_tokens": 256, "extra_body": {"seed": 3}, **kw}
    if not stream:
        return client.messages.create(**kw)
    with client.messages.stream(**kw) as s:
        for _ in s:
            pass
        return s.get_final_message()


def _round_trip(client, stream: bool, **kw) -> anthropic.types.Message:
    first = _message(client, stream, messages=ASK, tools=A_TOOLS, **kw)
    assert first.stop_reason == "tool_use" and first.stop_sequence is None
    use = first.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == ARGS and use.id.startswith("toolu_")
    messages = ASK + [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]},
    ]
    final = _message(client, stream, messages=messages, tools=A_TOOLS, **kw)
    assert final.stop_reason == "end_turn"
    assert [(b.type, b.text) for b in final.content] == [("text", "In Paris it is sunny, 21 C.")]
    usage = final.usage
    counted = client.messages.count_tokens(model="g4", messages=messages, tools=A_TOOLS, **kw).input_tokens
    assert usage.input_tokens + usage.cache_read_input_tokens == counted and usage.cache_read_input_tokens > 0
    assert usage.cache_creation_input_tokens == 0 and usage.output_tokens > 0
    return first


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_round_trip(client, stream):
    first = _round_trip(client, stream)
    assert [b.type for b in first.content] == ["text", "tool_use"] and first.content[0].text == "Let me check."
    assert first.id.startswith("msg_") and first.role == "assistant" and first.model == "g4"


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_arrives_in_its_own_block(client, stream):
    first = _round_trip(client, stream, thinking={"type": "enabled", "budget_tokens": 1024})
    thought, use = first.content
    assert thought.type == "thinking" and thought.thinking == "The user wants the weather; call the tool."
    assert thought.signature == "" and use.type == "tool_use"
    off = _message(client, stream, messages=ASK, tools=A_TOOLS, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text", "tool_use"]


def test_stream_events_in_anthropic_order(live):
    body = {"model": "g4", "max_tokens": 256, "messages": ASK, "tools": A_TOOLS, "stream": True}
    with httpx.stream("POST", live.url + "/v1/messages", json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = []
    for frame in raw.removesuffix("\n\n").split("\n\n"):
        (event, data) = frame.split("\n")
        kind, payload = event.removeprefix("event: "), json.loads(data.removeprefix("data: "))
        assert payload["type"] == kind
        events.append(payload)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    blocks = [e for e in events if e["type"].startswith("content_block")]
    assert [e["index"] for e in blocks] == sorted(e["index"] for e in blocks)  # one block after the other
    text = [e for e in blocks if e["index"] == 0]
    assert text[0] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert (
        "".join(e["delta"]["text"] for e in text[1:-1]) == "Let me check." and text[-1]["type"] == "content_block_stop"
    )
    start, delta, stop = [e for e in blocks if e["index"] == 1]
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    assert delta["delta"]["type"] == "input_json_delta" and json.loads(delta["delta"]["partial_json"]) == ARGS
    assert stop["type"] == "content_block_stop"
    final = events[-2]
    assert final["delta"] == {"stop_reason": "tool_use", "stop_sequence": None} and final["usage"]["output_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_system_prompt_and_stop_sequences(client, stream):
    out = _message(client, stream, system="Speak like a pirate.", messages=[{"role": "user", "content": "Weather?"}])
    assert out.content[0].text == "Arr, it be sunny." and out.stop_reason == "end_turn"
    blocks = [{"type": "text", "text": "Speak like "}, {"type": "text", "text": "a pirate."}]
    assert _message(client, stream, system=blocks, messages=ASK).content[0].text == "Arr, it be sunny."
    count = [{"role": "user", "content": [{"type": "text", "text": "Count to four"}]}]
    out = _message(client, stream, messages=count, stop_sequences=["four", "three"])
    assert (out.content[0].text, out.stop_reason, out.stop_sequence) == ("one two ", "stop_sequence", "three")
    out = _message(client, stream, messages=count, stop_sequences=["five"])
    assert (out.stop_reason, out.stop_sequence) == ("end_turn", None)
    out = _message(client, stream, messages=count, max_tokens=2)
    assert out.stop_reason == "max_tokens" and out.usage.output_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_choice_pins_a_valid_call(tmp_path_factory, stream):
    """A random model under tool_choice tool / any still produces a tool_use whose input validates."""
    import jsonschema

    pipe = Pipeline.load(
        gemma4_checkpoint(tmp_path_factory.mktemp("forced"), canvas_length=32), device="cpu", dtype="float32"
    )
    with LiveServer(create_app(pipe, model_id="g4")) as live:
        client = anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0, timeout=120)
        for choice in ({"type": "tool", "name": "get_weather"}, {"type": "any"}):
            out = _message(client, stream, messages=ASK, tools=A_TOOLS, tool_choice=choice)
            assert out.stop_reason == "tool_use", out
            (use,) = [b for b in out.content if b.type == "tool_use"]
            if choice["type"] == "any":
                assert use.name in ("get_weather", "get_time") and isinstance(use.input, dict)
            else:
                assert use.name == "get_weather"
                jsonschema.validate(use.input, A_TOOLS[0]["input_schema"])


def _error(exc: anthropic.APIStatusError, kind: str) -> str:
    assert exc.body["type"] == "error" and exc.body["error"]["type"] == kind, exc.body
    return exc.body["error"]["message"]


def test_x_api_key_auth(pipe):
    with LiveServer(create_app(pipe, model_id="g4", api_key=KEY)) as live:
        good = anthropic.Anthropic(base_url=live.url, api_key=KEY, max_retries=0, timeout=120)
        out = _message(good, False, messages=ASK)
        assert out.content[0].text.startswith("Let me check.")  # no tools declared: the call stays text
        bearer = anthropic.Anthropic(base_url=live.url, auth_token=KEY, max_retries=0, timeout=120)
        assert bearer.messages.count_tokens(model="g4", messages=ASK).input_tokens > 0
        with pytest.raises(anthropic.AuthenticationError) as e:
            _message(anthropic.Anthropic(base_url=live.url, api_key="wrong", max_retries=0), False, messages=ASK)
        assert "x-api-key" in _error(e.value, "authentication_error")
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}, {"x-api-key": KEY.upper()}):
                r = httpx.post(live.url + path, headers=headers, json={"model": "g4", "messages": ASK})
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
                assert r.json()["type"] == "error" and KEY not in r.text
        r = httpx.get(live.url + "/v1/models", headers={"x-api-key": "wrong"})  # other routes: OpenAI's shape
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(live.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
        r = httpx.post(live.url + "/v1/messages", headers={"x-api-key": KEY}, content=b"x" * (3 << 20))
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"max_tokens": anthropic.NOT_GIVEN}, "max_tokens"),
        ({"messages": [{"role": "system", "content": "Hi"}]}, "role must be user or assistant"),
        ({"extra_body": {"top_k": 5}}, "top_k"),
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"tools": A_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "not among the tools"),
        ({"tools": [{"name": "bad name!", "input_schema": {}}]}, "tools[0]"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}
                ]
            },
            "matches no earlier tool_use",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "not 'image'"),
        ({"messages": ASK + [{"role": "assistant", "content": "Sure"}]}, "prefilling"),
        ({"messages": []}, "messages must not be empty"),
        ({"stop_sequences": ["x"] * 9}, "stop"),
    ],
)
def test_bad_requests_get_anthropic_errors(client, change, words):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(**{"model": "g4", "max_tokens": 16, "messages": ASK, **change})
    assert e.value.status_code == 400 and words in _error(e.value, "invalid_request_error")


def test_unknown_model_and_raw_errors(client, live):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="nope", max_tokens=16, messages=ASK)
    _error(e.value, "not_found_error")
    for content in (b"{not json", b"[1, 2]"):
        r = httpx.post(live.url + "/v1/messages", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["type"] == "error", r.text
    r = httpx.get(live.url + "/v1/messages")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "nope", "messages": ASK})
    assert r.json()["error"]["code"] == "model_not_found"  # the OpenAI routes keep OpenAI's shape
