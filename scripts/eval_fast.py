#!/usr/bin/env python
"""What fast mode costs in quality, on the bundled model: each approximation against exact mode.

Conditions: exact (the reference's semantics), `sc_top_k` alone, `sparse_sampling` alone, both, and both with a
smaller step cap (the stop rule unchanged: entropy-bound acceptance, stop when stable and confident). For each:
- held-out self-conditioned denoising loss (data/web/val, the model card's held-out text): noise at 0.5 / 0.75 /
  1.0, a first pass gives the logits, their self-conditioning input (exact or top-k) feeds the scored second pass;
- the model card's quality bar on `eval_bundled`'s 8 prompts x 128 tokens: distinct-4 and known-word share;
- token agreement of seeded outputs with exact mode (same seed and prompt, position by position);
- speed: tokens/s and steps per canvas.
Human table first, one JSON line last.

    python scripts/eval_fast.py [--model DIR] [--top-k 32] [--steps 16,8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_bundled import PROMPTS, WORD, distinct_4

from dgemma.bpe import load_corpus_lines
from dgemma.generate import Pipeline

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def sc_loss(pipe: Pipeline, top_k: int, levels=(0.5, 0.75, 1.0), batches: int = 4, seq: int = 256) -> dict:
    """Mean cross-entropy of the self-conditioned denoising pass over whole canvases of held-out text (the prompt is
    the clean text before each canvas), per noise level."""
    model, c = pipe.model, pipe.canvas_length
    ids = [t for line in load_corpus_lines(ROOT / "data/web/val.txt.gz") for t in pipe.tokenizer.encode(line)]
    rng, gen = random.Random(1234), torch.Generator().manual_seed(1234)
    out = {}
    for level in levels:
        losses = []
        for _ in range(batches):
            start = rng.randrange(0, len(ids) - seq - c)
            prefix, clean = ids[start : start + seq], torch.tensor([ids[start + seq : start + seq + c]])
            cache = model.new_cache()
            model.encode(torch.tensor([prefix]), cache)
            noisy = torch.where(
                torch.rand(clean.shape, generator=gen) < level,
                torch.randint(0, model.text.vocab_size, clean.shape, generator=gen),
                clean,
            )
            first = model.denoise(noisy, cache) / 0.6  # a mid-schedule temperature
            probs = torch.softmax(first, dim=-1)
            soft = model.soft_embedding_top_k(probs, top_k) if top_k else model.soft_embedding_from_probs(probs)
            logits = model.denoise(noisy, cache, soft)
            losses.append(F.cross_entropy(logits[0], clean[0]).item())
        out[f"noise_{level}"] = round(sum(losses) / len(losses), 4)
    return out


def samples(pipe: Pipeline, vocab: set, knobs: dict, max_new: int) -> dict:
    rows, t0 = [], time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        r = pipe.generate(prompt, seed=i, max_new_tokens=max_new, **knobs)
        words = [w.lower() for w in WORD.findall(r.text)]
        rows.append((r, words))
    wall = time.perf_counter() - t0
    steps = [s for r, _ in rows for s in r.steps_per_canvas]
    return {
        "token_ids": [r.token_ids for r, _ in rows],
        "distinct_4": round(sum(distinct_4(w) for _, w in rows) / len(rows), 4),
        "known_word_share": round(
            sum(sum(x in vocab for x in w) for _, w in rows) / max(1, sum(len(w) for _, w in rows)), 4
        ),
        "tokens_per_s": round(sum(len(r.token_ids) for r, _ in rows) / wall, 1),
        "steps_per_canvas": round(sum(steps) / len(steps), 2),
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        same += sum(p == q for p, q in zip(x, y))
        total += n
    return round(same / max(total, 1), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--steps", default="16,8", help="step caps of the combined fast conditions")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model, device="cpu")
    vocab = {w.lower() for line in load_corpus_lines(ROOT / "data/web/train.txt.gz") for w in WORD.findall(line)}
    pipe.generate(PROMPTS[0], seed=0, max_new_tokens=pipe.canvas_length, steps=2)  # warm-up
    k = args.top_k
    conditions = [
        ("exact", {}),
        (f"sc_top_k={k}", {"sc_top_k": k}),
        ("sparse_sampling", {"sparse_sampling": 1}),
        ("both", {"sc_top_k": k, "sparse_sampling": 1}),
    ] + [(f"both, steps {n}", {"sc_top_k": k, "sparse_sampling": 1, "steps": int(n)}) for n in args.steps.split(",")]
    results, exact_ids = [], None
    losses = {0: sc_loss(pipe, 0), k: sc_loss(pipe, k)}
    for name, knobs in conditions:
        r = samples(pipe, vocab, knobs, args.max_new_tokens)
        ids = r.pop("token_ids")
        exact_ids = exact_ids or ids
        r.update(condition=name, knobs=knobs, agreement_with_exact=agreement(ids, exact_ids))
        r["sc_loss"] = losses[knobs.get("sc_top_k", 0)]
        results.append(r)
    base = results[0]["tokens_per_s"]
    print(
        f"{'condition':<20}{'loss@0.5':>9}{'@0.75':>7}{'@1.0':>7}{'dist-4':>8}{'known':>7}{'agree':>7}{'tok/s':>8}{'x':>6}{'steps':>7}"
    )
    for r in results:
        loss = r["sc_loss"]
        print(
            f"{r['condition']:<20}{loss['noise_0.5']:>9.3f}{loss['noise_0.75']:>7.3f}{loss['noise_1.0']:>7.3f}"
            f"{r['distinct_4']:>8.3f}{r['known_word_share']:>7.3f}{r['agreement_with_exact']:>7.2f}"
            f"{r['tokens_per_s']:>8.1f}{r['tokens_per_s'] / base:>6.2f}{r['steps_per_canvas']:>7.1f}"
        )
    print(json.dumps({"bench": "fast_mode_quality", "top_k": k, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
