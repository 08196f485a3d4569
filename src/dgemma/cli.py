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


# --- shared arguments -------------------------------------------------------------------------------------------
KINDS = {
    "positive_int": positive_int,
    "non_negative_int": non_negative_int,
    "positive_float": positive_float,
    "non_negative_float": non_negative_float,
    "id_list": id_list,
}


def add_model_arguments(p) -> None:
    p.add_argument(
        "-m",
        "--model",
        metavar="DIR|ORG/NAME",
        help="checkpoint directory or Hugging Face repo id (default: the bundled model)",
    )
    p.add_argument("--offline", action="store_true", help="never download: a repo id must be in the local HF cache")


def add_knob_arguments(p, with_json: bool = True) -> None:
    """Every GenerationSettings knob as a flag (the one list in config.GenerationSettings.knobs), plus seed and
    runtime options (and --json, unless `with_json` is off)."""
    from .config import GenerationSettings

    knobs = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    short = {"max_new_tokens": "-n"}
    for f in GenerationSettings.knobs():
        flags = [short[f.name]] if f.name in short else []
        flags.append("--" + f.name.replace("_", "-").replace("-token-ids", "-ids"))
        knobs.add_argument(*flags, dest=f.name, type=KINDS[f.metadata["kind"]], metavar="X", help=f.metadata["help"])
    knobs.add_argument("-s", "--seed", type=seed_value, metavar="S", help="seed (default: random, reported)")
    run = p.add_argument_group("runtime")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's dtype")
    run.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    run.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch CPU threads (default on CPU: cores - 1, at least 1, as dgemma serve does)",
    )
    if with_json:
        p.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and timings")


def knobs_from(args: argparse.Namespace) -> dict:
    from .config import GenerationSettings

    return {f.name: getattr(args, f.name) for f in GenerationSettings.knobs()}


def load_pipeline(args: argparse.Namespace):
    import torch

    from .config import ConfigError
    from .generate import BUNDLED_MODEL, Pipeline
    from .loader import CheckpointError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was requested but CUDA is not available; use --device cpu")
    if args.threads or args.device != "cuda":  # torch's default (every core) was 10-17x slower under load
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - 1))
    if args.model is None and not BUNDLED_MODEL.is_dir():
        raise CliError(f"no bundled model at {BUNDLED_MODEL}; pass --model DIR", EXIT_CHECKPOINT)
    try:
        with loading_bar() as progress:
            return Pipeline.load(
                args.model, dtype=args.dtype, device=args.device, offline=args.offline, progress=progress
            )
    except (CheckpointError, ConfigError, OSError) as e:
        raise CliError(str(e), EXIT_CHECKPOINT) from None


BAR_BYTES = 1 << 30  # checkpoints from this size on get a loading bar


@contextlib.contextmanager
def loading_bar(label: str = "loading weights", min_bytes: int = BAR_BYTES):
    """A `progress(done, total)` callback drawing a transient bar on a terminal's stderr for big checkpoints."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = None

        def progress(done: int, total: int) -> None:
            nonlocal task
            if total < min_bytes:
                return
            if task is None:
                task = bar.add_task("load", total=total)
            bar.update(task, completed=done)

        yield progress


def seed_of(args: argparse.Namespace) -> int:
    return args.seed if args.seed is not None else secrets.randbelow(MAX_SEED)


def read_text(path: str) -> str:
    """A file's text, or stdin for '-'."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


