"""Server benchmark: N concurrent streaming clients against `dgemma serve` (its own process, real HTTP on loopback).

Every level serves the same workload: --requests streaming completions (request k: prompt k mod 8, seed 1000 + k),
taken from a shared queue by N client threads, each sending its next request as soon as its previous one ends. So
the throughput ratio against the first level is simply the ratio of wall times, for tokens and requests alike (EOS
positions cannot skew it). Reported per level: completion tokens/s, requests/s, forward passes, time to the first
streamed text (settled tokens), time to the first canvas commit (server side) and p50/p99 request latency. Seeded
outputs must be identical at every N (batching never changes results); the script checks it. The levels run in
turn --rounds times and each level's rounds are pooled. Human table first, then one JSON line last.

The bundled model is the default; when it is missing (or with --random SIZE), a random model is built in a temporary
directory: "bundled" has scripts/train_bundled.sh's shape (hidden 128, 4 layers, 4 experts top-2, canvas 32, vocab
4096), "large" hidden 256, 6 layers, canvas 64, vocab 8192. Random weights never stop a canvas early and rarely
settle text before the commit, so steps are capped (--steps) to keep the run short.

    python scripts/bench_server.py [--model DIR | --random {bundled,large}] [--clients 1,2,4,8] [--requests 32]
                                  [--rounds 2] [--processes N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from dgemma.bench import Server, merge, run_level
from dgemma.bpe import load_corpus_lines, train_bpe
from dgemma.config import GenerationSettings, ModelConfig
from dgemma.export import save_model
from dgemma.generate import BUNDLED_MODEL, Pipeline
from dgemma.model import DiffusionGemma

ROOT = Path(__file__).resolve().parents[1]


SIZES = {  # "bundled": scripts/train_bundled.sh's shape; "large": twice as wide and deep, 4x the vocabulary
    "bundled": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "head_dim": 32,
        "global_head_dim": 64,
        "sliding_window": 128,
        "vocab": 4096,
        "canvas": 32,
    },
    "large": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 6,
        "head_dim": 64,
        "global_head_dim": 128,
        "sliding_window": 512,
        "vocab": 8192,
        "canvas": 64,
    },
}


def random_checkpoint(out: Path, size: str) -> Path:
    """A random model of the given size with a BPE tokenizer trained on the validation text (which yields fewer
    than 8192 merges; the model keeps the full vocabulary, as a bigger checkpoint would)."""
    shape = dict(SIZES[size])
    vocab, canvas = shape.pop("vocab"), shape.pop("canvas")
    tok = train_bpe(load_corpus_lines(ROOT / "data" / "web" / "val.txt.gz"), vocab_size=vocab)
    text = {
        **shape,
        "vocab_size": max(vocab, tok.get_vocab_size()),
        "num_experts": 4,
        "top_k_experts": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_global_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    config = ModelConfig.from_dict({"canvas_length": canvas, "text_config": text, "eos_token_id": [1]})
    torch.manual_seed(0)
    model = DiffusionGemma(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "scale", "per_expert_scale")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if name == "embed_tokens.weight" else 0.05)
    return save_model(model, out, GenerationSettings(eos_token_ids=(1,), pad_token_id=0), tokenizer=tok)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: bundled, else a random one)")
    ap.add_argument("--random", choices=sorted(SIZES), help="benchmark a random model of this size instead")
    ap.add_argument("--clients", default="1,2,4,8", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (the same set at every level)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="run the levels in turn this many times (1, 8, 1, 8, ...): slow drifts of a shared machine "
        "then hit every level alike",
    )
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="max steps per canvas (default: 12 for a random model)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--workers", type=int, default=1, help="engine step groups run side by side")
    ap.add_argument("--processes", type=int, default=None, help="dgemma serve --processes (default: the server's)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--settle-steps", type=int, default=None, help="stream_options.settle_steps (0: whole canvases)")
    ap.add_argument("--settle-entropy", type=float, default=None, help="stream_options.settle_entropy")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, kind = args.model, "given"
        if model_dir is None and not args.random and BUNDLED_MODEL.is_dir():
            model_dir, kind = BUNDLED_MODEL, "bundled"
        if model_dir is None:
            size = args.random or "bundled"
            print(f"building a random {size}-size model ...", file=sys.stderr)
            model_dir, kind = random_checkpoint(Path(tmp) / "random", size), f"random-{size}"
        steps = args.steps or (12 if kind.startswith("random") else None)
        pipe = Pipeline.load(model_dir, dtype=args.dtype, device="cpu")
        knobs = {"max_tokens": args.max_tokens, **({"steps": steps} if steps else {})}
        settle = {"settle_steps": args.settle_steps, "settle_entropy": args.settle_entropy}
        knobs["stream_options"] = {k: v for k, v in settle.items() if v is not None}
        flags = ["--max-batch", str(max(levels)), "--max-queue", str(max(levels) * 2)]
        flags += ["--workers", str(args.workers)] + (["--processes", str(args.processes)] if args.processes else [])
        flags += ["--threads", str(args.threads)] if args.threads else []
        flags += ["--dtype", args.dtype] if args.dtype else []
        with Server(model_dir, flags) as srv:
            run_level(srv.url, 1, 1, knobs)  # warm-up, outside the timed runs
            runs = [run_level(srv.url, n, args.requests, knobs) for _ in range(args.rounds) for n in levels]
    rows = [merge([r for r in runs if r["clients"] == n]) for n in levels]
    base = rows[0]["tokens_per_s"]
    ref = rows[0]["texts"]
    identical = all(r["texts"] == ref for r in rows)
    cfg = pipe.model.config
    print(
        f"model: {kind} {model_dir if kind == 'given' else ''} | hidden {cfg.text.hidden_size}, "
        f"{cfg.text.num_hidden_layers} layers, {cfg.text.num_experts} experts, canvas {cfg.canvas_length}, "
        f"vocab {cfg.text.vocab_size} | "
        f"max_tokens {args.max_tokens}, steps {steps or 'checkpoint'}, threads {args.threads or 'default'}, "
        f"{args.workers} workers, processes {args.processes or 'default'}, "
        f"settle {knobs['stream_options'] or 'server default'}"
    )
    print(
        f"{'clients':>7} {'reqs':>5} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'ratio':>6} {'1st text':>8} "
        f"{'1st commit':>10} {'p50 s':>6} {'p99 s':>6}"
    )
    for r in rows:
        print(
            f"{r['clients']:>7} {r['requests']:>5} {r['tokens']:>6} {r['wall_s']:>7.1f} {r['tokens_per_s']:>7.1f} "
            f"{r['tokens_per_s'] / base:>6.2f} {fmt(r['first_text_p50_s']):>8} {fmt(r['first_commit_p50_s']):>10} "
            f"{r['latency_p50_s']:>6.2f} {r['latency_p99_s']:>6.2f}"
        )
    print(f"seeded outputs identical across concurrency levels: {identical}")
    summary = {
        "model": kind,
        "levels": [{k: v for k, v in r.items() if k != "texts"} for r in rows],
        "ratio_at_max": rows[-1]["tokens_per_s"] / base,
        "requests_ratio_at_max": rows[-1]["requests_per_s"] / rows[0]["requests_per_s"],
        "identical_outputs": identical,
        "max_tokens": args.max_tokens,
        "steps": steps,
        "threads": args.threads,
        "workers": args.workers,
        "processes": args.processes,
        "settle": knobs["stream_options"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
