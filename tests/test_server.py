"""The OpenAI-compatible server over real HTTP (uvicorn on a loopback port, engine thread, tiny checkpoint):
the official `openai` client, raw SSE framing, batching vs solo parity, early settlement, disconnects, overload,
auth and the error contract (OpenAI error shape, always 4xx for bad input)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from serving import CANVAS, LiveServer, children, server_checkpoint

from dgemma.cli import main
from dgemma.generate import Pipeline
from dgemma.server import create_app

MODEL = "tiny"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return Pipeline.load(server_checkpoint(tmp_path_factory.mktemp("server_ckpt")), device="cpu")


@pytest.fixture(scope="module")
def live(pipeline):
    with LiveServer(create_app(pipeline, model_id=MODEL, max_batch=8)) as s:
        yield s


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


def sse(resp: httpx.Response) -> list[tuple[str, str]]:
    """(event, data) per SSE frame; checks the framing: every frame ends with a blank line."""
    raw = resp.read().decode()
    assert raw.endswith("\n\n")
    frames = []
    for frame in raw[:-2].split("\n\n"):
        event, data = "message", []
        for line in frame.split("\n"):
            key, _, value = line.partition(": ")
            assert key in ("event", "data"), line
            if key == "event":
                event = value
            else:
                data.append(value)
        frames.append((event, "\n".join(data)))
    return frames


def stream(http: httpx.Client, path: str, body: dict) -> list[tuple[str, str]]:
    with http.stream("POST", path, json={"model": MODEL, "stream": True, **body}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return sse(resp)


def chunks(frames) -> list[dict]:
    assert frames[-1] == ("message", "[DONE]")
    return [json.loads(d) for e, d in frames[:-1] if e == "message"]


def solo_text(pipeline, prompt: str, seed: int, max_tokens: int, **knobs) -> str:
    """The reference: Pipeline.generate on one request, cut to max_tokens."""
    r = pipeline.generate(prompt, seed=seed, max_new_tokens=max_tokens, **knobs)
    return pipeline.tokenizer.decode(r.token_ids[:max_tokens])


def error(resp: httpx.Response, status: int, param=None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


# --- the openai client --------------------------------------------------------------------------------------------
def test_models_and_health(client, http):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["auth"] is False
    assert {"active", "queued", "alive"} <= set(health["engine"])


def test_completion_matches_generate(client, pipeline):
    r = client.completions.create(model=MODEL, prompt="In the beginning", max_tokens=20, seed=5)
    choice = r.choices[0]
    assert choice.text == solo_text(pipeline, "In the beginning", 5, 20)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 20 and r.usage.prompt_tokens == len(pipeline.prompt_ids("In the beginning"))
    extra = choice.model_extra["dgemma"]
    assert extra["seed"] == 5 and all(1 <= s <= 6 for s in extra["steps_per_canvas"])
    assert extra["tokens_per_forward"] == pytest.approx(r.usage.completion_tokens / extra["forward_passes"], 1e-3)


def test_chat_stream_equals_non_stream(client):
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 40, "seed": 11}
    full = client.chat.completions.create(**kw)
    pieces, usage, finish = [], None, None
    for ch in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    # deltas are append-only; with this random model nothing settles early, so the text is the reference's
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason and usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_with_openai_client(client):
    kw = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "seed": 3}
    full = client.completions.create(**kw).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(parts) == full


def test_n_choices_use_consecutive_seeds(client, pipeline):
    r = client.completions.create(model=MODEL, prompt="The river", max_tokens=16, seed=40, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.model_extra["dgemma"]["seed"] == 40 + c.index
        assert c.text == solo_text(pipeline, "The river", 40 + c.index, 16)


def test_knobs_are_applied(client):
    r = client.completions.create(model=MODEL, prompt="A", max_tokens=16, seed=1, extra_body={"steps": 2})
    assert r.choices[0].model_extra["dgemma"]["steps_per_canvas"] == [2]


# --- raw SSE ------------------------------------------------------------------------------------------------------
def test_sse_framing_chat(http):
    frames = stream(
        http,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 20,
            "seed": 2,
            "stream_options": {"include_usage": True},
        },
    )
    cs = chunks(frames)
    assert len({c["id"] for c in cs}) == 1 and all(c["object"] == "chat.completion.chunk" for c in cs)
    assert all(c["model"] == MODEL and isinstance(c["created"], int) for c in cs)
    assert cs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finals = [c for c in cs if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["delta"] == {}
    assert set(finals[0]["choices"][0]["dgemma"]) >= {"steps_per_canvas", "tokens_per_forward", "seed"}
    assert cs[-1]["choices"] == [] and cs[-1]["usage"]["completion_tokens"] <= 20  # usage chunk last
    assert all(c["usage"] is None for c in cs[:-1])


def test_sse_framing_completions_without_usage(http):
    cs = chunks(stream(http, "/v1/completions", {"prompt": "Hi", "max_tokens": 8, "seed": 2}))
    assert all(c["object"] == "text_completion" and "usage" not in c for c in cs)
    assert cs[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_draft_events(http):
    frames = stream(
        http,
        "/v1/completions",
        {
            "prompt": "Hi",
            "max_tokens": 2 * CANVAS,
            "seed": 9,
            "steps": 4,
            "stream_options": {"include_draft": True},
        },
    )
    drafts = [json.loads(d)["dgemma_draft"] for e, d in frames if e == "draft"]
    assert drafts and all(len(d["tokens"]) == len(d["pieces"]) == len(d["entropy"]) == CANVAS for d in drafts)
    assert [(d["canvas"], d["step"]) for d in drafts][:4] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert len({tuple(d["tokens"]) for d in drafts}) >= 2
    assert all(isinstance(a, bool) for d in drafts for a in d["accepted"])


def test_settled_text_streams_within_a_canvas(http, pipeline):
    """settle_steps=1 settles every position at the canvas's first step: its text is sent before the canvas's
    later steps run, and the commit keeps exactly what was sent (pinning)."""
    frames = stream(
        http,
        "/v1/completions",
        {
            "prompt": "The sea",
            "max_tokens": 2 * CANVAS,
            "seed": 4,
            "steps": 5,
            "stream_options": {"include_draft": True, "settle_steps": 1, "settle_entropy": 1e6},
        },
    )
    order = [
        ("draft", json.loads(d)["dgemma_draft"]) if e == "draft" else ("chunk", json.loads(d)) for e, d in frames[:-1]
    ]
    first_text = next(i for i, (k, c) in enumerate(order) if k == "chunk" and c["choices"][0]["text"])
    later_steps = [i for i, (k, d) in enumerate(order) if k == "draft" and d["canvas"] == 0 and d["step"] >= 2]
    assert later_steps and first_text < later_steps[0]  # text arrived within canvas 0, before its commit
    canvas0 = next(d["tokens"] for k, d in order if k == "draft" and d["step"] == 1)
    sent = order[first_text][1]["choices"][0]["text"]
    if 1 in canvas0:  # EOS: the canvas (and the generation) ends there
        assert sent == pipeline.tokenizer.decode(canvas0[: canvas0.index(1) + 1])
    else:  # all of it, bar a character the next canvas may complete
        assert sent == pipeline.tokenizer.decode(canvas0).rstrip("\ufffd")


def test_stop_strings(client, http, pipeline):
    full = client.completions.create(model=MODEL, prompt="In the beginning", max_tokens=32, seed=8).choices[0].text
    words = [w for w in full.split(" ") if len(w) >= 2 and full.find(w) > 0]
    if not words:
        pytest.skip("random output without a usable stop string")
    stop = words[len(words) // 2]
    expect = full[: full.find(stop)]
    r = client.completions.create(model=MODEL, prompt="In the beginning", max_tokens=32, seed=8, stop=[stop, "zzzz"])
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    cs = chunks(
        stream(http, "/v1/completions", {"prompt": "In the beginning", "max_tokens": 32, "seed": 8, "stop": stop})
    )
    assert "".join(c["choices"][0]["text"] for c in cs) == expect
    assert cs[-1]["choices"][0]["finish_reason"] == "stop"


# --- batching, cancellation, overload -----------------------------------------------------------------------------
def test_concurrent_requests_match_solo(client, live, pipeline):
    reqs = [(f"{'Some prompt ' * (i + 1)}number {i}", 100 + i, 16 * (1 + i % 3), 4 + i % 3) for i in range(6)]

    def run(req):
        prompt, seed, max_tokens, steps = req
        r = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, seed=seed, extra_body={"steps": steps}
        )
        return r.choices[0].text

    before = live.engine.counters["peak_batch"]
    live.engine.counters["peak_batch"] = 0
    with ThreadPoolExecutor(len(reqs)) as pool:
        batched = list(pool.map(run, reqs))
    assert live.engine.counters["peak_batch"] >= 2  # they really shared steps
    live.engine.counters["peak_batch"] = max(before, live.engine.counters["peak_batch"])
    solo = [solo_text(pipeline, p, s, m, steps=k) for p, s, m, k in reqs]
    assert batched == solo
    assert [run(r) for r in reqs[:2]] == solo[:2]  # and through the server one at a time


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


LONG = {"prompt": "Long", "max_tokens": 8 * CANVAS, "steps": 4 * CANVAS, "confidence_threshold": 1e-30}


def test_stream_disconnect_drops_work(live):
    body = {"model": MODEL, "stream": True, **LONG, "stream_options": {"include_draft": True}}
    with httpx.Client(base_url=live.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert any(line.startswith("event: draft") for line, _ in zip(lines, range(50)))
        assert live.engine.stats()["active"] == 1
    t0 = time.monotonic()
    wait_for(lambda: live.engine.stats()["active"] == 0, timeout=5)
    assert time.monotonic() - t0 < 2


def test_non_stream_disconnect_drops_work(live, monkeypatch):
    """A client that times out is gone; its work leaves the batch. Steps are held until then, so the tiny model
    cannot finish first."""
    import dgemma.engine

    real, go = dgemma.engine.denoise_step, threading.Event()
    monkeypatch.setattr(dgemma.engine, "denoise_step", lambda model, gens: go.wait(30) and real(model, gens))
    outcome = []

    def slow_request():
        try:
            httpx.post(live.url + "/v1/completions", json={"model": MODEL, **LONG}, timeout=1.0)
        except httpx.ReadTimeout as e:
            outcome.append(e)

    t = threading.Thread(target=slow_request)
    t.start()
    wait_for(lambda: live.engine.stats()["active"] == 1)
    t.join()
    assert outcome  # the client gave up and closed the connection
    wait_for(lambda: live.engine.stats()["active"] == 0, timeout=5)  # marked cancelled
    go.set()
    wait_for(lambda: live.engine.idle(), timeout=5)


def test_queue_full_is_503_with_retry_after(pipeline, monkeypatch):
    import dgemma.engine

    real, go = dgemma.engine.denoise_step, threading.Event()  # steps held: the tiny model cannot finish first
    monkeypatch.setattr(dgemma.engine, "denoise_step", lambda model, gens: go.wait(30) and real(model, gens))
    app = create_app(pipeline, model_id=MODEL, max_batch=1, max_queue=1)
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        body = {"model": MODEL, "stream": True, **LONG}
        with c.stream("POST", "/v1/completions", json=body) as first:
            wait_for(lambda: s.engine.stats()["active"] == 1)
            with c.stream("POST", "/v1/completions", json=body) as second:
                wait_for(lambda: s.engine.stats()["queued"] == 1)
                third = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
                err = error(third, 503)
                assert third.headers["retry-after"] == "1" and err["code"] == "server_overloaded"
                assert c.get("/health").status_code == 200  # health answers while saturated
                assert first.status_code == second.status_code == 200
        go.set()
        wait_for(lambda: s.engine.stats()["active"] == s.engine.stats()["queued"] == 0, timeout=5)
        ok = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
        assert ok.status_code == 200  # the next request succeeds


def test_engine_failure_mid_stream_is_an_error_event(pipeline, monkeypatch):
    with LiveServer(create_app(pipeline, model_id=MODEL)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        calls = []

        def failing_step(model, gens):
            calls.append(1)
            raise RuntimeError("injected fault")

        monkeypatch.setattr("dgemma.engine.denoise_step", failing_step)
        with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}) as resp:
            frames = sse(resp)
        assert calls and frames[-1] == ("message", "[DONE]")  # the error event, then [DONE]
        assert json.loads(frames[-2][1])["error"]["type"] == "server_error"  # never a silently truncated stream
        error(c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 500)
        monkeypatch.undo()
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4}).status_code == 200
        s.engine.stop()
        assert c.get("/health").status_code == 503  # health reflects the generation loop, not just HTTP
        assert (
            error(c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 503)["code"] == "engine_unavailable"
        )


# --- the error contract -------------------------------------------------------------------------------------------
BAD_BODIES = [
    ("max_tokens", {"max_tokens": "5"}),
    ("max_tokens", {"max_tokens": 1.5}),
    ("max_tokens", {"max_tokens": True}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -3}),
    ("max_tokens", {"max_tokens": 2**63}),
    ("n", {"n": 0}),
    ("n", {"n": 9}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": "x"}),
    ("seed", {"seed": 2**64}),
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
    ("stop", {"stop": ""}),
    ("stop", {"stop": [1]}),
    ("stop", {"stop": "x" * 300}),
    ("stream", {"stream": "yes"}),
    ("steps", {"steps": 0}),
    ("steps", {"steps": 5000}),
    ("entropy_bound", {"entropy_bound": -1.0}),
    (None, {"t_min": 0.9, "t_max": 0.5}),
    ("temperature", {"temperature": 2.5}),
    ("top_p", {"top_p": 0}),
    ("logprobs", {"logprobs": 2}),
    ("echo", {"echo": True}),
    ("suffix", {"suffix": 5}),
    ("best_of", {"best_of": 2}),
    ("logit_bias", {"logit_bias": {"5": 10}}),
    ("presence_penalty", {"presence_penalty": 1.0}),
    ("chat_template", {"chat_template": "{{ 7 * 7 }}"}),
    ("chat_template_kwargs", {"chat_template_kwargs": {}}),
    ("prompt", {"prompt": ""}),
    ("prompt", {"prompt": "   "}),
    ("prompt", {"prompt": []}),
    ("prompt", {"prompt": [5, -1]}),
    ("prompt", {"prompt": [5, 10**6]}),
    ("prompt", {"prompt": ["a", "b"]}),
    ("prompt", {"prompt": "bad \ud800 surrogate"}),
    ("prompt", {"prompt": {"text": "x"}}),
    ("stream_options", {"stream_options": {"include_usage": 1}}),
]


@pytest.mark.parametrize("param, fields", BAD_BODIES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD_BODIES)])
def test_bad_completion_fields_are_400(http, param, fields):
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 8, **fields})  # ASCII: \ud800 stays escaped
    error(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 400, param)


BAD_CHAT = [
    ("messages", {"messages": []}),
    ("messages[0]", {"messages": [{"role": "wizard", "content": "x"}]}),
    ("messages[0]", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("messages[0]", {"messages": [{"role": "user", "content": None}]}),
    ("messages", {"messages": "hi"}),
    ("messages[0]", {"messages": [{"role": "user", "content": 5}]}),
    ("tools[0]", {"tools": [{"type": "function"}]}),
    ("tools[0]", {"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
    ("tool_choice", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}),
    (
        "tool_choice",
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
    ),
    (
        "messages[1]",
        {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1", "tool_call_id": "nope"}]},
    ),
    (
        "messages[0].tool_calls[0]",
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{bad"}}],
                }
            ]
        },
    ),
    ("reasoning_effort", {"reasoning_effort": "extreme"}),
    ("tool_choice", {"tool_choice": "auto"}),
    ("response_format", {"response_format": {"type": "yaml"}}),
    ("top_logprobs", {"top_logprobs": 3}),
    ("logprobs", {"logprobs": True}),
    ("max_completion_tokens", {"max_completion_tokens": 0}),
]


@pytest.mark.parametrize("param, fields", BAD_CHAT, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD_CHAT)])
def test_bad_chat_fields_are_400(http, param, fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, **fields}
    error(http.post("/v1/chat/completions", json=body), 400, param)


def test_chat_accepts_text_parts_and_special_strings(client):
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=8,
        seed=1,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "<|turn>user\n<eos><turn|>"}]},
        ],
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 12  # the control strings were encoded as plain text, not single ids


@pytest.mark.parametrize("raw", [b"{bad json", b'{"model": "tiny", "prompt": "x"', b"[]", b"null", b"\xff\xfe"])
def test_invalid_json_is_400_not_422(http, raw):
    error(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)


def test_unknown_model_is_404(http):
    for name in ("other", "../../etc/passwd", "x" * 10_000):
        err = error(http.post("/v1/completions", json={"model": name, "prompt": "x"}), 404, "model")
        assert err["code"] == "model_not_found" and name[:20] not in err["message"]
    error(http.get("/v1/models/other"), 404)


def test_context_length(http, pipeline):
    long_ids = [7] * 250  # the context is 256 positions, a canvas is 16
    err = error(http.post("/v1/completions", json={"model": MODEL, "prompt": long_ids, "max_tokens": 1}), 400)
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    err = error(http.post("/v1/completions", json={"model": MODEL, "prompt": [7] * 200, "max_tokens": 50}), 400)
    assert err["code"] == "context_length_exceeded" and "64" in err["message"]  # 50 rounds up to 4 canvases
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": [7] * 230, "seed": 1}).json()
    assert r["usage"]["completion_tokens"] <= 16  # default max_tokens: the room left, whole canvases


def test_routes_and_methods(http):
    error(http.get("/v1/nothing"), 404)
    error(http.get("/v1/completions"), 405)
    schema = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(schema["paths"])
    assert http.get("/").headers["content-type"].startswith("text/html")
    assert "access-control-allow-origin" not in http.options("/v1/models").headers


def test_body_limit_is_413(http):
    big = {"model": MODEL, "prompt": "x" * (2 * 1024 * 1024 + 10)}
    error(http.post("/v1/completions", json=big), 413)

    def chunked():
        for _ in range(300):
            yield b"x" * 10_000

    error(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)


def test_odd_text_and_huge_headers(http):
    r = http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "a\x00b\ufeff\u202e" + "\u0301" * 50, "max_tokens": 4}
    )
    assert r.status_code == 200  # NUL, BOM, RTL override, combining marks: just text
    try:
        status = http.get("/health", headers={"x-big": "a" * 1_000_000}).status_code
    except httpx.TransportError:
        status = None  # the HTTP layer may drop the connection instead of answering
    assert status in (None, 400, 431)
    assert http.get("/health").status_code == 200


def test_loopback_bind_rejects_foreign_host_header(http):
    for host in ("evil.example", "evil.example:80", "localhost/v1/models?", "127.0.0.1.evil.example"):
        error(http.get("/v1/models", headers={"host": host}), 400)
    assert http.get("/v1/models", headers={"host": "localhost"}).status_code == 200


@pytest.fixture(scope="module")
def secured(pipeline):
    with LiveServer(create_app(pipeline, model_id=MODEL, api_key=KEY)) as s:
        yield s


def test_api_key_on_every_route(secured):
    protected = [r.path for r in secured.app.routes if r.path not in ("/health", "/")]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/openapi.json", "/metrics", "/docs"} <= set(
        protected
    )
    with httpx.Client(base_url=secured.url, timeout=60) as c:
        for path in protected:
            if path.startswith("/v1/messages"):
                continue  # Anthropic's error shape there: tests/test_anthropic.py::test_x_api_key_auth
            path = path.replace("{model}", MODEL)
            for headers in (
                {},
                {"authorization": "Bearer wrong"},
                {"authorization": KEY},
                {"authorization": "Bearer " + KEY.upper()},
                {"authorization": "Bearer " + "k" * 5000},
            ):
                err = error(c.get(path, headers=headers), 401)
                assert err["type"] == "authentication_error" and KEY not in json.dumps(err)
        error(c.get("/v1/models?api_key=" + KEY), 401)
        error(c.options("/v1/models", headers={"origin": "http://evil.example"}), 401)
        assert c.get("/health").json()["auth"] is True
        assert c.get("/").status_code == 200
        assert c.get("/v1/models", headers={"authorization": "bearer " + KEY}).status_code == 200
    good = openai.OpenAI(base_url=secured.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=4, seed=1).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.url + "/v1", api_key="nope", max_retries=0).models.list()


# --- `dgemma serve` refusals (no weights are loaded) ----------------------------------------------------------------
def test_serve_refuses_open_network_without_key(capsys, monkeypatch):
    monkeypatch.delenv("DGEMMA_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_serve_reports_busy_port(live, capsys, tmp_path):
    assert main(["serve", "--port", str(live.port), "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot listen") and "Traceback" not in err


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to count the server's processes")
def test_serve_processes_share_one_port_with_identical_results(pipeline):
    """`dgemma serve --processes 2`: two spawned server processes on one socket; seeded results are those of a
    single process (each process batches its own requests, batch invariance does the rest)."""
    cmd = [
        sys.executable,
        "-m",
        "dgemma",
        "serve",
        "--model",
        str(pipeline.model_dir),
        "--port",
        "0",
        "--model-id",
        MODEL,
        "--processes",
        "2",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "(2 processes)" in line, line
        url = re.search(r" on (http://[^\s/]+)", line).group(1)
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        wait_for(lambda: _healthy(url), timeout=120)
        wait_for(lambda: len([k for k in children(proc.pid) if _is_python(k)]) >= 2, timeout=60)
        reqs = [(f"Prompt {i} " * (i + 1), 40 + i, 16 * (1 + i % 2)) for i in range(6)]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def run(req):
            prompt, seed, max_tokens = req
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, seed=seed)
            return r.choices[0].text

        with ThreadPoolExecutor(len(reqs)) as pool:
            served = list(pool.map(run, reqs))
        assert served == [solo_text(pipeline, p, s, m) for p, s, m in reqs]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _is_python(pid: int) -> bool:
    try:
        return "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def test_inbox_keeps_tokens_and_coalesces_unread_drafts():
    """A slow reader: many steps' drafts arrive before it reads; it gets every token event in order and only the
    newest draft between two of them, so memory is bounded by tokens, not steps."""
    from dgemma.frontend import Inbox
    from dgemma.generate import SettleEvent, StepEvent

    def draft(step: int) -> StepEvent:
        return StepEvent(0, step, [step] * 4, [step] * 4, [True] * 4, [0.0] * 4, 0.0)

    async def scenario():
        inbox = Inbox(asyncio.get_running_loop())
        deliver0, deliver1 = inbox.deliver_to(0), inbox.deliver_to(1)
        for step in range(1, 101):  # from the engine thread's side
            deliver0(draft(step))
            deliver1(draft(1000 + step))
            if step in (40, 80):
                deliver0(SettleEvent(0, [step]))
        await asyncio.sleep(0)  # let the loop run the call_soon_threadsafe callbacks
        assert inbox.qsize() == 6  # choice 0: draft, tokens, draft, tokens, draft; choice 1: one draft
        got = [await inbox.get() for _ in range(inbox.qsize())]
        seen0 = [(type(ev).__name__, ev.step if isinstance(ev, StepEvent) else ev.token_ids) for i, ev in got if i == 0]
        assert seen0 == [
            ("StepEvent", 40),
            ("SettleEvent", [40]),
            ("StepEvent", 80),
            ("SettleEvent", [80]),
            ("StepEvent", 100),
        ]
        assert [ev.step for i, ev in got if i == 1] == [1100]
        deliver0(draft(101))  # a read draft is never rewritten: a new one is queued
        await asyncio.sleep(0)
        assert (await inbox.get())[1].step == 101

    asyncio.run(scenario())


@pytest.mark.parametrize("flag", [["--processes", "0"], ["--processes", "two"], ["--threads", "-1"]])
def test_serve_bad_process_flags_are_one_line_errors(flag, capsys):
    assert main(["serve", "--port", "0", *flag]) == 2
    err = capsys.readouterr().err
    assert flag[0] in err and "Traceback" not in err


# --- pins over HTTP: infill (suffix), structured output, edits ------------------------------------------------------
def test_completion_suffix_is_infill(client, http, pipeline):
    kw = {"model": MODEL, "prompt": "The old city", "suffix": " of the hills.", "max_tokens": 8, "seed": 3}
    want = pipeline.infill("The old city", " of the hills.", max_fill=8, seed=3)
    r = client.completions.create(**kw)
    choice = r.choices[0]
    assert choice.text == want.text and choice.finish_reason == "stop"
    assert choice.model_extra["dgemma"]["infill"]["length"] == want.length == r.usage.completion_tokens
    assert [c["length"] for c in choice.model_extra["dgemma"]["infill"]["candidates"]] == [
        c["length"] for c in want.candidates
    ]
    cs = chunks(stream(http, "/v1/completions", {k: v for k, v in kw.items() if k != "model"}))
    assert "".join(c["choices"][0]["text"] for c in cs) == want.text
    assert cs[-1]["choices"][0]["finish_reason"] == "stop"
    two = client.completions.create(**kw, extra_body={"fill_lengths": [2, 5]})
    assert [c["length"] for c in two.choices[0].model_extra["dgemma"]["infill"]["candidates"]] == [2, 5]
    assert two.choices[0].text == pipeline.infill("The old city", " of the hills.", lengths=[2, 5], seed=3).text


def test_suffix_after_a_trailing_space_is_not_doubled(client, pipeline):
    r = client.completions.create(model=MODEL, prompt="The old city ", suffix=" hills.", max_tokens=6, seed=4)
    want = pipeline.infill("The old city ", " hills.", max_fill=6, seed=4)
    assert r.choices[0].text == want.text and not want.text.startswith(" ")


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["age"]},
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "score": {"type": "number"},
            "kind": {"enum": ["cat", "dog", 3, None]},
            "inner": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}},
            "list": {"type": "array", "items": {"$ref": "#/$defs/pt"}, "minItems": 1, "maxItems": 1},
        },
        "required": ["ok", "inner"],
        "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "null"}}}},
    },
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["flat", "nested"])
def test_response_format_json_schema_always_validates(client, schema):
    import jsonschema

    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe it."}], response_format=rf, seed=seed
        )
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop"
        c = client.completions.create(model=MODEL, prompt="A record:", extra_body={"response_format": rf}, seed=seed)
        jsonschema.validate(json.loads(c.choices[0].text), schema)
    parts = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Again."}], response_format=rf, seed=7, stream=True
    )
    jsonschema.validate(json.loads("".join(p.choices[0].delta.content or "" for p in parts if p.choices)), schema)


def test_response_format_json_object(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
        seed=2,
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_response_format_errors_name_the_problem(http):
    def post(rf, **more):
        return http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": rf, **more},
        )

    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}}}
    body = error(post({"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}), 400, "response_format")
    assert "pattern" in body["message"] and body["code"] == "unsupported_schema"
    ok = {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object", "properties": {}}}}
    assert "too small" in error(post(ok, max_tokens=1), 400, "max_tokens")["message"]
    error(post(ok, stop=["}"]), 400, "stop")
    error(post({"type": "json_schema"}), 400, "response_format")


def test_edits_endpoint_matches_pipeline_edit(http, pipeline):
    text = "In the beginning the earth was empty.\nThen light came.\nAnd it was good.\n"
    body = {"model": MODEL, "text": text, "start": 17, "end": 26, "seed": 5}
    r = http.post("/v1/edits", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    want = pipeline.edit(text, 17, 26, seed=5)
    assert got["text"] == want.text and got["replacement"] == want.replacement
    assert got["text"].startswith(text[:17]) and got["text"].endswith(text[26:])
    by_lines = http.post("/v1/edits", json={"model": MODEL, "text": text, "lines": "2-2", "seed": 5}).json()
    head, tail = text.split("\n")[0] + "\n", "\n" + text.split("\n", 2)[2]
    assert by_lines["text"].startswith(head) and by_lines["text"].endswith(tail)
    frames = stream(
        http,
        "/v1/edits",
        {**{k: v for k, v in body.items() if k != "model"}, "stream_options": {"include_draft": True}},
    )
    drafts = [json.loads(d)["dgemma_draft"] for e, d in frames if e == "draft"]
    assert drafts and all(any(d["fixed"]) for d in drafts)  # the text after the span is pinned
    final = chunks(frames)[-1]
    assert final["object"] == "edit.chunk" and final["text"] == got["text"]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"start": 5, "end": 500}, "end"),
        ({"start": 9, "end": 3}, "end"),
        ({"lines": "7-9"}, "lines"),
        ({"lines": "x"}, "lines"),
        ({"lines": "1-\u00b2"}, "lines"),
        ({"lines": "1-1", "start": 0, "end": 1}, "lines"),
        ({}, "start"),
        ({"start": 0, "end": 2, "n": 2}, "n"),
        ({"start": 0, "end": 2, "fill_lengths": [0]}, "fill_lengths"),
    ],
)
def test_bad_edits_are_400(http, fields, param):
    error(http.post("/v1/edits", json={"model": MODEL, "text": "one\ntwo\n", **fields}), 400, param)


@pytest.mark.parametrize("max_tokens", [1, 3, CANVAS + 1])
def test_no_client_gets_more_tokens_than_asked(client, pipeline, max_tokens):
    r = client.completions.create(model=MODEL, prompt="The", max_tokens=max_tokens, seed=9)
    assert r.usage.completion_tokens <= max_tokens
    parts = list(
        client.completions.create(
            model=MODEL,
            prompt="The",
            max_tokens=max_tokens,
            seed=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert parts[-1].usage.completion_tokens <= max_tokens
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text


def test_caps_apply_to_what_the_client_asked(pipeline):
    """--max-tokens caps the fill, not the pinned suffix; a schema too long for it names response_format; a request
    that needs more generations than one request may queue (--max-queue) is a 400, not a 503 that retrying can
    never fix."""
    app = create_app(pipeline, model_id=MODEL, max_tokens_cap=8, max_queue=6)
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        ok = c.post(
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": "The",
                "suffix": " end of it all, and more.",
                "fill_lengths": None,
                "max_tokens": 4,
            },
        )
        assert ok.status_code == 200, ok.text
        schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}
        rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": rf}
        assert "caps max_tokens" in error(c.post("/v1/chat/completions", json=body), 400, "response_format")["message"]
        many = c.post("/v1/completions", json={"model": MODEL, "prompt": "The", "suffix": " end.", "max_tokens": 8})
        assert "the 6 one request may queue" in error(many, 400, "n")["message"]


def test_malformed_schemas_are_400_not_500(http):
    for schema in ({"type": "integer", "minimum": None}, {"type": "object", "additionalProperties": 5}):
        rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        body = {"model": MODEL, "prompt": "hi", "response_format": rf}
        assert (
            "not valid JSON Schema" in error(http.post("/v1/completions", json=body), 400, "response_format")["message"]
        )


def test_clients_that_send_temperature_and_top_p_get_answers(client, pipeline):
    """Open WebUI, LangChain and LiteLLM send these on every request: they scale the sampler's schedule and cut
    each position's sample; temperature 0 is deterministic even without a seed."""
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0.7, top_p=0.9, max_tokens=8, seed=3
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (
        r.choices[0].message.content
        == pipeline.generate(
            messages=[{"role": "user", "content": "Hi"}], temperature=0.7, top_p=0.9, max_new_tokens=8, seed=3
        ).text
    )
    zero = [
        client.completions.create(model=MODEL, prompt="The", temperature=0, max_tokens=8).choices[0].text
        for _ in range(2)
    ]
    assert zero[0] == zero[1] == pipeline.generate("The", temperature=0, max_new_tokens=8).text


def test_metrics_and_docs(client, http):
    client.completions.create(model=MODEL, prompt="Count me", max_tokens=4, seed=2)
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {line.split()[0]: float(line.split()[1]) for line in r.text.splitlines() if not line.startswith("#")}
    assert values["dgemma_engine_up"] == 1 and values["dgemma_requests_finished_total"] >= 1
    assert values["dgemma_generated_tokens_total"] >= 1 and values["dgemma_denoise_steps_total"] >= 1
    assert values["dgemma_time_to_first_token_seconds_count"] >= 1
    assert "# TYPE dgemma_requests_active gauge" in r.text
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
