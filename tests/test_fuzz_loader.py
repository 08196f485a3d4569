"""The loader fuzzer at a CI budget: mutated checkpoints of every format either load and generate or raise
CheckpointError / ConfigError; none hangs, crashes, exhausts memory or raises anything else.

The long campaign is `python scripts/fuzz_loader.py --format all --cases 20000` (see its docstring); the specific
findings it drove have their own regression tests in test_loader.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_loader.py"
CASES = int(os.environ.get("DGEMMA_FUZZ_CASES", "34"))  # per format: ~200 in all


@pytest.fixture(scope="module")
def fuzz_loader():
    spec = importlib.util.spec_from_file_location("fuzz_loader", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.timeout(240)
def test_fuzzed_checkpoints_load_or_raise_documented_errors(fuzz_loader, work):
    report = fuzz_loader.fuzz(cases=CASES, seed=0, jobs=1, work=work)
    assert report["cases"] == dict.fromkeys(fuzz_loader.FORMATS, CASES)
    assert report["total_findings"] == 0, json.dumps(report["examples"], indent=1)[:4000]
    for fmt, counts in report["counts"].items():
        assert counts["generated"] > 0 and counts["refused"] > 0, (fmt, counts)  # both sides are exercised


def test_cases_are_deterministic_and_never_touch_the_base(fuzz_loader, work):
    bases = fuzz_loader.build_bases(work / "bases", ("sharded",))
    before = {p.name: p.read_bytes() for p in bases["sharded"].iterdir()}
    descs = [fuzz_loader.make_case("sharded", bases["sharded"], work / f"c{k}", 7, 3) for k in range(2)]
    assert descs[0] == descs[1]
    assert sorted(os.listdir(work / "c0")) == sorted(os.listdir(work / "c1"))
    for i in range(60):
        fuzz_loader.make_case("sharded", bases["sharded"], work / "c0", 7, i)
    assert {p.name: p.read_bytes() for p in bases["sharded"].iterdir()} == before


@pytest.mark.timeout(120)
def test_worker_reports_hangs_and_memory_as_findings(fuzz_loader, tmp_path):
    """The harness itself: a case over its time is a hang (the worker is replaced), a 64 GiB allocation fails under
    the worker's cap."""
    w = fuzz_loader.Worker(mem_mb=256)
    try:
        assert w.run(tmp_path, 0, timeout=3, probe="hang")["outcome"] == "hang"
        assert w.run(tmp_path, 0, timeout=30, probe="alloc")["outcome"] == "memory"  # a fresh worker
        assert w.run(tmp_path / "nowhere", 0, timeout=30)["outcome"] == "refused"
    finally:
        w.stop()
