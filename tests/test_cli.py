"""`python -m dgemma generate` end to end on a tiny checkpoint with a tokenizer, and its error contract:
every bad input gives exactly one `error:` line on stderr, a non-zero exit code and never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import random_model

from dgemma.cli import main
from dgemma.export import save_model

FAST = ["--max-new-tokens", "16", "--steps", "4", "--seed", "3"]


def dgemma(*args: str, timeout: int = 300, input: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dgemma", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, input=input)


@pytest.fixture(scope="module")
def idlevel(tmp_path_factory):
    """A checkpoint without tokenizer files."""
    return save_model(random_model(seed=4), tmp_path_factory.mktemp("idlevel"))


@pytest.fixture(scope="module")
def json_run(tok_checkpoint):
    proc = dgemma("generate", "--model", str(tok_checkpoint), "In the beginning", "--json", *FAST)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_json_fields(json_run):
    r = json_run
    assert set(r) >= {"token_ids", "text", "steps_per_canvas", "tokens_per_forward", "timings", "seed", "finish_reason"}
    assert r["seed"] == 3 and r["finish_reason"] in ("stop", "length")
    assert all(isinstance(t, int) for t in r["token_ids"]) and isinstance(r["text"], str)
    assert 1 <= len(r["steps_per_canvas"]) <= 2 and all(1 <= s <= 4 for s in r["steps_per_canvas"])
    assert set(r["timings"]) >= {"prefill_s", "denoise_s", "total_s", "tokens_per_s"}
    assert r["tokens_per_forward"] == pytest.approx(len(r["token_ids"]) / sum(r["steps_per_canvas"]))


def test_plain_text_streams_the_same_text(tok_checkpoint, json_run):
    proc = dgemma("generate", "--model", str(tok_checkpoint), "In the beginning", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == json_run["text"] + "\n"
    lines = proc.stderr.splitlines()  # one summary line, as mlx-lm prints
    assert len(lines) == 1 and "tok/s" in lines[0] and "tokens/forward" in lines[0] and "peak memory" in lines[0]


def test_show_canvas_without_a_tty(tok_checkpoint, json_run):
    proc = dgemma("generate", "--model", str(tok_checkpoint), "In the beginning", "--show-canvas", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == json_run["text"] + "\n"
    assert "Traceback" not in proc.stderr


def test_show_canvas_in_process_with_json_and_chat(tok_checkpoint, capsys):
    args = [
        "generate",
        "--model",
        str(tok_checkpoint),
        "Hello",
        "--chat",
        "--show-canvas",
        "--json",
        "--eos-ids",
        "1,6",
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
        *FAST,
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seed"] == 3 and out["prompt_tokens"] > 3


def test_prompt_ids_are_used_exactly(idlevel, capsys):
    assert main(["generate", "--model", str(idlevel), "--prompt-ids", "5, 17,33", "--json", *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] == 3 and len(out["token_ids"]) == 16 and out["text"] == ""
    assert main(["generate", "--model", str(idlevel), "--prompt-ids", "5,17,33", *FAST]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in out["token_ids"]]  # ids printed when no tokenizer


def test_unseeded_runs_report_their_seed(idlevel, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(idlevel),
                "--prompt-ids",
                "5",
                "--json",
                "--max-new-tokens",
                "8",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    seed = json.loads(capsys.readouterr().out)["seed"]
    assert isinstance(seed, int) and seed >= 0


BAD = [
    # (arguments after `generate`, expected exit code, text the error line must contain)
    (["--model", "{tok}", "--prompt-ids", "3,x"], 2, "--prompt-ids"),
    (["--model", "{tok}", "--prompt-ids", ""], 2, "--prompt-ids"),
    (["--model", "{tok}", "--prompt-ids", "-4"], 2, "--prompt-ids"),
    (["--model", "{tok}", "hi", "--steps", "many"], 2, "--steps: expected an integer"),
    (["--model", "{tok}", "hi", "--steps", "0"], 2, "--steps: must be >= 1"),
    (["--model", "{tok}", "hi", "--entropy-bound", "-1"], 2, "--entropy-bound"),
    (["--model", "{tok}", "hi", "--t-max", "inf"], 2, "--t-max"),
    (["--model", "{tok}", "hi", "--seed", "-1"], 2, "--seed"),
    (["--model", "{tok}", "hi", "--dtype", "float64"], 2, "--dtype"),
    (["--model", "{tok}", "hi", "--bogus"], 2, "unrecognized arguments"),
    (["--model", "{tok}"], 2, "give a PROMPT or --prompt-ids"),
    (["--model", "{tok}", "hi", "--prompt-ids", "3"], 2, "not allowed with"),
    (["--model", "{tok}", "--prompt-ids", "3", "--chat"], 2, "--chat needs a text PROMPT"),
    (["--model", "{tok}", "hi", "--t-min", "0.9", "--t-max", "0.5"], 2, "t_min < t_max"),
    (["--model", "{tok}", "--prompt-ids", "3,99999"], 2, "outside the vocabulary"),
    (["--model", "{ids}", "hi"], 2, "no tokenizer.json"),
    (["--model", "{nowhere}", "hi"], 3, "does not exist"),
    (["--model", "{broken}", "hi"], 3, "not valid JSON"),
]


@pytest.fixture(scope="module")
def paths(tok_checkpoint, idlevel, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken")
    (broken / "config.json").write_text("{oops")
    return {"tok": tok_checkpoint, "ids": idlevel, "nowhere": broken / "missing", "broken": broken}


@pytest.mark.parametrize("args,code,needle", BAD, ids=[" ".join(a[2:]) or "no-prompt" for a, _, _ in BAD])
def test_bad_input_one_line(args, code, needle, paths, capsys):
    argv = ["generate"] + [a.format(**paths) for a in args]
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], captured.err
    assert captured.out == ""


def test_cuda_without_cuda(paths, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["generate", "--model", str(paths["tok"]), "hi", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: --device cuda was requested but CUDA is not available; use --device cpu\n"


@pytest.mark.parametrize(
    "args,code",
    [
        (["generate", "--prompt-ids", "1,zz"], 2),
        (["generate", "--model", "/nonexistent/dgemma-model", "hello"], 3),
        (["generate", "--model", "{ids}", "hello"], 2),
        (["frobnicate"], 2),
    ],
)
def test_subprocess_errors_never_show_a_traceback(args, code, paths):
    proc = dgemma(*[a.format(**paths) for a in args])
    assert proc.returncode == code
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_help_lists_every_generate_option():
    proc = dgemma("generate", "--help")
    assert proc.returncode == 0
    for option in (
        "--model",
        "--prompt-ids",
        "--chat",
        "--max-new-tokens",
        "--steps",
        "--entropy-bound",
        "--t-min",
        "--t-max",
        "--stability-threshold",
        "--confidence-threshold",
        "--eos-ids",
        "--seed",
        "--dtype",
        "--device",
        "--json",
        "--show-canvas",
    ):
        assert option in proc.stdout


def test_cli_conventions(tok_checkpoint, json_run, tmp_path):
    """--version, usage on a bare `dgemma`, short flags, the prompt from stdin or a file, --threads, --quiet."""
    version = dgemma("--version")
    assert version.returncode == 0 and version.stdout.startswith("dgemma ")
    bare = dgemma()
    assert bare.returncode == 2 and "generate" in bare.stderr and "serve" in bare.stderr
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("In the beginning")
    runs = [
        dgemma("generate", "-m", str(tok_checkpoint), "-f", str(prompt), "-q", "--threads", "1", *FAST),
        dgemma("generate", "-m", str(tok_checkpoint), "-", "-q", *FAST, input="In the beginning"),
    ]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == json_run["text"] + "\n" and proc.stderr == ""
    short = dgemma("generate", "-m", str(tok_checkpoint), "In the beginning", "-n", "3", "-s", "5", "--json")
    assert short.returncode == 0 and len(json.loads(short.stdout)["token_ids"]) <= 3
    assert json.loads(short.stdout)["seed"] == 5
    bad = dgemma("generate", "-m", str(tok_checkpoint), "x", "--threads", "0")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "--threads" in bad.stderr


@pytest.mark.parametrize(
    "flag, value, needle",
    [("--steps", "-5", "> 0"), ("--lr", "nan", "finite"), ("--seed", "-1", ">= 0"), ("--batch-size", "x", "integer")],
)
def test_train_values_are_checked(capsys, flag, value, needle):
    assert main(["train", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: argument {flag}") and needle in err


def test_train_help_has_text_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "optimizer steps in all" in out and "(default: 2000)" in out


def test_bench_prints_a_table_and_a_json_line_last(tok_checkpoint):
    proc = dgemma(
        "bench",
        "-m",
        str(tok_checkpoint),
        "--batch",
        "1,2",
        "--steps",
        "2",
        "--canvases",
        "1",
        "--prompt-tokens",
        "8",
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["batch"] for r in last["results"]] == [1, 2] and last["peak_gflops"] > 0
    assert all(r["tokens_per_s"] > 0 and 0 < r["compute_share"] for r in last["results"])
    assert "ms/step" in proc.stdout


def test_bench_clients_measures_the_server(tok_checkpoint):
    proc = dgemma("bench", "-m", str(tok_checkpoint), "--clients", "1,2", "--requests", "2", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["bench"] == "serve" and [r["clients"] for r in last["levels"]] == [1, 2]
    assert last["identical_outputs"] is True and all(r["tokens_per_s"] > 0 for r in last["levels"])
