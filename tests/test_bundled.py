"""The bundled model ships with the package, loads through the normal loader and generates deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgemma.generate import BUNDLED_MODEL, Pipeline

GOLDEN = Path(__file__).parent / "golden" / "bundled.json"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(device="cpu", dtype="float32")


def test_bundled_files_present():
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (BUNDLED_MODEL / name).is_file(), name
    assert (BUNDLED_MODEL / "model.safetensors").stat().st_size <= 25 * 1024 * 1024


def test_bundled_golden_outputs(pipe):
    """Golden outputs are regenerated only by scripts/make_golden.py."""
    for case in json.loads(GOLDEN.read_text()):
        knobs = {k: v for k, v in case.items() if k in ("seed", "max_new_tokens", "steps")}
        r = pipe.generate(case["prompt"], **knobs)
        assert r.token_ids == case["token_ids"], case["prompt"]
        assert r.text == case["text"]
        assert r.steps_per_canvas == case["steps_per_canvas"]


def test_bundled_generates_text(pipe):
    r = pipe.generate("And God said,", seed=5, max_new_tokens=pipe.model.config.canvas_length)
    assert len(r.text.split()) >= 3
    assert r.finish_reason in ("stop", "length")
