"""The `dgemma` command line: one entry point, one function per subcommand.

Each subcommand is an `add_<name>_parser(subparsers)` that registers its arguments and a `run_<name>(args) -> int`
handler; `build_parser` lists them. `main` turns every expected failure into one `error: ...` line on stderr and an
exit code (2 bad usage or values, 3 unusable checkpoint, 1 anything else); set DGEMMA_DEBUG=1 for a traceback.
Heavy imports (torch) happen inside handlers so `--help` and usage errors stay instant. This module prints; the
library never does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import secrets
import sys

EXIT_USAGE, EXIT_CHECKPOINT, EXIT_FAILURE = 2, 3, 1
MAX_SEED = 2**62  # the sampling generator is seeded S + 1, which must stay a valid 64-bit seed


class CliError(Exception):
    """A failure to report as one line with a specific exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `error:` line (no usage dump), exit code 2."""

    def error(self, message: str):
        raise CliError(message, EXIT_USAGE)


# --- argument types: each rejects bad values with a message naming the accepted range -------------------------------
def _int(text: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise argparse.ArgumentTypeError(f"must be >= {minimum}{upper}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    return _int(text, 0)


def seed_value(text: str) -> int:
    return _int(text, 0, MAX_SEED)


def _float(text: str, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>' if positive else '>='} 0, got {text}")
    return value


def positive_float(text: str) -> float:
    return _float(text, positive=True)


def non_negative_float(text: str) -> float:
    return _float(text, positive=False)


def id_list(text: str) -> list[int]:
    """'5,17,33' -> [5, 17, 33] (spaces allowed, at least one id, all >= 0)."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers like 5,17,33, got {text!r}")
    return [int(p) for p in parts]


# --- generate --------------------------------------------------------------------------------------------------------
def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate a continuation by block diffusion (denoise a canvas, commit it, repeat).",
    )
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--download", action="store_true", help="treat --model as a Hugging Face repo id and download it")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("prompt", nargs="?", metavar="PROMPT", help="prompt text (BOS is added)")
    prompt.add_argument("--prompt-ids", type=id_list, metavar="IDS", help="prompt token ids, used exactly (no BOS)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the checkpoint's chat template")
    knobs = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    knobs.add_argument("--max-new-tokens", type=positive_int, metavar="N", help="rounded up to whole canvases")
    knobs.add_argument("--steps", type=positive_int, metavar="N", help="max denoising steps per canvas")
    knobs.add_argument("--entropy-bound", type=positive_float, metavar="X", help="entropy budget for acceptance")
    knobs.add_argument("--t-min", type=non_negative_float, metavar="X", help="temperature at the last step")
    knobs.add_argument("--t-max", type=non_negative_float, metavar="X", help="temperature at the first step")
    knobs.add_argument("--stability-threshold", type=non_negative_int, metavar="N", help="stable steps to stop")
    knobs.add_argument("--confidence-threshold", type=positive_float, metavar="X", help="mean entropy to stop")
    knobs.add_argument("--eos-ids", type=id_list, metavar="IDS", help="stop token ids, e.g. 1,106")
    knobs.add_argument("--seed", type=seed_value, metavar="S", help="seed (default: random, reported with --json)")
    run = p.add_argument_group("runtime")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's dtype")
    run.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and timings")
    out.add_argument("--show-canvas", action="store_true", help="redraw the denoising canvas live (on stderr)")
    p.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    if args.prompt is None and args.prompt_ids is None:
        raise CliError("give a PROMPT or --prompt-ids")
    if args.prompt_ids is not None and args.chat:
        raise CliError("--chat needs a text PROMPT, not --prompt-ids")
    import torch

    from .config import ConfigError
    from .generate import BUNDLED_MODEL, CanvasEvent, GenerationResult, Pipeline, StepEvent
    from .loader import CheckpointError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was requested but CUDA is not available; use --device cpu")
    if args.model is None and not BUNDLED_MODEL.is_dir():
        raise CliError(f"no bundled model at {BUNDLED_MODEL}; pass --model DIR", EXIT_CHECKPOINT)
    try:
        pipe = Pipeline.load(args.model, dtype=args.dtype, device=args.device, allow_download=args.download)
    except (CheckpointError, ConfigError, OSError) as e:
        raise CliError(str(e), EXIT_CHECKPOINT) from None
    knobs = {
        "max_new_tokens": args.max_new_tokens, "steps": args.steps, "entropy_bound": args.entropy_bound,
        "t_min": args.t_min, "t_max": args.t_max, "stability_threshold": args.stability_threshold,
        "confidence_threshold": args.confidence_threshold, "eos_token_ids": args.eos_ids,
    }  # fmt: skip
    seed = args.seed if args.seed is not None else secrets.randbelow(MAX_SEED)
    events = pipe.stream_generate(args.prompt, prompt_ids=args.prompt_ids, chat=args.chat, seed=seed, **knobs)
    view = CanvasView(pipe.tokenizer, args.prompt or "") if args.show_canvas else None
    stream_text = not (args.json or view)
    with view or contextlib.nullcontext():
        for event in events:
            if view and isinstance(event, (StepEvent, CanvasEvent)):
                view.update(event)
            if stream_text and isinstance(event, CanvasEvent) and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    assert isinstance(event, GenerationResult)
    if args.json:
        print(json.dumps(result_json(event)))
    elif pipe.tokenizer is None:
        print(" ".join(map(str, event.token_ids)))  # id-level checkpoint: nothing to detokenize
    else:
        print("" if stream_text else event.text)  # streamed text only needs its final newline
    return 0


