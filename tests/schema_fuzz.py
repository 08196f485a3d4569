"""Schemathesis against a live dgemma server, shared by `test_schema.py` (small budget) and
`scripts/schemathesis_campaign.py` (long runs): every operation of the live `/openapi.json`, positive and negative
data (NUL characters allowed), each answer checked for 5xx, undocumented status codes, content types and headers,
schema-violating bodies, and negative data that was accepted. Returns counts, not assertions, so a campaign can
report them."""

# ruff: noqa: B023
from __future__ import annotations

import collections
import time

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def fuzz(url: str, examples: int, *, seed: int = 0, timeout: float = 120, headers: dict | None = None) -> dict:
    """Run `examples` generated cases per operation and mode against the server at `url`; return the figures:
    requests, status counts (overall and per operation), failures (operation, mode, message) and how many
    generated requests reached generation (a 200 from a generating route)."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    schema.config.generation.update(allow_x00=True, deterministic=True)
    out = {"requests": 0, "status": collections.Counter(), "operations": {}, "failures": [], "skipped": []}
    out["rejected"] = collections.Counter()  # (operation, message) of positive cases the server refused
    session = requests.Session()
    start = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        counts = out["operations"].setdefault(label, collections.Counter())
        for mode in MODES:

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )
            @given(op.as_strategy(generation_mode=mode))
            def run(case) -> None:  # called at once, inside its own iteration (hence the file's B023 waiver)
                response = case.call(base_url=url, session=session, timeout=timeout, headers=headers)
                out["requests"] += 1
                out["status"][response.status_code] += 1
                counts[f"{mode.value} {response.status_code}"] += 1
                if mode is GenerationMode.POSITIVE and response.status_code == 400:
                    out["rejected"][(label, _message(response))] += 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as e:  # noqa: BLE001 - schemathesis' FailureGroup: one entry per failed check
                    out["failures"].append((label, mode.value, response.status_code, _describe(e, case)))

            try:
                run()
            except Unsatisfiable as e:  # no negative data exists for an operation without inputs
                out["skipped"].append((label, mode.value, type(e).__name__))
    out["seconds"] = round(time.monotonic() - start, 1)
    out["status"] = dict(sorted(out["status"].items()))
    out["operations"] = {k: dict(sorted(v.items())) for k, v in out["operations"].items()}
    return out


def _message(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:80]
    return str(body.get("error", {}).get("message", body))[:80]


def _describe(exc: Exception, case) -> str:
    parts = [str(e) for e in getattr(exc, "exceptions", [exc])]
    body = repr(case.body)[:300]
    return " | ".join(p[:400] for p in parts) + f" | body={body}"
