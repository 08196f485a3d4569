"""`dgemma bench`: generation speed of a checkpoint against what the machine can do, in the way of llama-bench.

For each batch size it runs that many requests together through the batched denoise step (fixed steps, early
stopping off, seeded, after a warm-up outside the timed region) and reports ms per step, tokens/s and tokens per
forward. The roofline is measured in the same run: a square-GEMM probe gives the device's matmul rate and a large
copy its memory bandwidth, and each step's useful work (2 x active parameters x B x C FLOPs, and the weights read
once) is set against them, so the two ratios say how far the step is from compute and from bandwidth limits. A
table first, one JSON line last. No dev extras needed; the server benchmark stays `scripts/bench_server.py`.
"""

from __future__ import annotations

import argparse
import json
import time


def add_bench_parser(subparsers) -> None:
    from .cli import add_model_arguments, id_list, positive_int

    p = subparsers.add_parser(
        "bench",
        help="generation speed against the machine's measured matmul rate and memory bandwidth",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--batch", type=id_list, default=[1, 4], metavar="B,B", help="batch sizes")
    p.add_argument("--steps", type=positive_int, default=16, help="denoising steps per canvas (fixed)")
    p.add_argument("--canvases", type=positive_int, default=2, help="canvases per request")
    p.add_argument("--prompt-tokens", type=positive_int, default=128, help="prompt length in tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's dtype")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: cores - 1, at least 1)")
    p.set_defaults(handler=run_bench)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_peaks(device, dtype) -> tuple[float, float]:
    """(matmul GFLOP/s, copy GB/s) measured here: best of a few square GEMMs and large copies."""
    import torch

    n = 2048 if device.type == "cuda" else 768
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    flops, bandwidth = 0.0, 0.0
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        flops = max(flops, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        bandwidth = max(bandwidth, 2 * src.numel() / (time.perf_counter() - t0) / 1e9)  # read + write
    return flops, bandwidth


def active_parameters(model) -> tuple[int, int]:
    """(parameters used per token, bytes of all weights): routed experts count top_k / num_experts."""
    cfg = model.text
    share = cfg.top_k_experts / cfg.num_experts if cfg.num_experts else 1.0
    used, size = 0, 0
    for name, p in model.named_parameters():
        size += p.numel() * p.element_size()
        used += p.numel() * (share if ".experts." in name else 1.0)
    return int(used), size


def time_batch(pipe, batch: int, args) -> tuple[float, int, int]:
    """(seconds in denoise steps, steps, committed tokens) for `batch` requests run together."""
    from .generate import Generation, denoise_step

    c = pipe.canvas_length
    knobs = {"steps": args.steps, "confidence_threshold": 1e-30, "max_new_tokens": args.canvases * c}
    vocab = pipe.model.text.vocab_size
    prompts = [[(7 * i + 13 * b) % vocab for i in range(args.prompt_tokens)] for b in range(batch)]
    gens = [Generation(pipe.model, pipe.request(prompt_ids=p, seed=b, **knobs)) for b, p in enumerate(prompts)]
    for g in gens:
        g.prefill()
    steps, spent = 0, 0.0
    device = pipe.model.embed_tokens.weight.device
    while live := [g for g in gens if not g.finished]:
        sync(device)
        t0 = time.perf_counter()
        denoise_step(pipe.model, live)
        sync(device)
        spent += time.perf_counter() - t0
        steps += 1
    return spent, steps, sum(len(g.token_ids) for g in gens)


def run_bench(args: argparse.Namespace) -> int:
    from .cli import load_pipeline

    pipe = load_pipeline(args)
    model = pipe.model
    device, c = model.embed_tokens.weight.device, pipe.canvas_length
    peak_flops, peak_bw = machine_peaks(device, model.dtype)
    used, weight_bytes = active_parameters(model)
    time_batch(pipe, 1, argparse.Namespace(**{**vars(args), "steps": 2, "canvases": 1}))  # warm-up
    rows = []
    for batch in args.batch:
        seconds, steps, tokens = time_batch(pipe, batch, args)
        step_s = seconds / steps
        gflops = 2 * used * batch * c / step_s / 1e9  # the canvas's GEMMs; attention over the cache is extra
        gbs = weight_bytes / step_s / 1e9  # every step reads the weights at least once
        rows.append(
            {
                "batch": batch,
                "ms_per_step": round(1000 * step_s, 3),
                "tokens_per_s": round(tokens / seconds, 2),
                "tokens_per_forward": round(tokens / (steps * batch), 3),
                "gflops": round(gflops, 2),
                "compute_share": round(gflops / peak_flops, 4),
                "weight_gbs": round(gbs, 2),
                "bandwidth_share": round(gbs / peak_bw, 4),
            }
        )
    print(
        f"{pipe.model_dir.name} on {device.type} ({model.dtype}): {used / 1e6:.1f}M active parameters per token, "
        f"weights {weight_bytes / 1e6:.1f} MB; measured peaks {peak_flops:.1f} GFLOP/s matmul, "
        f"{peak_bw:.1f} GB/s copy; canvas {c}, {args.steps} steps, {args.canvases} canvases, "
        f"prompt {args.prompt_tokens}\n"
    )
    print(
        f"{'batch':>5} {'ms/step':>9} {'tok/s':>9} {'tok/fwd':>8} {'GFLOP/s':>9} {'of peak':>8} {'GB/s':>8} {'of bw':>7}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['ms_per_step']:>9.2f} {r['tokens_per_s']:>9.1f} {r['tokens_per_forward']:>8.2f} "
            f"{r['gflops']:>9.1f} {r['compute_share']:>8.1%} {r['weight_gbs']:>8.1f} {r['bandwidth_share']:>7.1%}"
        )
    print(
        json.dumps(
            {
                "bench": "generate",
                "model": str(pipe.model_dir),
                "device": device.type,
                "dtype": str(model.dtype),
                "canvas_length": c,
                "steps": args.steps,
                "canvases": args.canvases,
                "prompt_tokens": args.prompt_tokens,
                "active_parameters": used,
                "weight_bytes": weight_bytes,
                "peak_gflops": round(peak_flops, 2),
                "peak_copy_gbs": round(peak_bw, 2),
                "results": rows,
            }
        )
    )
    return 0
