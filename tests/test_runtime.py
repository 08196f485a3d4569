"""Process tuning: the allocator setting is applied once, can be switched off, and never changes results."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = "from dgemma.runtime import tune_allocator; print(tune_allocator(), tune_allocator())"


def run(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DGEMMA_MALLOC_TUNING"}
    if env_value is not None:
        env["DGEMMA_MALLOC_TUNING"] = env_value
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuning_is_on_by_default_and_can_be_switched_off():
    assert run(None).split() == ["True", "True"]  # applied once, the second call reports the first result
    assert run("0").split() == ["False", "False"]


def test_seeded_generation_is_the_same_with_and_without_tuning(tmp_path):
    code = (
        "from dgemma.generate import Pipeline; "
        "print(Pipeline.load(device='cpu').generate('In the beginning', seed=5, max_new_tokens=32).token_ids)"
    )
    outs = []
    for value in ("1", "0"):
        env = {**os.environ, "DGEMMA_MALLOC_TUNING": value}
        outs.append(
            subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        )
    assert outs[0] == outs[1] and outs[0].startswith("[")
