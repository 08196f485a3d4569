"""Settings of `dgemma train` and its command-line parser; a light module (no torch) so `dgemma --help` stays fast."""

from __future__ import annotations

import argparse
import dataclasses


@dataclasses.dataclass
class TrainConfig:
    corpus: str = "data/web"  # folder with train.txt(.gz) and val.txt(.gz), one document per line
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
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    high_noise_frac: float = 0.5  # share of blocks with noise in [0.8, 1], the regime the sampler lives in
    sc_prob: float = 0.5
    eval_every: int = 200
    eval_batches: int = 4
    ckpt_every: int = 100
    seed: int = 0
    threads: int = 0  # 0 = torch default
    bf16: bool = False  # bf16 autocast: 1.6x faster on CPUs with AVX512-BF16/AMX, ~5x slower without (AVX2 only)
    init_from: str = ""  # warm start: a checkpoint directory of the same shape (weights only; fresh optimizer)
    time_limit_min: float = 0.0  # stop (and save) after this many minutes; 0 = no limit


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a small DiffusionGemma-architecture model on a text corpus")
    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=kinds[f.type], default=f.default)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from .train import run_train

    return run_train(args)
