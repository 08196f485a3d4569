"""Settings of `dgemma train` and its command-line parser; a light module (no torch) so `dgemma --help` stays fast."""

from __future__ import annotations

import argparse
import dataclasses
import math


@dataclasses.dataclass
class TrainConfig:
    corpus: str = "data/web"  # folder(s), comma-separated, with train.txt(.gz) [+ val.txt(.gz)], one document a line
    out: str = "runs/web"
    vocab_size: int = 8192
    hidden_size: int = 192
    intermediate_size: int = 384
    moe_intermediate_size: int = 128
    num_experts: int = 4
    top_k_experts: int = 2
    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 48
    kv_heads: int = 2
    global_head_dim: int = 64
    global_kv_heads: int = 1
    sliding_window: int = 128
    canvas_length: int = 32
    seq_len: int = 256  # clean tokens per sequence (a multiple of canvas_length)
    batch_size: int = 16
    steps: int = 2000
    tokens: int = 0  # training budget in tokens: the LR schedule and the end; 0 = steps * batch_size * seq_len
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    high_noise_frac: float = 0.5  # share of blocks with noise in [0.8, 1], the regime the sampler lives in
    sc_prob: float = 0.5
    eval_every: int = 200
    eval_batches: int = 4
    ckpt_every: int = 100
    ckpt_every_min: float = 5.0  # also checkpoint after this many minutes since the last one; 0 = steps only
    seed: int = 0
    threads: int = 0  # 0 = torch default
    bf16: bool = False  # bf16 autocast: 1.6x faster on CPUs with AVX512-BF16/AMX, ~5x slower without (AVX2 only)
    init_from: str = ""  # warm start: a checkpoint directory of the same shape (weights only; fresh optimizer)
    time_limit_min: float = 0.0  # this invocation stops (and saves) after this many minutes; never moves the schedule


HELP = {
    "corpus": "folder holding train.txt(.gz) and val.txt(.gz), one document per line; several folders, "
    "comma-separated, train on all their train files and report the first one's val (the others' as extra keys)",
    "out": "run folder: train_state.pt, the exported model/ and loss.png",
    "vocab_size": "byte-level BPE vocabulary size (specials included)",
    "hidden_size": "model width",
    "intermediate_size": "dense MLP width",
    "moe_intermediate_size": "width of each routed expert",
    "num_experts": "routed experts per layer",
    "top_k_experts": "experts each token uses",
    "num_layers": "decoder layers (sliding and full attention alternate; the last is full)",
    "num_heads": "query heads",
    "head_dim": "head size of sliding layers",
    "kv_heads": "key/value heads of sliding layers",
    "global_head_dim": "head size of full-attention layers",
    "global_kv_heads": "key/value heads of full-attention layers",
    "sliding_window": "sliding attention window",
    "canvas_length": "tokens per canvas (block)",
    "seq_len": "clean tokens per training sequence (a multiple of --canvas-length)",
    "batch_size": "sequences per step",
    "steps": "optimizer steps in all, when --tokens is 0 (a resumed run continues up to this)",
    "tokens": "training budget in tokens (0: steps x batch x seq-len); the learning-rate schedule follows the tokens "
    "seen, so a run stopped and resumed any number of times equals one uninterrupted run",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a share of the peak (cosine decay)",
    "warmup": "linear warm-up, in steps (warmup x batch x seq-len tokens)",
    "weight_decay": "AdamW weight decay",
    "high_noise_frac": "share of blocks with noise in [0.8, 1], the regime the sampler lives in",
    "sc_prob": "share of steps trained with self-conditioning",
    "eval_every": "steps between held-out evaluations",
    "eval_batches": "batches per evaluation",
    "ckpt_every": "steps between checkpoints (train_state.pt, resumable)",
    "ckpt_every_min": "also checkpoint once this many minutes passed since the last checkpoint (0: steps only)",
    "seed": "random seed",
    "threads": "torch CPU threads (0: torch's default)",
    "bf16": "bf16 autocast (fast only on CPUs with AVX512-BF16/AMX)",
    "init_from": "warm start from a checkpoint directory of the same shape (weights only)",
    "time_limit_min": "stop and save after this many minutes of this invocation (0: no limit); the schedule is "
    "unchanged, rerun the same command to continue",
}
MINIMUM = {
    "seed": 0,
    "threads": 0,
    "warmup": 0,
    "weight_decay": 0.0,
    "time_limit_min": 0.0,
    "ckpt_every_min": 0.0,
    "tokens": 0,
    "min_lr_ratio": 0.0,
    "high_noise_frac": 0.0,
    "sc_prob": 0.0,
}


def _checked(kind: type, name: str):
    """A value parser that refuses what the trainer cannot use: ints >= 1 and floats > 0, or >= the MINIMUM."""
    low = MINIMUM.get(name)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if (low is None and value <= 0) or (low is not None and value < low):
            raise argparse.ArgumentTypeError(f"must be {'> 0' if low is None else f'>= {low}'}, got {text}")
        return value

    return parse


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a small DiffusionGemma-architecture model on a text corpus",
        description="Train a block-diffusion model (BD3-LM masks, uniform-noise corruption, self-conditioning) on a "
        "folder of text; resumable from OUT/train_state.pt. Every option shows its default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name])
        elif f.type == "str":
            p.add_argument(flag, type=str, default=f.default, help=HELP[f.name])
        else:
            p.add_argument(flag, type=_checked(kinds[f.type], f.name), default=f.default, help=HELP[f.name])
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from .train import run_train

    return run_train(args)