# --- generate --------------------------------------------------------------------------------------------------------
def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate a continuation by block diffusion (denoise a canvas, commit it, repeat).",
    )
    add_model_arguments(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("prompt", nargs="?", metavar="PROMPT", help="prompt text (BOS is added); '-' reads stdin")
    prompt.add_argument("-f", "--file", metavar="F", help="read the prompt from a file ('-': stdin)")
    prompt.add_argument("--prompt-ids", type=id_list, metavar="IDS", help="prompt token ids, used exactly (no BOS)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the checkpoint's chat template")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    add_knob_arguments(p)
    p.add_argument("--show-canvas", action="store_true", help="redraw the denoising canvas live (on stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    p.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    if args.file is not None or args.prompt == "-":
        args.prompt = read_text(args.file or "-")
    if args.prompt is None and args.prompt_ids is None:
        raise CliError("give a PROMPT or --prompt-ids (a PROMPT of '-' reads stdin, -f FILE a file)")
    if args.prompt_ids is not None and args.chat:
        raise CliError("--chat needs a text PROMPT, not --prompt-ids")
    from .generate import CanvasEvent, GenerationResult, SettleEvent, StepEvent

    pipe = load_pipeline(args)
    seed = seed_of(args)
    events = pipe.stream_generate(
        args.prompt, prompt_ids=args.prompt_ids, chat=args.chat, seed=seed, stop=args.stop, **knobs_from(args)
    )
    view = CanvasView(pipe.tokenizer, args.prompt or "") if args.show_canvas else None
    stream_text = not (args.json or view)
    with view or contextlib.nullcontext():
        for event in events:
            if view and isinstance(event, (StepEvent, CanvasEvent)):
                view.update(event)
            if stream_text and isinstance(event, (SettleEvent, CanvasEvent)) and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    assert isinstance(event, GenerationResult)
    if args.json:
        print(json.dumps(result_json(event)))
    elif pipe.tokenizer is None:
        print(" ".join(map(str, event.token_ids)))  # id-level checkpoint: nothing to detokenize
    else:
        print("" if stream_text else event.text)  # streamed text only needs its final newline
    if not args.quiet and not args.json:
        print(summary(event, pipe.model), file=sys.stderr)
    return 0


def summary(r, model) -> str:
    """One line for stderr after a plain run (as mlx-lm prints): tokens, speed, steps, peak memory, seed."""
    return (
        f"[{len(r.token_ids)} tokens in {r.total_s:.2f} s, {r.tokens_per_s:.1f} tok/s | steps per canvas "
        f"{','.join(map(str, r.steps_per_canvas))} | {r.tokens_per_forward:.2f} tokens/forward | peak memory "
        f"{peak_memory_gb(model):.2f} GB | seed {r.seed}]"
    )


def peak_memory_gb(model) -> float:
    """Peak accelerator memory when the model is on one, else the process's peak resident set."""
    import torch

    device = model.device
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


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


# --- infill and edit -----------------------------------------------------------------------------------------------
FILL_MARKER = "<FILL>"


def add_fill_arguments(p) -> None:
    p.add_argument(
        "--lengths",
        type=id_list,
        metavar="N,N",
        help="candidate fill lengths in tokens (default: a "
        "spread up to one canvas, or around the old span's length for edits)",
    )


def add_infill_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "infill",
        help="fill the gap between a prefix and a suffix",
        description="Fill in text between a prefix and a suffix: the suffix is pinned in the canvas after a gap; "
        "several gap lengths run in one batch and the one whose fill best leads into the suffix is kept.",
    )
    add_model_arguments(p)
    p.add_argument("--prefix", metavar="TEXT", help="text before the gap")
    p.add_argument("--suffix", metavar="TEXT", help="text after the gap")
    p.add_argument(
        "--file",
        metavar="F",
        help=f"a file ('-': stdin) with one {FILL_MARKER} marker: prints the file with the gap filled",
    )
    add_fill_arguments(p)
    p.add_argument("--max-fill", type=positive_int, metavar="N", help="longest candidate (default: one canvas)")
    add_knob_arguments(p)
    p.set_defaults(handler=run_infill)


def run_infill(args: argparse.Namespace) -> int:
    if args.file is not None:
        if args.prefix is not None or args.suffix is not None:
            raise CliError("give --file or --prefix/--suffix, not both")
        text = read_text(args.file)
        if text.count(FILL_MARKER) != 1:
            raise CliError(f"{args.file} must contain the marker {FILL_MARKER} exactly once")
        prefix, suffix = text.split(FILL_MARKER)
    elif args.prefix is None and args.suffix is None:
        raise CliError("give --prefix and/or --suffix, or --file")
    else:
        prefix, suffix = args.prefix or "", args.suffix or ""
    pipe = load_pipeline(args)
    if pipe.tokenizer is None:
        raise CliError("this checkpoint has no tokenizer.json; infill needs text", EXIT_CHECKPOINT)
    knobs = {k: v for k, v in knobs_from(args).items() if k != "max_new_tokens"}
    r = pipe.infill(
        prefix, suffix, lengths=args.lengths, max_fill=args.max_fill or args.max_new_tokens, seed=seed_of(args), **knobs
    )
    if args.json:
        print(json.dumps(infill_json(r)))
    else:
        sys.stdout.write(prefix + r.text + suffix if args.file is not None else r.text + "\n")
    return 0


def infill_json(r) -> dict:
    return {
        "text": r.text,
        "token_ids": r.token_ids,
        "length": r.length,
        "candidates": r.candidates,
        "forward_passes": r.forward_passes,
        "timings": {"total_s": r.total_s, "tokens_per_s": r.tokens_per_s},
        "seed": r.seed,
    }


def add_edit_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "edit",
        help="rewrite lines or characters of a file in place",
        description="Re-denoise one span of a file with everything around it fixed (the text before it is the "
        "prompt, the text after it is pinned) and print the edited file.",
    )
    add_model_arguments(p)
    p.add_argument("file", metavar="FILE", help="the text file ('-': stdin)")
    span = p.add_mutually_exclusive_group(required=True)
    span.add_argument("--lines", metavar="A-B", help="1-based inclusive line range, e.g. 10-12")
    span.add_argument("--chars", metavar="A-B", help="character range [A, B), 0-based")
    p.add_argument("--diff", action="store_true", help="print a unified diff instead of the edited file")
    add_fill_arguments(p)
    add_knob_arguments(p)
    p.set_defaults(handler=run_edit)


