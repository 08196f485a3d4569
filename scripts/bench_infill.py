#!/usr/bin/env python
"""Infill quality on the bundled model: what the pinned suffix buys over a plain continuation of the prefix.

Data: the first K documents of data/web/val.txt.gz (held-out books, one chapter per line) whose token count is at
least GAP_START + max(N) + MIN_SUFFIX. In each, the N tokens starting at token index max(4, len // 3) are blanked
(the same start for every N, so longer gaps extend the shorter ones to the right); the prefix is everything before
the gap (with BOS), the suffix everything after it. Per (doc, N), all with seed `--seed + doc index`:

- prefix-only:   `Pipeline.generate`, N new tokens after the prefix, no suffix (the baseline);
- infill-oracle: `Pipeline.infill` with the suffix pinned and the true length (`lengths=[N]`);
- infill-chosen: `Pipeline.infill` with the default candidate lengths (`infill_lengths`); the engine chooses.

Metrics: token accuracy (position-wise matches over the first min(len) positions, divided by N), exact match, and for
infill-chosen whether the chosen length is N, the nearest candidate to N, and |chosen - N|. Diagnostic: the seam NLL
(`Generation._probe`, the chooser's main score term) of the true fill, against that of the model's own fill of the
true length: the chooser can only find N if the truth scores lower. Wall time per condition after one warm-up of
each kind. Human table first, one JSON line last.

    python scripts/bench_infill.py [--model DIR] [--docs 64] [--spans 4,8,16] [--seed 0] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from dgemma.bpe import load_corpus_lines
from dgemma.generate import Generation, Pipeline, run_batch
from dgemma.infill import infill_lengths
from dgemma.sampler import Layout

VAL = Path(__file__).resolve().parents[1] / "data/web/val.txt.gz"
MIN_PREFIX, MIN_SUFFIX = 4, 8
CONDITIONS = ("prefix_only", "infill_oracle", "infill_chosen")
EXAMPLES = 3  # docs shown decoded per N
CANDIDATE_TABLES = 2  # docs whose candidate score tables are shown per N


def gap_start(n_tokens: int) -> int:
    return max(MIN_PREFIX, n_tokens // 3)


def pick_docs(lines: list[str], pipe: Pipeline, k: int, longest_gap: int) -> list[list[int]]:
    """Token ids of the first k lines long enough for a prefix, the longest gap and MIN_SUFFIX suffix tokens."""
    docs = []
    for line in lines:
        ids = pipe.tokenizer.encode(line, parse_special=False)
        if len(ids) >= gap_start(len(ids)) + longest_gap + MIN_SUFFIX:
            docs.append(ids)
        if len(docs) == k:
            break
    return docs


def token_acc(fill: list[int], truth: list[int]) -> float:
    return sum(a == b for a, b in zip(fill, truth)) / len(truth)


def nearest(candidates: list[int], n: int) -> int:
    return min(candidates, key=lambda c: (abs(c - n), c))


def truth_seam_nll(pipe: Pipeline, prompt: list[int], gap: list[int], suffix: list[int], seed: int) -> float:
    """The chooser's seam NLL for the true fill: the infill request of length N with the gap pinned to the truth."""
    request = pipe.infill_requests(prompt, suffix, [len(gap)], seed)[0]
    lay = request.layout
    fixed = {**lay.fixed, **dict(enumerate(gap))}
    gen = Generation(
        pipe.model, dataclasses.replace(request, layout=Layout(fixed, lay.masks, lay.mask_at, probe=lay.probe))
    )
    for _ in run_batch(pipe.model, [gen]):
        pass
    assert gen.token_ids[: len(gap)] == gap
    return gen.seam_nll


