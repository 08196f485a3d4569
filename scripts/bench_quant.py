#!/usr/bin/env python
"""What quantization costs, on the bundled model (or --model): fp32 against int8 and int4, all in one run.

For each scheme (fp32 = the float checkpoint as shipped; int8 = per-channel linears and experts + int8 embedding;
int4 g64 / g32 = group-wise linears and experts + int8 embedding):
- held-out denoising loss (data/web/val, the model card's held-out text) at noise 0.25 / 0.5 / 0.75 / 1.0: a prefix
  of clean text is encoded into the cache, a canvas of the following text is corrupted by uniform replacement, and
  the cross-entropy of the denoise logits is averaged over the canvas (the inference path: cache, kernels, head);
- agreement of seeded outputs with fp32: the same prompts and seeds, position by position over 64 new tokens;
- weight bytes, and the denoise step time (canvas of the checkpoint, 256-token prompt), one thread by default.
Every scheme is quantized in memory with `quantize.quantize_model`, which `dgemma quantize` reproduces bit for bit
(tests/test_quantize.py). Human table first, one JSON line last.

    python scripts/bench_quant.py [--model DIR] [--batches 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dgemma.bpe import load_corpus_lines
from dgemma.generate import Pipeline
from dgemma.quantize import QuantWeight, Scheme, quantize_model

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = {"fp32": None, "int8": Scheme("int8"), "int4-g64": Scheme("int4", 64), "int4-g32": Scheme("int4", 32)}
LEVELS = (0.25, 0.5, 0.75, 1.0)
PROMPTS = ["In the beginning", "And the LORD said to Moses,", "It is a truth universally acknowledged", "Call me"]


@torch.no_grad()
def losses(pipe: Pipeline, ids: list[int], batches: int, prefix: int = 128) -> dict:
    model, c = pipe.model, pipe.canvas_length
    rng, gen = random.Random(1234), torch.Generator().manual_seed(1234)
    out = {}
    for level in LEVELS:
        total = 0.0
        for _ in range(batches):
            start = rng.randrange(0, len(ids) - prefix - c)
            clean = torch.tensor([ids[start + prefix : start + prefix + c]])
            noisy = torch.where(
                torch.rand(clean.shape, generator=gen) < level,
                torch.randint(0, model.text.vocab_size, clean.shape, generator=gen),
                clean,
            )
            cache = model.new_cache()
            model.encode(torch.tensor([ids[start : start + prefix]]), cache)
            total += F.cross_entropy(model.denoise(noisy, cache)[0], clean[0]).item()
        out[f"noise_{level}"] = total / batches
    return out


def samples(pipe: Pipeline) -> list[list[int]]:
    return [pipe.generate(p, seed=i, max_new_tokens=64).token_ids for i, p in enumerate(PROMPTS)]


@torch.no_grad()
def step_ms(pipe: Pipeline, prompt: int = 256, reps: int = 10) -> float:
    model, c = pipe.model, pipe.canvas_length
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.text.vocab_size, (1, prompt + c), generator=g)
    cache = model.new_cache()
    model.encode(ids[:, :prompt], cache)
    soft = model.soft_embedding(model.denoise(ids[:, prompt:], cache))
    model.denoise(ids[:, prompt:], cache, soft)  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        model.denoise(ids[:, prompt:], cache, soft)
    return (time.perf_counter() - t) / reps * 1e3


def weight_bytes(model) -> int:
    """Quantized weights in their kernels' layout, plus the float tensors a checkpoint holds (the state dict: the
    kernels' buffers and RoPE tables are not persistent)."""
    quant = sum(m.nbytes for m in model.modules() if isinstance(m, QuantWeight))
    return quant + sum(t.nbytes for t in model.state_dict().values())


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for s, t in zip(a, b) for x, y in zip(s, t)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = Pipeline.load(args.model, dtype="float32", device="cpu")
    ids = [t for line in load_corpus_lines(ROOT / "data/web/val.txt.gz") for t in base.tokenizer.encode(line)]
    results, ref_samples = {}, None
    for name, scheme in SCHEMES.items():
        pipe = Pipeline.load(args.model, dtype="float32", device="cpu")
        if scheme is not None:
            pipe.model = quantize_model(pipe.model, scheme)
        out = samples(pipe)
        ref_samples = ref_samples or out
        results[name] = {
            **losses(pipe, ids, args.batches),
            "agreement_with_fp32": agreement(out, ref_samples),
            "weight_bytes": weight_bytes(pipe.model),
            "step_ms": step_ms(pipe),
        }
    fp32 = results["fp32"]
    print(
        f"{'scheme':10s} " + " ".join(f"loss@{lv:<5}" for lv in LEVELS) + "  vs fp32 @0.5/0.75   agree  MB    ms/step"
    )
    for name, r in results.items():
        worse = [100 * (r[f"noise_{lv}"] / fp32[f"noise_{lv}"] - 1) for lv in (0.5, 0.75)]
        r["worse_pct"] = {f"noise_{lv}": 100 * (r[f"noise_{lv}"] / fp32[f"noise_{lv}"] - 1) for lv in LEVELS}
        r["speed_vs_fp32"] = fp32["step_ms"] / r["step_ms"]
        print(
            f"{name:10s} "
            + " ".join(f"{r[f'noise_{lv}']:10.4f}" for lv in LEVELS)
            + f"  {worse[0]:+6.2f}% {worse[1]:+6.2f}%   {r['agreement_with_fp32']:.3f}  "
            f"{r['weight_bytes'] / 1e6:5.2f} {r['step_ms']:6.2f}"
        )
    print(json.dumps({"model": str(base.model_dir), "threads": args.threads, "batches": args.batches, **results}))


if __name__ == "__main__":
    main()