def parse_range(text: str, flag: str) -> tuple[int, int]:
    from .config import ConfigError
    from .infill import parse_range as parse

    try:
        return parse(text, flag)
    except ConfigError as e:
        raise CliError(str(e)) from None


def run_edit(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .infill import line_span

    text = read_text(args.file)
    try:
        if args.lines is not None:
            start, end = line_span(text, *parse_range(args.lines, "--lines"))
        else:
            start, end = parse_range(args.chars, "--chars")
            if not start <= end <= len(text):
                raise CliError(f"--chars must satisfy 0 <= A <= B <= {len(text)}, got {args.chars}")
    except ConfigError as e:
        raise CliError(str(e)) from None  # before loading the model: a bad range fails at once
    pipe = load_pipeline(args)
    if pipe.tokenizer is None:
        raise CliError("this checkpoint has no tokenizer.json; edit needs text", EXIT_CHECKPOINT)
    knobs = {k: v for k, v in knobs_from(args).items() if k != "max_new_tokens"}
    r = pipe.edit(text, start, end, lengths=args.lengths, max_fill=args.max_new_tokens, seed=seed_of(args), **knobs)
    if args.json:
        print(
            json.dumps(
                {**infill_json(r.infill), "text": r.text, "replacement": r.replacement, "start": r.start, "end": r.end}
            )
        )
    elif args.diff:
        import difflib

        name = "stdin" if args.file == "-" else args.file
        old, new = text.splitlines(keepends=True), r.text.splitlines(keepends=True)
        lines = difflib.unified_diff(old, new, name, f"{name} (edited)")
        sys.stdout.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
    else:
        sys.stdout.write(r.text)
    return 0


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
            f"canvas {event.canvas_index + 1} · step {event.step} · mean entropy {event.mean_entropy:.3f}",
            style="bold cyan",
        )
        text.append("   bright = sure · yellow / red = unsure · underlined = accepted\n", style="dim")
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
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("dgemma")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_quantize_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="write an int8/int4 copy of a float checkpoint (streams tensor by tensor: bounded memory)",
        description="Quantize every linear and the routed experts (int8 per channel, or int4 in groups) and the tied "
        "embedding (int8 per row, or kept float). The result loads with --model DST everywhere.",
    )
    p.add_argument("src", help="float checkpoint directory (or hub id)")
    p.add_argument("dst", help="output directory (must be new or empty)")
    p.add_argument("--scheme", choices=("int8", "int4"), default="int4")
    p.add_argument("--group-size", type=int, default=64, help="int4 inputs per scale (power of two >= 16)")
    p.add_argument("--embedding", choices=("int8", "bf16"), default="int8", help="bf16: keep the embedding float")
    p.add_argument("--shard-gb", type=float, default=2.0, help="output shard size")
    p.set_defaults(handler=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from .config import CheckpointError, ConfigError
    from .export import quantize_checkpoint
    from .quantize import Scheme

    try:
        scheme = Scheme(args.scheme, args.group_size, args.embedding)
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.shard_gb <= 0:
        raise CliError("--shard-gb must be positive")
    try:
        with loading_bar("quantizing", min_bytes=0) as progress:
            stats = quantize_checkpoint(args.src, args.dst, scheme, progress, int(args.shard_gb * (1 << 30)))
    except FileExistsError as e:
        raise CliError(str(e)) from None
    except (CheckpointError, ConfigError, OSError) as e:
        raise CliError(str(e), EXIT_CHECKPOINT) from None
    print(
        f"wrote {args.dst}: {stats['out_bytes'] / 1e6:.1f} MB in {stats['shards']} shard(s) from "
        f"{stats['in_bytes'] / 1e6:.1f} MB ({scheme.bits}, group {scheme.group_size}, embedding {scheme.embedding}); "
        f"peak RSS {stats['peak_rss_bytes'] / 1e6:.0f} MB"
    )
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="dgemma", description="DiffusionGemma text-diffusion inference.")
    parser.add_argument("--version", action="version", version=f"dgemma {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_generate_parser(sub)  # one line per subcommand; each sets its handler with set_defaults(handler=...)
    add_infill_parser(sub)
    add_edit_parser(sub)
    add_quantize_parser(sub)
    from .repl import add_chat_parser  # light: torch loads only when `chat` runs

    add_chat_parser(sub)
    from .serve import add_serve_parser  # a light module: the server and torch load only when `serve` runs

    add_serve_parser(sub)
    from .train_config import add_train_parser  # light: torch loads only when `train` runs

    add_train_parser(sub)
    from .bench import add_bench_parser  # light: torch loads only when `bench` runs

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # a bare `dgemma`: show what it can do
            parser.print_help(sys.stderr)
            return EXIT_USAGE
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
