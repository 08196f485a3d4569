"""`dgemma bench`: generation speed of a checkpoint against what the machine can do, in the way of llama-bench.

For each batch size it runs that many requests together through the batched denoise step (fixed steps, early
stopping off, seeded, after a warm-up outside the timed region) and reports ms per step, tokens/s and tokens per
forward. The roofline is measured in the same run: a square-GEMM probe gives the device's matmul rate and a large
copy its memory bandwidth, and each step's useful work (2 x active parameters x B x C FLOPs, and the weights read
once) is set against them, so the two ratios say how far the step is from compute and from bandwidth limits. A
table first, one JSON line last.

With `--clients 1,8` it measures the server instead: `dgemma serve` in its own process, and at each concurrency
level the same fixed set of streaming requests (request k: prompt k mod 8, seed 1000 + k) served by that many
client threads: tokens/s, the ratio to the first level, time to first text and p50/p99 latency, and a check that
seeded outputs are identical at every level. `scripts/bench_server.py` adds random models and more server flags.
No dev extras are needed for either.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


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
    srv = p.add_argument_group("server benchmark (instead of the generation one)")
    srv.add_argument("--clients", type=id_list, metavar="N,N", help="concurrency levels, e.g. 1,8")
    srv.add_argument("--requests", type=positive_int, default=16, help="requests per level (the same set each time)")
    srv.add_argument("--max-tokens", type=positive_int, default=64, help="max_tokens of each request")
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
    device = pipe.model.device
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

    if args.clients:
        return run_server_bench(args)
    pipe = load_pipeline(args)
    model = pipe.model
    device, c = model.device, pipe.canvas_length
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


# --- the server benchmark ------------------------------------------------------------------------------------------
PROMPTS = [
    "The history of the city begins",
    "In the morning the market was",
    "She opened the letter and read",
    "The river ran past the old mill where",
    "A short guide to keeping bees:",
    "When the storm reached the coast,",
    "The committee met again on Tuesday to",
    "Once upon a time there lived",
]


class Server:
    """`dgemma serve` in its own process, as users run it (clients in this process never share its GIL)."""

    def __init__(self, model_dir: Path, flags: list[str]):
        self.cmd = [
            sys.executable,
            "-m",
            "dgemma",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            "0",
            "--model-id",
            "bench",
            "--log-level",
            "warning",
            *flags,
        ]

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:  # "dgemma: serving bench on http://127.0.0.1:PORT/"
            if match := re.search(r" on (http://[^\s/]+)", line):
                self.url = match.group(1)
                break
        else:
            raise SystemExit(f"dgemma serve exited with {self.proc.wait()}")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained
        deadline = time.monotonic() + 120
        while True:  # --processes children start serving after the line above
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("dgemma serve did not become healthy")
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)


def one_request(client: httpx.Client, body: dict) -> dict:
    """Stream one completion; returns timings (s), text and server-side stats."""
    t0 = time.perf_counter()
    first, text, stats, usage = None, [], {}, {}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                if c["text"] and first is None:
                    first = time.perf_counter() - t0
                text.append(c["text"])
                stats = c.get("dgemma") or stats
    return {
        "first_text_s": first,
        "latency_s": time.perf_counter() - t0,
        "text": "".join(text),
        "tokens": usage["completion_tokens"],
        "first_commit_s": stats.get("first_commit_s"),
        "steps": stats.get("steps_per_canvas"),
    }


def run_level(url: str, n: int, total: int, knobs: dict) -> dict:
    """`total` requests (request k: prompt k mod 8, seed 1000 + k; the same set at every level) served by `n`
    client threads that each take the next request as soon as their previous one finishes."""
    results: dict[int, dict] = {}
    todo = iter(range(total))
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=3600) as c:
            while True:
                with lock:
                    k = next(todo, None)
                if k is None:
                    return
                body = {
                    "model": "bench",
                    "prompt": PROMPTS[k % len(PROMPTS)],
                    "seed": 1000 + k,
                    "stream": True,
                    **knobs,
                    "stream_options": {"include_usage": True, **knobs.get("stream_options", {})},
                }
                results[k] = one_request(c, body)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r["latency_s"] for r in results.values())
    firsts = [r["first_text_s"] for r in results.values() if r["first_text_s"] is not None]
    commits = [r["first_commit_s"] for r in results.values() if r["first_commit_s"] is not None]
    tokens = sum(r["tokens"] for r in results.values())
    return {
        "clients": n,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(results) / wall,
        "forward_passes": sum(sum(r["steps"] or []) for r in results.values()),
        "first_text_p50_s": statistics.median(firsts) if firsts else None,
        "first_commit_p50_s": statistics.median(commits) if commits else None,
        "latency_p50_s": statistics.median(lat),
        "latency_p99_s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
        "texts": {k: r["text"] for k, r in results.items()},
    }


def merge(runs: list[dict]) -> dict:
    """One level's rounds as one row: throughput over the summed wall time, medians of the per-round figures, and
    the texts of every round (they must agree)."""
    if len(runs) == 1:
        return runs[0]
    wall, tokens, requests = (sum(r[k] for r in runs) for k in ("wall_s", "tokens", "requests"))
    row = {
        "clients": runs[0]["clients"],
        "requests": requests,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "requests_per_s": requests / wall,
        "forward_passes": sum(r["forward_passes"] for r in runs),
        "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs],
    }
    for key in ("first_text_p50_s", "first_commit_p50_s", "latency_p50_s", "latency_p99_s"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    texts = runs[0]["texts"]
    row["texts"] = texts if all(r["texts"] == texts for r in runs) else {}
    return row


def run_server_bench(args: argparse.Namespace) -> int:
    from .generate import BUNDLED_MODEL
    from .loader import resolve_model_dir

    model_dir = resolve_model_dir(args.model or BUNDLED_MODEL, args.offline)
    levels = args.clients
    flags = ["--max-batch", str(max(levels)), "--max-queue", str(max(levels) * 2)]
    flags += (["--threads", str(args.threads)] if args.threads else []) + (
        ["--dtype", args.dtype] if args.dtype else []
    )
    flags += ["--device", args.device] if args.device else []
    knobs = {"max_tokens": args.max_tokens, "stream_options": {}}
    with Server(model_dir, flags) as srv:
        run_level(srv.url, 1, 1, knobs)  # warm-up, outside the timed runs
        rows = [run_level(srv.url, n, args.requests, knobs) for n in levels]
    base, texts = rows[0]["tokens_per_s"], rows[0]["texts"]
    identical = all(r["texts"] == texts for r in rows)
    print(
        f"dgemma serve {model_dir.name}: {args.requests} streaming requests per level, max_tokens {args.max_tokens}\n"
    )
    print(
        f"{'clients':>7} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'ratio':>6} {'1st text':>8} {'p50 s':>6} {'p99 s':>6}"
    )
    for r in rows:
        first = "-" if r["first_text_p50_s"] is None else f"{r['first_text_p50_s']:.2f}"
        print(
            f"{r['clients']:>7} {r['tokens']:>6} {r['wall_s']:>7.1f} {r['tokens_per_s']:>7.1f} "
            f"{r['tokens_per_s'] / base:>6.2f} {first:>8} {r['latency_p50_s']:>6.2f} {r['latency_p99_s']:>6.2f}"
        )
    print(f"seeded outputs identical across concurrency levels: {identical}")
    levels_out = [{k: v for k, v in r.items() if k != "texts"} for r in rows]
    print(
        json.dumps(
            {
                "bench": "serve",
                "model": str(model_dir),
                "levels": levels_out,
                "ratio_at_max": rows[-1]["tokens_per_s"] / base,
                "identical_outputs": identical,
            }
        )
    )
    return 0
