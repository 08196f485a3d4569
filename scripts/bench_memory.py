#!/usr/bin/env python
"""Peak memory of denoising steps at the real vocabulary (262,144) and canvas 256, for batch 1, 4 and 16.

A small random model (hidden 64, 2 layers) keeps the weights out of the picture: what is measured is the step's
vocabulary-wide memory. Each batch size runs in a fresh process: B requests are prefilled, then two batched denoise
steps run (the second one self-conditioned). The peak resident set above the level after prefill is reported, in
bytes and in units of one [B, C, V] fp32 buffer; the design bound is two such buffers (the logits and the
sampling uniforms) plus chunked temporaries (`generate.VOCAB_CHUNK_BYTES` per request chunk). Human table first,
one JSON line last.

    python scripts/bench_memory.py [--batches 1,4,16] [--canvas 256] [--vocab 262144]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(batch: int, canvas: int, vocab: int) -> dict:
    import torch

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
    from tiny import random_model, tiny_config

    from dgemma.config import GenerationSettings
    from dgemma.generate import Generation, Request, denoise_step

    torch.set_num_threads(1)
    config = tiny_config(canvas_length=canvas, vocab_size=vocab, max_position_embeddings=4096)
    model = random_model(config)
    settings = GenerationSettings(max_new_tokens=canvas, steps=8, confidence_threshold=1e-30, eos_token_ids=(1,))
    gens = [Generation(model, Request(tuple(range(3, 19)), settings, seed=i)) for i in range(batch)]
    for g in gens:
        g.prefill()
    base = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to now
        f.write("5")
    for _ in range(2):
        denoise_step(model, gens)
    peak = rss_kib("VmHWM")
    buffer = batch * canvas * vocab * 4
    return {"batch": batch, "peak_above_prefill_bytes": (peak - base) * 1024, "bcv_buffer_bytes": buffer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.canvas, args.vocab)))
        return
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(b), "--canvas", str(args.canvas), "--vocab", str(args.vocab)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        row["buffers"] = round(row["peak_above_prefill_bytes"] / row["bcv_buffer_bytes"], 2)
        rows.append(row)
        print(
            f"batch {b:>2}: peak {row['peak_above_prefill_bytes'] / 2**30:6.2f} GiB above prefill = "
            f"{row['buffers']:.2f} x [B, C, V] fp32 ({row['bcv_buffer_bytes'] / 2**30:.2f} GiB)"
        )
    print(json.dumps({"bench": "vocab_memory", "canvas": args.canvas, "vocab": args.vocab, "rows": rows}))


if __name__ == "__main__":
    main()
