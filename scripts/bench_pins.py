#!/usr/bin/env python
"""What pins cost per denoising step: the same batch of requests, with no pins (the reference path), with a pinned
suffix and a vocabulary limit on the gap (infill), and with a JSON-schema layout (structured output).

Each condition runs the same number of denoise steps on the same prompts and seeds (early stopping off: steps are
fixed), after a warm-up outside the timed region. Reports ms per batched step, the ratio to the unpinned baseline,
and where the pinned step's extra time goes (time inside `Pins.constrain`, and the rest of the step). Human table
first, one JSON line last.

    python scripts/bench_pins.py [--model DIR] [--batch 4] [--steps 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dgemma.generate import Generation, Pipeline, denoise_step
from dgemma.sampler import Pins
from dgemma.structured import structured_layout

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
}


def requests(pipe: Pipeline, kind: str, batch: int, steps: int):
    settings = pipe.settings.override(steps=steps, confidence_threshold=1e-30, max_new_tokens=pipe.canvas_length)
    prompts = [pipe.prompt_ids(f"In the beginning {i}") for i in range(batch)]
    if kind == "plain":
        return [pipe.request(prompt_ids=p, seed=i, **_knobs(settings)) for i, p in enumerate(prompts)]
    if kind == "infill":
        suffix = pipe.tokenizer.encode(" and the earth was without form.", parse_special=False)
        return [pipe.infill_requests(p, suffix, [8], i, **_knobs(settings))[0] for i, p in enumerate(prompts)]
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
    layout, budget = structured_layout(rf, pipe.tokenizer, pipe.canvas_length, pipe.model.text.vocab_size, settings)
    knobs = {**_knobs(settings), "max_new_tokens": min(budget, pipe.canvas_length)}
    return [pipe.request(prompt_ids=p, seed=i, layout=layout, **knobs) for i, p in enumerate(prompts)]


def _knobs(settings) -> dict:
    return {"steps": settings.steps, "confidence_threshold": settings.confidence_threshold}


def run(pipe: Pipeline, kind: str, batch: int, steps: int) -> tuple[float, float]:
    """(ms per batched step, ms per step inside Pins.constrain) over one canvas of `steps` steps."""
    gens = [Generation(pipe.model, r) for r in requests(pipe, kind, batch, steps)]
    for g in gens:
        g.prefill()
    spent = [0.0]
    original = Pins.constrain

    def timed(self, z):
        t = time.perf_counter()
        original(self, z)
        spent[0] += time.perf_counter() - t

    Pins.constrain = timed
    try:
        t0 = time.perf_counter()
        for _ in range(steps - 1):  # the last step commits: keep it out (the commit is the same for all kinds)
            denoise_step(pipe.model, gens)
        total = time.perf_counter() - t0
    finally:
        Pins.constrain = original
    return 1000 * total / (steps - 1), 1000 * spent[0] / (steps - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model, device="cpu")
    kinds = ("plain", "infill", "structured")
    for kind in kinds:
        run(pipe, kind, args.batch, 4)  # warm-up
    results = {k: [] for k in kinds}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every kind alike
        for kind in kinds:
            results[kind].append(run(pipe, kind, args.batch, args.steps))
    base = min(ms for ms, _ in results["plain"])
    print(f"batch {args.batch}, {args.steps} steps, {args.threads} thread(s), best of {args.repeats}\n")
    print(f"{'layout':<11} {'ms/step':>8} {'x plain':>8} {'constrain ms':>13} {'share':>6}")
    out = {}
    for kind in kinds:
        ms, pin_ms = min(results[kind])
        out[kind] = {"ms_per_step": round(ms, 3), "ratio": round(ms / base, 3), "constrain_ms": round(pin_ms, 3)}
        print(f"{kind:<11} {ms:8.2f} {ms / base:8.3f} {pin_ms:13.3f} {pin_ms / ms:6.1%}")
    print(json.dumps({"bench": "pins", "batch": args.batch, "steps": args.steps, "threads": args.threads, **out}))


if __name__ == "__main__":
    main()
