#!/usr/bin/env python
"""Quality bar of a trained small model (issue 3): 8 fixed prompts x 128 new tokens with default sampler settings.

Reports distinct-4-gram ratio (word level, per sample), the share of generated words that occur in the training
corpus, speed (tokens/s, steps per canvas), and prints the samples. Human-readable lines first, one JSON line last.

    python scripts/eval_bundled.py [--model DIR] [--corpus data/web/train.txt.gz] [--markdown samples.md]
                                   [--temperature T] [--top-p P]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from dgemma.bpe import load_corpus_lines
from dgemma.generate import Pipeline

PROMPTS = [
    "In the beginning",
    "And the LORD said to Moses,",
    "Blessed is the man who",
    "Jesus answered them,",
    "The word of the LORD came to",
    "Now it happened after these things, that",
    "Praise the LORD!",
    "My son, listen to",
]
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def distinct_4(words: list[str]) -> float:
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return len(set(grams)) / len(grams) if grams else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[1] / "data/web/train.txt.gz"))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0, help="scales the t_min..t_max schedule (0: argmax)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus cut of each position's sample")
    ap.add_argument("--markdown", default=None, help="also write the samples as a markdown file")
    args = ap.parse_args()

    vocab = {w.lower() for line in load_corpus_lines(args.corpus) for w in WORD.findall(line)}
    pipe = Pipeline.load(args.model, device="cpu")
    pipe.generate(PROMPTS[0], seed=0, max_new_tokens=pipe.model.config.canvas_length, steps=2)  # warm-up
    rows, md = [], []
    t0 = time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        knobs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
        r = pipe.generate(prompt, seed=args.seed + i, **knobs)
        words = [w.lower() for w in WORD.findall(r.text)]
        known = sum(w in vocab for w in words)
        rows.append(
            {
                "prompt": prompt,
                "text": r.text,
                "distinct_4": distinct_4(words),
                "words": len(words),
                "known": known,
                "tokens": len(r.token_ids),
                "steps": r.steps_per_canvas,
                "seconds": r.total_s,
            }
        )
        print(
            f"--- {prompt!r}  distinct-4 {rows[-1]['distinct_4']:.2f}  known {known}/{len(words)}  steps {r.steps_per_canvas}"
        )
        print(prompt + r.text)
        md.append(f"**{prompt}**{r.text}\n")
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in rows)
    steps = [s for r in rows for s in r["steps"]]
    summary = {
        "distinct_4_mean": round(sum(r["distinct_4"] for r in rows) / len(rows), 4),
        "distinct_4_min": round(min(r["distinct_4"] for r in rows), 4),
        "known_word_share": round(sum(r["known"] for r in rows) / max(1, sum(r["words"] for r in rows)), 4),
        "tokens_per_s": round(tokens / wall, 2),
        "steps_per_canvas_mean": round(sum(steps) / len(steps), 2),
        "tokens_per_forward": round(tokens / sum(steps), 3),
        "prompts": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
    }
    if args.markdown:
        Path(args.markdown).write_text("\n".join(md), encoding="utf-8")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
