#!/usr/bin/env python
"""GPU benchmark of the denoising step on the real 26B-A4B text shapes, against the weight-bandwidth bound.

No checkpoint: the real text config (hidden 2816, 30 layers, 128 experts top-8, vocab 262144) is built directly on
the GPU with random bf16 weights (`--layers` truncates it for a quick look; the bound scales with it). It reports:
- the device's copy bandwidth, measured here (a large device-to-device copy: read + write bytes / time);
- the denoise step (canvas 256 against a prompt of 1,024 tokens) for batch 1, 4 and 16, CUDA-event timed;
- a whole canvas at a fixed 20 steps through the full sampler path (`generate.denoise_step`), batch 1;
- the weight bytes one step reads (every non-expert weight, the tied embedding twice: LM head and
  self-conditioning, and each expert some token was routed to, counted by a hook) and the bound
  bytes / bandwidth, with the step's ratio to it.
Targets (issue 12): a batch-1 step <= 1.3x the bound, and 16 canvases in one step < 2x the batch-1 step.
Human lines first, one JSON line last. Run it as one short job: GPU time is counted in minutes.

    python scripts/bench_gpu.py [--layers 30] [--batches 1,4,16] [--prompt 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dgemma.config import DIFFUSIONGEMMA_26B_TEXT, ModelConfig
from dgemma.generate import Generation, Request, denoise_step
from dgemma.model import DiffusionGemma, Execution

REAL_TEXT = DIFFUSIONGEMMA_26B_TEXT  # spec a.2; layer_types / num_hidden_layers are set per run


def real_config(layers: int, canvas: int) -> ModelConfig:
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    types[-1] = "full_attention"
    text = {**REAL_TEXT, "num_hidden_layers": layers, "layer_types": types}
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas, "text_config": text})


@torch.no_grad()
def build(config: ModelConfig, device: str, execution: Execution) -> DiffusionGemma:
    with torch.device("meta"):
        model = DiffusionGemma(config, execution)
    model = model.to_empty(device=device).to(torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
    for name, b in model.named_buffers():
        if "layer_scalar" in name:
            b.fill_(1.0)
    for i, geometry in enumerate(config.text.layers):  # the RoPE tables were built on meta: rebuild them
        from dgemma.model import rope_inv_freq

        setattr(
            model, f"inv_freq_{i}", rope_inv_freq(geometry, config.text.rope_parameters[geometry.layer_type]).to(device)
        )
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 2 / timed(lambda: dst.copy_(src), 5, device)


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() after one warm-up call (synchronized around each call)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def step_bytes(model: DiffusionGemma, hits: list[set]) -> int:
    """Weight bytes one denoise step reads: everything but the experts, the embedding twice (LM head and
    self-conditioning), and the experts some token used."""
    total = 0
    for name, p in model.named_parameters():
        if ".experts." not in name:
            total += p.numel() * p.element_size()
    emb = model.embed_tokens.weight
    total += emb.numel() * emb.element_size()
    for layer, hit in zip(model.layers, hits):
        per_expert = sum(t[0].numel() * t.element_size() for t in (layer.experts.gate_up_proj, layer.experts.down_proj))
        total += per_expert * len(hit)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script's logic (use few layers)")
    args = ap.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (--device cpu runs the script's logic on the CPU)")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    t0 = time.perf_counter()
    bandwidth = copy_bandwidth(device, 4.0 if device == "cuda" else 0.5)
    config = real_config(args.layers, args.canvas)
    model = build(config, device, Execution.for_serving(device))
    build_s = time.perf_counter() - t0
    print(f"{name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; built {args.layers} layers in {build_s:.1f} s")
    hits = [set() for _ in model.layers]
    hooks = [
        layer.experts.register_forward_hook(lambda m, inp, out, s=s: s.update(inp[2].unique().tolist()))
        for layer, s in zip(model.layers, hits)
    ]
    g = torch.Generator(device=device).manual_seed(1)
    model.requires_grad_(False)
    prompt = torch.randint(3, config.text.vocab_size, (1, args.prompt), device=device, generator=g)
    cache = model.new_cache()
    for start in range(0, args.prompt, args.canvas):
        model.encode(prompt[:, start : start + args.canvas], cache)
    from dgemma.cache import stack_caches

    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        caches = stack_caches([cache] * b)
        canvas = torch.randint(3, config.text.vocab_size, (b, args.canvas), device=device, generator=g)
        soft = torch.randn(b, args.canvas, config.text.hidden_size, device=device, dtype=torch.bfloat16) * 0.01
        for s in hits:
            s.clear()
        seconds = timed(lambda x=canvas, c=caches, s=soft: model.denoise(x, c, s), args.repeats, device)
        bound = step_bytes(model, hits) / bandwidth
        rows.append(
            {
                "batch": b,
                "step_ms": round(seconds * 1000, 2),
                "bound_ms": round(bound * 1000, 2),
                "ratio_to_bound": round(seconds / bound, 3),
                "experts_hit_per_layer": round(sum(map(len, hits)) / len(hits), 1),
                "tokens_per_s_at_20_steps": round(b * args.canvas / (20 * seconds), 1),
            }
        )
        print(
            f"batch {b:>2}: step {seconds * 1000:8.2f} ms  bound {bound * 1000:7.2f} ms  ratio {seconds / bound:5.2f}"
        )
    for h in hooks:
        h.remove()
    # a whole canvas through the sampler path, fixed steps
    from dgemma.config import GenerationSettings

    settings = GenerationSettings(
        max_new_tokens=args.canvas, steps=args.steps, confidence_threshold=1e-30, eos_token_ids=(1,)
    )
    request = Request(tuple(prompt[0].tolist()), settings, seed=0)
    gen = Generation(model, request)
    gen.prefill()
    sync(device)
    t = time.perf_counter()
    while not gen.finished:
        denoise_step(model, [gen])
    sync(device)
    canvas_s = time.perf_counter() - t
    print(
        f"whole canvas: {args.steps} steps in {canvas_s * 1000:.1f} ms ({args.canvas / canvas_s:.0f} tok/s at batch 1)"
    )
    b1 = rows[0]["step_ms"]
    result = {
        "bench": "gpu_denoise_step",
        "device": name,
        "layers": args.layers,
        "canvas": args.canvas,
        "prompt": args.prompt,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "rows": rows,
        "batch16_over_batch1": round(rows[-1]["step_ms"] / b1, 3) if len(rows) > 1 else None,
        "whole_canvas_ms": round(canvas_s * 1000, 1),
        "whole_canvas_tok_s": round(args.canvas / canvas_s, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "projected_30_layer_step_ms": round(b1 * 30 / args.layers, 2) if args.layers != 30 else b1,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