def run_doc(pipe: Pipeline, ids: list[int], n: int, seed: int) -> dict:
    """Every condition on one (doc, N): fills, timings and the chooser's tables."""
    s = gap_start(len(ids))
    prompt, gap, suffix = [pipe.tokenizer.bos_id] + ids[:s], ids[s : s + n], ids[s + n :]
    out = {"prompt": prompt, "gap": gap, "seconds": {}}
    t0 = time.perf_counter()
    request = pipe.request(prompt_ids=prompt, max_new_tokens=n, seed=seed)  # no draft events, as infill
    out["prefix_only"] = pipe.generate(request=request).token_ids
    t1 = time.perf_counter()
    oracle = pipe.infill(prefix_ids=prompt, suffix_ids=suffix, lengths=[n], seed=seed)
    t2 = time.perf_counter()
    chosen = pipe.infill(prefix_ids=prompt, suffix_ids=suffix, seed=seed)
    t3 = time.perf_counter()
    out["seconds"] = {"prefix_only": t1 - t0, "infill_oracle": t2 - t1, "infill_chosen": t3 - t2}
    out["infill_oracle"], out["infill_chosen"] = oracle.token_ids, chosen.token_ids
    out["oracle_seam_nll"] = oracle.candidates[0]["seam_nll"]
    out["truth_seam_nll"] = truth_seam_nll(pipe, prompt, gap, suffix, seed)
    out["chosen_length"], out["candidates"] = chosen.length, chosen.candidates
    return out


def summarize(rows: list[dict], n: int) -> dict:
    res = {}
    for cond in CONDITIONS:
        accs = [token_acc(r[cond], r["gap"]) for r in rows]
        res[cond] = {
            "token_acc": round(sum(accs) / len(rows), 4),
            "exact": round(sum(r[cond] == r["gap"] for r in rows) / len(rows), 4),
            "ms_per_call": round(1000 * sum(r["seconds"][cond] for r in rows) / len(rows), 1),
        }
    lengths = [r["chosen_length"] for r in rows]
    cands = [c["length"] for c in rows[0]["candidates"]]
    res["infill_chosen"].update(
        length_acc=round(sum(c == n for c in lengths) / len(rows), 4),
        n_in_candidates=n in cands,
        nearest_candidate=nearest(cands, n),
        nearest_acc=round(sum(c == nearest(cands, n) for c in lengths) / len(rows), 4),
        mean_abs_len_err=round(sum(abs(c - n) for c in lengths) / len(rows), 3),
        mean_len_err=round(sum(c - n for c in lengths) / len(rows), 3),
        chosen_length_counts={str(c): lengths.count(c) for c in sorted(set(lengths))},
    )
    base, oracle = res["prefix_only"]["token_acc"], res["infill_oracle"]["token_acc"]
    res["suffix_gain_token_acc"] = round(oracle / base, 3) if base else None
    res["suffix_diff_token_acc"] = round(oracle - base, 4)
    res["oracle_time_ratio"] = round(res["infill_oracle"]["ms_per_call"] / res["prefix_only"]["ms_per_call"], 3)
    res["chosen_time_ratio"] = round(res["infill_chosen"]["ms_per_call"] / res["prefix_only"]["ms_per_call"], 3)
    truth, fill = [r["truth_seam_nll"] for r in rows], [r["oracle_seam_nll"] for r in rows]
    res["seam_nll"] = {
        "truth_mean": round(sum(truth) / len(rows), 3),
        "oracle_fill_mean": round(sum(fill) / len(rows), 3),
        "truth_lower_share": round(sum(t < f for t, f in zip(truth, fill)) / len(rows), 4),
    }
    return res


