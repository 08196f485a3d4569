"""Benchmark dgemma's generate against transformers 5.23.0's on the same checkpoint, prompt and settings.

Both engines run under dgemma's seeded protocol (same canvases, same sampling noise), with early stopping switched
off (tiny confidence threshold) so both run exactly `--steps` denoising passes per canvas. Warm-up runs happen
before the timed region; each engine is timed `--repeats` times and the median is reported. Prints a table, then
one JSON line last.

    python scripts/bench.py                       # builds a random reference (hidden 256, 4 layers, canvas 32)
    python scripts/bench.py --model DIR           # any DiffusionGemma checkpoint transformers can also load
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import transformers
from reference import VISION, build, seeded_protocol
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, EntropyBoundSamplerConfig

from dgemma.config import read_json
from dgemma.generate import Pipeline


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: build a random reference model)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--canvas", type=int, default=32)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--canvases", type=int, default=2, help="canvases generated per run")
    p.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (all of them run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--fast-steps", type=int, default=None, help="steps per canvas of the fast-mode row (default: --steps)"
    )
    p.add_argument("--sc-top-k", type=int, default=32, help="fast mode: self-conditioning from the top-k probabilities")
    return p.parse_args(argv)


def build_reference(args, out: Path) -> Path:
    h = args.hidden
    layers = ["sliding_attention"] * (args.layers - 1) + ["full_attention"]
    model = build(
        seed=args.seed,
        canvas_length=args.canvas,
        vocab_size=args.vocab,
        hidden_size=h,
        intermediate_size=2 * h,
        moe_intermediate_size=h // 2,
        num_hidden_layers=args.layers,
        layer_types=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=h // 4,
        global_head_dim=h // 2,
        num_global_key_value_heads=1,
        sliding_window=64,
        num_experts=args.experts,
        top_k_experts=args.top_k,
        max_position_embeddings=8192,
    )
    model.save_pretrained(out)
    return out


def load_reference(model_dir: Path, device: str):
    """transformers' default kernels (what `from_pretrained` picks). A dgemma-exported checkpoint has no vision
    tower; give it the tiny one so transformers does not build (and randomly fill) the 0.5 B-parameter default."""
    raw = read_json(model_dir / "config.json")
    kwargs = {}
    if "vision_config" not in raw:
        kwargs["config"] = DiffusionGemmaConfig.from_pretrained(model_dir, vision_config=VISION)
    return DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=torch.float32, **kwargs).to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_dgemma(pipe, prompt, seed, knobs, device) -> tuple[float, list[int], int]:
    sync(device)
    t0 = time.perf_counter()
    r = pipe.generate(prompt_ids=prompt, seed=seed, **knobs)
    sync(device)
    return time.perf_counter() - t0, r.token_ids, r.forward_passes


def time_reference(model, prompt, seed, knobs, device) -> tuple[float, list[int]]:
    kwargs = {
        "max_new_tokens": knobs["max_new_tokens"],
        "max_denoising_steps": knobs["steps"],
        "confidence_threshold": knobs["confidence_threshold"],
        "sampler_config": EntropyBoundSamplerConfig(entropy_bound=0.1),
    }
    ids = torch.tensor([prompt], device=device)
    sync(device)
    t0 = time.perf_counter()
    with seeded_protocol(model, seed), torch.no_grad():
        out = model.generate(ids, **kwargs)
    sync(device)
    return time.perf_counter() - t0, out.sequences[0, len(prompt) :].tolist()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_reference(args, Path(tmp) / "ref")
        pipe = Pipeline.load(model_dir, dtype="float32", device=args.device)
        ref = load_reference(model_dir, args.device)
    c, v = pipe.model.config.canvas_length, pipe.model.text.vocab_size
    prompt = torch.randint(3, v, (args.prompt_len,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    knobs = {
        "max_new_tokens": args.canvases * c,
        "steps": args.steps,
        "confidence_threshold": 1e-9,
        "entropy_bound": 0.1,
    }
    warm = dict(knobs, max_new_tokens=c, steps=2)
    time_dgemma(pipe, prompt, args.seed, warm, args.device)  # warm-up, outside the timed region
    time_reference(ref, prompt, args.seed, warm, args.device)
    fast = dict(knobs, steps=args.fast_steps or args.steps, sc_top_k=args.sc_top_k, sparse_sampling=1)
    time_dgemma(pipe, prompt, args.seed, dict(fast, max_new_tokens=c, steps=2), args.device)
    dg_times, hf_times, fast_times = [], [], []
    for i in range(args.repeats):  # interleaved so machine noise hits both engines alike
        t, dg_tokens, passes = time_dgemma(pipe, prompt, args.seed + i, knobs, args.device)
        dg_times.append(t)
        t, hf_tokens = time_reference(ref, prompt, args.seed + i, knobs, args.device)
        hf_times.append(t)
        t, fast_tokens, fast_passes = time_dgemma(pipe, prompt, args.seed + i, fast, args.device)
        fast_times.append(t)
    assert passes == args.canvases * args.steps, passes
    n_new = args.canvases * c
    dg, hf, fa = statistics.median(dg_times), statistics.median(hf_times), statistics.median(fast_times)
    rows = [("dgemma", dg, passes), ("transformers", hf, passes), ("dgemma fast", fa, fast_passes)]
    print(
        f"checkpoint: {args.model or 'random reference'}  device {args.device}  threads {torch.get_num_threads()}  "
        f"prompt {len(prompt)}  {args.canvases} canvases x {c} tokens x {args.steps} steps  median of {args.repeats}"
    )
    print(f"{'engine':<14}{'total s':>10}{'ms/step':>10}{'tokens/s':>10}")
    for name, t, n in rows:
        print(f"{name:<14}{t:>10.3f}{1000 * t / n:>10.1f}{n_new / t:>10.1f}")
    match = dg_tokens == hf_tokens
    print(f"dgemma/transformers time ratio {dg / hf:.3f} (speed-up x{hf / dg:.2f}); tokens match: {match}")
    agree = sum(a == b for a, b in zip(fast_tokens, dg_tokens)) / max(len(dg_tokens), 1)
    print(
        f"fast mode (sc_top_k={args.sc_top_k}, sparse sampling, {fast['steps']} steps): speed-up x{hf / fa:.2f} over "
        f"transformers; token agreement with exact mode {agree:.1%} (a random model: agreement is not quality)"
    )
    print(
        json.dumps(
            {
                "checkpoint": str(args.model or "random-reference"),
                "device": args.device,
                "dtype": "float32",
                "threads": torch.get_num_threads(),
                "prompt_tokens": len(prompt),
                "canvas_length": c,
                "canvases": args.canvases,
                "steps_per_canvas": args.steps,
                "repeats": args.repeats,
                "dgemma": {"total_s": dg, "step_ms": 1000 * dg / passes, "tokens_per_s": n_new / dg},
                "transformers": {"total_s": hf, "step_ms": 1000 * hf / passes, "tokens_per_s": n_new / hf},
                "ratio": dg / hf,
                "speedup": hf / dg,
                "tokens_match": match,
                "fast": {
                    "total_s": fa,
                    "steps_per_canvas": fast["steps"],
                    "sc_top_k": args.sc_top_k,
                    "sparse_sampling": 1,
                    "tokens_per_s": n_new / fa,
                    "speedup": hf / fa,
                    "token_agreement_with_exact": agree,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
