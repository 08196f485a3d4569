"""Schemathesis on the live /openapi.json of a server running the bundled model: every operation, positive and
negative data, zero 5xx and zero check failures (undocumented status codes or content types, bodies that violate
the documented schema, negative data accepted). The server caps max_tokens at one canvas and n at 2, and the
schema advertises those caps, so generated requests that generate stay cheap. Longer runs:
`scripts/schemathesis_campaign.py`."""

from __future__ import annotations

import pytest

pytest.importorskip("schemathesis")

from schema_fuzz import fuzz
from serving import LiveServer

from dgemma.generate import BUNDLED_MODEL, Pipeline
from dgemma.server import create_app

EXAMPLES = 12  # per operation and mode: ~200 requests, about a minute on 2 shared cores
GENERATING = ("POST /v1/completions", "POST /v1/chat/completions", "POST /v1/messages")


@pytest.fixture(scope="module")
def live():
    pipe = Pipeline.load(BUNDLED_MODEL, device="cpu")
    with LiveServer(create_app(pipe, max_tokens_cap=pipe.model.config.canvas_length, max_n=2)) as s:
        yield s


def test_schemathesis_finds_no_5xx_and_no_schema_violations(live):
    figures = fuzz(live.url, EXAMPLES)
    print({k: figures[k] for k in ("requests", "status", "seconds")})
    assert not [s for s in figures["status"] if s >= 500], figures["status"]
    assert not figures["failures"], "\n".join(map(str, figures["failures"]))
    assert len(figures["operations"]) == 8  # every documented operation ran
    reached = {op for op in GENERATING if figures["operations"][op].get("positive 200")}
    assert reached == set(GENERATING), figures["operations"]  # positive data reaches generation


def test_schema_documents_errors_and_the_served_model(live):
    import httpx

    schema = httpx.get(live.url + "/openapi.json").json()
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "422" not in codes and "400" in codes, (method, path)
            assert op["responses"]["200"]["content"]["application/json"]["schema"], (method, path)
            if method == "post":
                assert {"413", "415"} <= codes, path
    props = schema["components"]["schemas"]["ChatRequest"]["properties"]
    assert props["model"]["enum"] == ["dgemma-bundled"]
    assert props["max_tokens"]["anyOf"][0]["maximum"] == 32 and props["n"]["maximum"] == 2


def test_every_request_body_has_an_example_that_works(live):
    """The document shows one request per generating or counting operation, and the server answers it (so the docs
    and a fuzzer's explicit phase start from a request that reaches generation)."""
    import httpx

    schema = httpx.get(live.url + "/openapi.json").json()
    tried = []
    for path, ops in schema["paths"].items():
        body = ops.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json")
        if body is None:
            continue
        r = httpx.post(live.url + path, json=body["example"], timeout=120)
        assert r.status_code == 200, (path, r.text)
        tried.append(path)
    assert len(tried) == 5, tried