def print_table(results: dict) -> None:
    print(f"\n{'N':>3}  {'condition':<14} {'token_acc':>9} {'exact':>6} {'ms/call':>8} {'x base':>7}")
    for n, res in results.items():
        base_ms = res["prefix_only"]["ms_per_call"]
        for cond in CONDITIONS:
            r = res[cond]
            print(f"{n:>3}  {cond:<14} {r['token_acc']:>9.4f} {r['exact']:>6.3f} {r['ms_per_call']:>8.1f} "
                  f"{r['ms_per_call'] / base_ms:>7.2f}")  # fmt: skip
        c = res["infill_chosen"]
        print(f"     suffix gain (oracle / prefix-only token acc): {res['suffix_gain_token_acc']}x, "
              f"diff {res['suffix_diff_token_acc']:+.4f}")  # fmt: skip
        print(f"     chosen length: ==N {c['length_acc']:.3f} (N among candidates: {c['n_in_candidates']}), "
              f"==nearest candidate {c['nearest_candidate']}: {c['nearest_acc']:.3f}, mean |err| "
              f"{c['mean_abs_len_err']}, mean signed err {c['mean_len_err']:+}, counts {c['chosen_length_counts']}")  # fmt: skip
        sn = res["seam_nll"]
        print(f"     seam NLL: truth {sn['truth_mean']}, model's length-N fill {sn['oracle_fill_mean']}, "
              f"truth lower in {sn['truth_lower_share']:.3f} of docs")  # fmt: skip


def print_examples(pipe: Pipeline, per_n: dict[int, list[dict]]) -> None:
    show = lambda ids: repr(pipe.decode(ids))
    for n, rows in per_n.items():
        print(f"\n--- examples, N={n}: prefix tail | truth | prefix-only | infill-oracle | infill-chosen (length)")
        for i, r in enumerate(rows[:EXAMPLES]):
            tail = pipe.decode(r["prompt"][-12:])
            print(f"[{i}] …{tail!r} | {show(r['gap'])} | {show(r['prefix_only'])} | {show(r['infill_oracle'])} | "
                  f"{show(r['infill_chosen'])} ({r['chosen_length']})")  # fmt: skip
        for i, r in enumerate(rows[:CANDIDATE_TABLES]):
            print(f"  candidates, doc {i}, N={n} (truth seam NLL {r['truth_seam_nll']:.3f}):")
            print(f"  {'len':>4} {'score':>7} {'seam_nll':>8} {'entropy':>8}  text")
            for c in r["candidates"]:
                mark = "*" if c["length"] == r["chosen_length"] else " "
                print(f" {mark}{c['length']:>4} {c['score']:>7.3f} {c['seam_nll']:>8.3f} {c['entropy']:>8.4f}  "
                      f"{c['text'][:70]!r}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--data", default=str(VAL))
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--spans", default="4,8,16", help="gap lengths N, comma separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true", help="8 docs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spans = sorted({int(s) for s in args.spans.split(",")})
    k = 8 if args.quick else args.docs

    pipe = Pipeline.load(args.model, device="cpu")
    lines = load_corpus_lines(args.data)
    docs = pick_docs(lines, pipe, k, max(spans))
    if not docs:
        raise SystemExit(f"no document in {args.data} has {MIN_PREFIX + max(spans) + MIN_SUFFIX} tokens")
    if len(docs) < k:
        print(f"note: only {len(docs)} of {len(lines)} documents qualify (asked for {k})")
    run_doc(pipe, docs[0], spans[0], args.seed)  # warm-up of every kind, outside the timing

    t0 = time.perf_counter()
    per_n: dict[int, list[dict]] = {n: [] for n in spans}
    for i, ids in enumerate(docs):
        for n in spans:
            per_n[n].append(run_doc(pipe, ids, n, args.seed + i))
        print(f"doc {i + 1}/{len(docs)} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0

    results = {n: summarize(rows, n) for n, rows in per_n.items()}
    print_examples(pipe, per_n)
    print(f"\ninfill on {len(docs)} docs of {Path(args.data).name}, gap at max({MIN_PREFIX}, len // 3), "
          f"seed {args.seed}+doc, {args.threads} thread(s), candidates {infill_lengths(pipe.canvas_length)}; "
          f"{seconds:.1f} s")  # fmt: skip
    print_table(results)
    print(json.dumps({
        "bench": "infill", "model": str(pipe.model_dir), "data": Path(args.data).name, "docs": len(docs),
        "spans": spans, "seed": args.seed, "threads": args.threads, "gap_start": f"max({MIN_PREFIX}, len // 3)",
        "candidates": infill_lengths(pipe.canvas_length), "results": {str(n): r for n, r in results.items()},
        "seconds": round(seconds, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