def result_json(r) -> dict:
    """The --json object: new tokens up to and including the first EOS, text, per-canvas steps, timings."""
    return {
        "token_ids": r.token_ids,
        "text": r.text,
        "finish_reason": r.finish_reason,
        "steps_per_canvas": r.steps_per_canvas,
        "forward_passes": r.forward_passes,
        "tokens_per_forward": r.tokens_per_forward,
        "timings": {
            "prefill_s": r.prefill_s,
            "denoise_s": r.denoise_s,
            "total_s": r.total_s,
            "tokens_per_s": r.tokens_per_s,
        },
        "seed": r.seed,
        "prompt_tokens": len(r.prompt_ids),
    }


class CanvasView:
    """Live terminal view of the settling canvas (rich.live on stderr): committed text, then the draft canvas with
    each token shaded by its entropy (bright = settled) and accepted positions underlined."""

    def __init__(self, tokenizer, prompt: str = ""):
        from rich.console import Console
        from rich.live import Live

        self.tokenizer, self.prompt = tokenizer, printable(prompt)
        self.committed: list[int] = []
        self.console = Console(stderr=True)
        self.live = Live(console=self.console, transient=True, auto_refresh=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        return self.live.__exit__(*exc)

    def piece(self, token: int) -> str:
        return printable(self.tokenizer.decode([token])) if self.tokenizer else f"{token} "

    def update(self, event) -> None:
        from rich.text import Text

        from .generate import CanvasEvent

        if isinstance(event, CanvasEvent):
            self.committed += event.token_ids
            return
        text = Text()
        text.append(
            f"canvas {event.canvas_index + 1} · step {event.step} · mean entropy {event.mean_entropy:.3f}\n",
            style="bold cyan",
        )
        committed = self.tokenizer.decode(self.committed) if self.tokenizer else " ".join(map(str, self.committed))
        text.append(self.prompt[-1000:], style="dim")
        text.append(printable(committed)[-2000:])
        for token, h, accepted in zip(event.draft, event.entropy, event.accepted):
            shade = "bright_white" if h < 0.1 else "white" if h < 0.5 else "yellow" if h < 1.5 else "red"
            text.append(self.piece(token), style=f"{shade}{' underline' if accepted else ''}")
        self.live.update(text, refresh=True)


def printable(text: str) -> str:
    """Control characters from random or partial tokens would move the cursor; show them as a middle dot."""
    return "".join(ch if ch.isprintable() or ch == "\n" else "·" for ch in text)


# --- entry point -----------------------------------------------------------------------------------------------------
def build_parser() -> Parser:
    parser = Parser(prog="dgemma", description="DiffusionGemma text-diffusion inference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    add_generate_parser(sub)  # one line per subcommand; each sets its handler with set_defaults(handler=...)
    from .serve import add_serve_parser  # a light module: the server and torch load only when `serve` runs

    add_serve_parser(sub)
    from .train_config import add_train_parser  # light: torch loads only when `train` runs

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except CliError as e:
        return _fail(str(e), e.code)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("DGEMMA_DEBUG"):
            raise
        from .loader import CheckpointError

        code = EXIT_CHECKPOINT if isinstance(e, CheckpointError) else EXIT_USAGE if isinstance(e, ValueError) else 1
        return _fail(str(e) or type(e).__name__, code)


def _fail(message: str, code: int) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
