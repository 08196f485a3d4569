#!/usr/bin/env python
"""Turn-2 time to first token with and without the multi-turn prefix cache.

A conversation: a long system prompt (held-out corpus text, about --system tokens), a user turn, the model's
reply, a second user turn. Turn 1 runs once per condition; then turn 2 is timed, from the call to the first
released token (settled streaming, as the server and `dgemma chat` stream). "cache" reuses turn 1's encoder KV
(`cache.PrefixCache`), "cold" uses a prefix cache that keeps nothing (same block-wise prefill, so the same
tokens). Conditions alternate for --rounds rounds; medians are reported, with where the time goes (prefill vs the
first canvas's denoising). Human table first, one JSON line last.

    python scripts/bench_prefix.py [--model DIR] [--system 500 1500 3000] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import torch

from dgemma.cache import PrefixCache
from dgemma.generate import Generation, Pipeline, Settle, run_batch

VAL = Path(__file__).resolve().parent.parent / "data" / "web" / "val.txt.gz"


def system_text(pipe: Pipeline, tokens: int) -> str:
    with gzip.open(VAL, "rt", encoding="utf-8") as f:
        words = f.read().split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest word prefix within `tokens` tokens
        mid = (lo + hi + 1) // 2
        if len(pipe.tokenizer.encode(" ".join(words[:mid]))) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def ttft(pipe: Pipeline, ids: list[int], prefix: PrefixCache, seed: int) -> dict:
    request = pipe.request(prompt_ids=ids, seed=seed, settle=Settle(), max_new_tokens=pipe.canvas_length)
    gen = Generation(pipe.model, request)
    t0 = time.perf_counter()
    first = None
    for _, events in run_batch(pipe.model, [gen], prefix):
        if first is None and any(getattr(e, "token_ids", None) for e in events):
            first = time.perf_counter() - t0
            break
    return {"ttft_s": first, "prefill_s": gen.prefill_s, "cached": gen.cached_tokens, "prompt": len(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--system", type=int, nargs="+", default=[500, 1500, 3000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model, device="cpu")
    rows = []
    for size in args.system:
        system = system_text(pipe, size)
        turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Tell me about the land."}]
        reply = pipe.generate(prompt_ids=pipe.prompt_ids(messages=turn1), seed=0, max_new_tokens=64).text
        turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the sea?"}]
        ids1, ids2 = pipe.prompt_ids(messages=turn1), pipe.prompt_ids(messages=turn2)
        runs: dict[str, list[dict]] = {"cache": [], "cold": []}
        for r in range(args.rounds + 1):  # round 0 warms up
            for cond in ("cache", "cold"):
                prefix = PrefixCache(1 << 30 if cond == "cache" else 0, pipe.canvas_length)
                ttft(pipe, ids1, prefix, seed=r)  # turn 1 fills the cache (or not)
                out = ttft(pipe, ids2, prefix, seed=r)
                if r:
                    runs[cond].append(out)
        med = {c: {k: statistics.median(x[k] for x in v) for k in ("ttft_s", "prefill_s")} for c, v in runs.items()}
        rows.append(
            {
                "system_tokens": size,
                "turn2_prompt_tokens": len(ids2),
                "cached_tokens": runs["cache"][0]["cached"],
                "ttft_cache_ms": round(1000 * med["cache"]["ttft_s"], 1),
                "ttft_cold_ms": round(1000 * med["cold"]["ttft_s"], 1),
                "prefill_cache_ms": round(1000 * med["cache"]["prefill_s"], 1),
                "prefill_cold_ms": round(1000 * med["cold"]["prefill_s"], 1),
                "speedup": round(med["cold"]["ttft_s"] / med["cache"]["ttft_s"], 2),
            }
        )
    print(
        f"{'system':>7} {'prompt':>7} {'cached':>7} {'TTFT cache':>11} {'TTFT cold':>10} "
        f"{'prefill cache':>14} {'prefill cold':>13} {'speedup':>8}"
    )
    for r in rows:
        print(
            f"{r['system_tokens']:>7} {r['turn2_prompt_tokens']:>7} {r['cached_tokens']:>7} "
            f"{r['ttft_cache_ms']:>9.1f}ms {r['ttft_cold_ms']:>8.1f}ms {r['prefill_cache_ms']:>12.1f}ms "
            f"{r['prefill_cold_ms']:>11.1f}ms {r['speedup']:>7.2f}x"
        )
    print(
        json.dumps({"bench": "prefix_cache_turn2_ttft", "threads": args.threads, "rounds": args.rounds, "rows": rows})
    )


if __name__ == "__main__":
    main()
