"""Infill and inline edit on the bundled model (Python API and CLI), and structured output from the Python API:
the suffix is held bit for bit after the chosen gap, the fill never holds EOS or control tokens, candidates run in
one batch, long gaps and long suffixes span canvases, edits leave everything outside the span alone, and the CLI
gives one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dgemma.cli import main
from dgemma.config import ConfigError
from dgemma.generate import Generation, Pipeline, run_batch
from dgemma.infill import infill_layout, infill_lengths, line_span, move_space

PREFIX, SUFFIX = "And God said, Let there be", " and there was light."


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(device="cpu")


def test_infill_keeps_the_suffix_and_picks_a_candidate(pipe):
    r = pipe.infill(PREFIX, SUFFIX, seed=0)
    lengths = [c["length"] for c in r.candidates]
    assert lengths == infill_lengths(pipe.canvas_length) and r.length in lengths
    assert len(r.token_ids) == r.length and r.text == pipe.tokenizer.decode(r.token_ids)
    banned = pipe.banned_in_fill()
    assert not any(banned[t] for t in r.token_ids)  # no EOS or control token inside the fill
    assert min(c["score"] for c in r.candidates) == next(c["score"] for c in r.candidates if c["length"] == r.length)
    assert pipe.infill(PREFIX, SUFFIX, seed=0).text == r.text  # seeded: repeatable


def test_the_suffix_is_pinned_after_each_gap(pipe):
    suffix = pipe.tokenizer.encode(SUFFIX, parse_special=False)
    prompt = pipe.prompt_ids(PREFIX)
    requests = pipe.infill_requests(prompt, suffix, [3, 9], seed=1)
    gens = [Generation(pipe.model, r) for r in requests]
    for _ in run_batch(pipe.model, gens):
        pass
    eos = pipe.settings.eos_token_ids[0]
    for n, g in zip([3, 9], gens):
        assert g.token_ids[n:] == suffix + [eos] and g.finish_reason == "stop"
        assert g.seam_nll is not None and g.seam_nll >= 0


def test_long_gap_and_long_suffix_span_canvases(pipe):
    c = pipe.canvas_length
    suffix = list(range(100, 100 + 2 * c))  # longer than a canvas
    layout, budget = infill_layout(c + 5, suffix, c, eos_id=1, banned=None)
    assert budget == 3 * c and layout.fixed[c + 5] == 100 and max(layout.fixed) == 3 * c - 1  # fills canvas 3's tail
    assert 1 not in layout.fixed.values()  # a suffix that does not fit whole is not followed by EOS
    r = pipe.infill(PREFIX, " " + "and the earth " * 12, lengths=[c + 4], seed=2)
    assert r.length == c + 4 and len(r.token_ids) == c + 4


def test_edit_rewrites_only_the_span(pipe):
    text = "In the beginning God created the heaven and the earth.\nAnd the earth was without form.\n"
    r = pipe.edit(text, 17, 28, seed=1)
    assert r.text == text[:17] + r.replacement + text[28:]
    assert r.infill.length in [c["length"] for c in r.infill.candidates]
    old = len(pipe.tokenizer.encode(text[17:28], parse_special=False))
    assert old in [c["length"] for c in r.infill.candidates]  # candidates centre on the old span's length
    with pytest.raises(ConfigError, match="span"):
        pipe.edit(text, 30, 10)
    by_lines = pipe.edit(text, lines=(2, 2), seed=1)
    assert by_lines.start == text.index("And") and by_lines.end == len(text) - 1
    assert by_lines.text.startswith(text.split("\n")[0] + "\n") and by_lines.text.endswith("\n")


def test_structured_output_from_the_python_api(pipe):
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "who": {"enum": ["Moses", "Aaron"]}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for seed in range(2):
        r = pipe.generate("In the beginning", seed=seed, response_format=rf)
        jsonschema.validate(json.loads(r.text), schema)
        assert r.finish_reason == "stop"
    with pytest.raises(ConfigError, match="too small"):
        pipe.request("x", response_format=rf, max_new_tokens=2)


def test_cli_infill_file_and_json(tmp_path, capsys):
    f = tmp_path / "hole.txt"
    f.write_text("And God said, Let there be<FILL> and there was light.\n")
    assert main(["infill", "--file", str(f), "--seed", "3", "--lengths", "2,4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("And God said, Let there be") and out.endswith(" and there was light.\n")
    assert main(["infill", "--prefix", PREFIX, "--suffix", SUFFIX, "--seed", "3", "--lengths", "2,4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["length"] in (2, 4) and len(got["token_ids"]) == got["length"] and got["seed"] == 3
    assert {"text", "candidates", "forward_passes", "timings"} <= set(got)


@pytest.mark.parametrize(
    "args, message",
    [
        (["infill"], "give --prefix"),
        (["infill", "--file", "FILE"], "exactly once"),
        (["infill", "--file", "FILE", "--prefix", "a"], "not both"),
        (["infill", "--prefix", "a", "--lengths", "0"], "infill lengths"),
        (["edit", "FILE", "--lines", "9-12"], "lines must be within"),
        (["edit", "FILE", "--lines", "two"], "--lines must look like"),
        (["edit", "FILE", "--lines", "²"], "--lines must look like"),
        (["edit", "FILE", "--chars", "5-2"], "--chars must satisfy"),
        (["edit", "missing.txt", "--lines", "1-1"], "cannot read"),
    ],
)
def test_cli_fill_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("no marker here\nsecond line\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_edit_prints_the_file_or_a_diff(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("In the beginning God created\nthe heaven and the earth.\nAnd the earth was without form.\n")
    cmd = [sys.executable, "-m", "dgemma", "edit", str(f), "--lines", "2-2", "--seed", "4"]
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    lines = full.splitlines()
    assert lines[0] == "In the beginning God created" and lines[2] == "And the earth was without form."
    diff = subprocess.run(cmd + ["--diff"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert diff.startswith(f"--- {f}\n+++ {f} (edited)\n") and "-the heaven and the earth.\n" in diff
    assert f"+{lines[1]}\n" in diff


def test_cli_generate_budget_is_exact():
    cmd = [
        sys.executable,
        "-m",
        "dgemma",
        "generate",
        "In the beginning",
        "--max-new-tokens",
        "5",
        "--json",
        "--seed",
        "1",
    ]
    got = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout)
    assert len(got["token_ids"]) <= 5 and (got["finish_reason"] == "length" or 1 in got["token_ids"])


def test_structured_output_when_the_model_vocabulary_is_larger_than_the_tokenizer(pipe):
    """Real checkpoints may pad the embedding past the tokenizer: masks are widened, padded ids never allowed."""
    import dataclasses

    import jsonschema
    from tiny import random_model, tiny_config

    vocab = pipe.tokenizer.vocab_size + 12
    big = dataclasses.replace(pipe, model=random_model(tiny_config(canvas_length=16, vocab_size=vocab), seed=3))
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "string"}}}
    r = big.generate(
        "x", seed=0, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    )
    jsonschema.validate(json.loads(r.text), schema)
    assert max(r.token_ids) < pipe.tokenizer.vocab_size


def test_infill_layout_ends_the_text_and_never_spills_a_canvas_for_the_eos():
    c = 8
    layout, budget = infill_layout(3, [50, 51], c, eos_id=1, banned=None, pad_id=0)
    assert budget == 6 and layout.fixed == {3: 50, 4: 51, 5: 1, 6: 0, 7: 0}  # EOS, then pads: nothing left to denoise
    layout, budget = infill_layout(5, [50, 51, 52], c, eos_id=1, banned=None, pad_id=0)
    assert budget == 8 and max(layout.fixed) == 7 and 1 not in layout.fixed.values()  # exact fit: no extra canvas
    layout, budget = infill_layout(4, [], c, eos_id=1, banned=None)
    assert budget == 5 and layout.fixed[4] == 1 and layout.fixed[7] == 1  # empty suffix: the text ends after the fill
    layout, budget = infill_layout(4, [], c, eos_id=None, banned=None)
    assert budget == 4 and not layout.fixed and layout.probe is None


def test_candidate_lengths():
    assert infill_lengths(32) == [1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 23, 32]
    assert infill_lengths(16, max_fill=5) == [1, 2, 3, 4, 5]
    long = infill_lengths(32, hint=300)
    assert 300 in long and max(long) == 600 and min(long) == 150  # a long span keeps long candidates


def test_line_spans_split_at_newlines_only():
    assert line_span("a\x0cb\nc\n", 2, 2) == (4, 5)  # a form feed is not a line break for editors
    assert line_span("a\r\nbb\r\n", 2, 2) == (3, 5)
    assert line_span("one\ntwo", 1, 2) == (0, 7)
    with pytest.raises(ConfigError, match="within 1-2"):
        line_span("one\ntwo\n", 3, 3)


def test_move_space():
    assert move_space("Let there be ") == ("Let there be", True)
    assert move_space("    indented    ") == ("    indented    ", False)
    assert move_space("") == ("", True)  # at the start of a text, a fill's leading space is dropped
