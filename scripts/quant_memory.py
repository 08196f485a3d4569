#!/usr/bin/env python
"""Memory and CPU speed of dgemma's quantized layouts at the real DiffusionGemma-26B text shapes.

The real text config (vocab 262144, hidden 2816, 128 experts top-8, ...; spec a.2) is cut to 2 layers, one sliding
and one full, and a random bf16 checkpoint of it (N(0, 0.02), norms and scalars 1) is streamed to disk tensor by
tensor (experts one expert at a time), so the whole model is never in RAM. Each scheme is then made by
`export.quantize_checkpoint` in a fresh process (its own peak RSS), and its output headers give the bytes of a
sliding layer, a full layer and the globals (embedding, final norm, self-conditioning), projected to the real 30
layers (globals + 25 sliding + 5 full) and compared with notes/quantized-formats.md section 3. Finally each checkpoint
is loaded (float parts in fp32; one model per process) and a denoise step at canvas 256 after a 64-token prompt is
timed (1 warm-up, then `--steps` timed calls; the self-conditioning input is a fixed random tensor, and the
soft-embedding mix that makes it in generation is timed once on its own). Human table first, one JSON line last.

    nice -n 5 python scripts/quant_memory.py [--workdir DIR] [--threads 1] [--steps 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dgemma.config import DIFFUSIONGEMMA_26B_TEXT

REAL_TEXT = DIFFUSIONGEMMA_26B_TEXT  # spec a.2; layer_types / num_hidden_layers are set per run
REAL_LAYERS = {"sliding_attention": 25, "full_attention": 5}  # [sliding x5, full] x5
SCHEMES = {  # name -> quantize.Scheme kwargs (None: the bf16 source itself)
    "bf16": None,
    "int8": {"bits": "int8", "embedding": "int8"},
    "int4-g64-emb-int8": {"bits": "int4", "group_size": 64, "embedding": "int8"},
    "int4-g64-emb-bf16": {"bits": "int4", "group_size": 64, "embedding": "bf16"},
}
NOTES_GB = {"bf16": 50.5, "int8": 25.3, "int4-g64-emb-int8": 14.55, "int4-g64-emb-bf16": 15.3}  # notes section 3
TARGET_GB = 15.0
ROW_CHUNK = 16384  # rows of a 2-D tensor drawn at a time (the embedding: 16384 x 2816 fp32 = 185 MB)


def peak_rss() -> int:
    """ru_maxrss: counts the mapped source file's pages too (clean page cache the kernel may drop)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnonPeak:
    """Peak anonymous RSS (RssAnon, sampled every 10 ms on a daemon thread): the memory that must really exist,
    without the file-backed pages of memory-mapped checkpoints that ru_maxrss also counts."""

    def __init__(self, period: float = 0.01):
        self.peak = 0
        threading.Thread(target=self._poll, args=(period,), daemon=True).start()

    def _poll(self, period: float) -> None:
        while True:
            self.sample()
            time.sleep(period)

    def sample(self) -> int:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
        self.peak = max(self.peak, kib * 1024)
        return self.peak


# --- children (each in its own process) ---------------------------------------------------------------------------
def write_source(out: str, seed: int) -> dict:
    """The 2-layer bf16 checkpoint: header planned from a meta model, then each tensor's bytes in order."""
    import torch

    from dgemma.config import GenerationSettings, ModelConfig
    from dgemma.export import _write_header, config_dict, generation_dict
    from dgemma.loader import expected_tensors
    from dgemma.model import DiffusionGemma

    text = {**REAL_TEXT, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}
    config = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": text})
    with torch.device("meta"):
        expected = expected_tensors(DiffusionGemma(config))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tmp = out / "model.safetensors.partial"
    with open(tmp, "wb") as f:
        _write_header(f, {key: ("BF16", shape) for key, (_, shape) in expected.items()})
        for _, shape in expected.values():
            f.writelines(part.view(torch.int16).numpy().data for part in random_parts(shape, gen))
    tmp.rename(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config_dict(config, torch.bfloat16), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_dict(GenerationSettings()), indent=2) + "\n")
    return {"peak_rss_bytes": peak_rss()}


def random_parts(shape: tuple[int, ...], gen):
    """bf16 pieces of one tensor in storage order: ones for 1-D (norms, scalars), else N(0, 0.02) by row chunks
    (3-D: one expert at a time)."""
    import torch

    if len(shape) == 1:
        yield torch.ones(shape, dtype=torch.bfloat16)
        return
    *lead, n, k = shape
    for _ in range(math.prod(lead)):
        for a in range(0, n, ROW_CHUNK):
            yield torch.empty(min(ROW_CHUNK, n - a), k).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)


def quantize(src: str, dst: str, scheme: dict, threads: int) -> dict:
    import torch

    from dgemma.export import quantize_checkpoint
    from dgemma.quantize import Scheme

    torch.set_num_threads(threads)
    anon, t0 = AnonPeak(), time.perf_counter()
    stats = quantize_checkpoint(src, dst, Scheme(**scheme))
    seconds = time.perf_counter() - t0
    return {**stats, "seconds": seconds, "peak_rss_bytes": peak_rss(), "peak_anon_bytes": anon.sample()}


def time_steps(model_dir: str, threads: int, steps: int, prompt: int, seed: int) -> dict:
    """Load (float parts fp32), encode a prompt once, then 1 warm-up + `steps` timed denoise calls."""
    import torch

    from dgemma.loader import load_model

    torch.set_num_threads(threads)
    anon, t0 = AnonPeak(), time.perf_counter()
    model = load_model(model_dir, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed)
    v, c, h = model.text.vocab_size, model.config.canvas_length, model.text.hidden_size
    cache = model.new_cache(1)
    model.encode(torch.randint(3, v, (1, prompt), generator=gen), cache)
    canvas = torch.randint(3, v, (1, c), generator=gen)  # [B, C]
    soft = torch.randn(1, c, h, generator=gen).to(model.dtype)  # [B, C, H] stands in for the SC input
    logits = model.denoise(canvas, cache, soft)  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        logits = model.denoise(canvas, cache, soft)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    model.soft_embedding(logits)  # the [C, V] @ E mix that makes the next step's SC input
    mix_s = time.perf_counter() - t
    finite = bool(torch.isfinite(logits).all())
    return {
        "step_ms": 1000 * sorted(times)[len(times) // 2],
        "step_ms_all": [1000 * x for x in times],
        "sc_mix_ms": 1000 * mix_s,
        "load_s": load_s,
        "logits_finite": finite,
        "peak_rss_bytes": peak_rss(),
        "peak_anon_bytes": anon.sample(),
    }


CHILDREN = {"write": write_source, "quantize": quantize, "time": time_steps}


def run_child(task: str, **kwargs) -> dict:
    """Run one child task in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, "--child", json.dumps({"task": task, **kwargs})]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"{task} exited {proc.returncode}", "stderr": proc.stderr[-6000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- header arithmetic --------------------------------------------------------------------------------------------
def header_bytes(model_dir: Path) -> dict:
    """Bytes of layer 0 (sliding), layer 1 (full) and the globals from the checkpoint's safetensors headers."""
    from dgemma.loader import ITEM_SIZES, safetensors_table

    out = {"layer0": 0, "layer1": 0, "embedding": 0, "final_norm": 0, "self_conditioning": 0, "other": 0}
    largest = 0
    for key, (dtype, shape, _) in safetensors_table(model_dir).items():
        n = math.prod(shape) * ITEM_SIZES[dtype]
        largest = max(largest, n)
        if m := re.search(r"\.layers\.(\d+)\.", key):
            out[f"layer{m.group(1)}"] += n
        elif ".embed_tokens." in key:
            out["embedding"] += n
        elif key.startswith("model.decoder.norm."):
            out["final_norm"] += n
        elif ".self_conditioning." in key:
            out["self_conditioning"] += n
        else:
            out["other"] += n
    out["globals"] = out["embedding"] + out["final_norm"] + out["self_conditioning"] + out["other"]
    proj = (
        out["globals"]
        + REAL_LAYERS["sliding_attention"] * out["layer0"]
        + REAL_LAYERS["full_attention"] * out["layer1"]
    )
    return {**out, "projected_bytes": proj, "largest_tensor_bytes": largest}


# --- main ---------------------------------------------------------------------------------------------------------
def prepare(args, work: Path) -> tuple[Path, dict]:
    src = work / "bf16"
    if (src / "model.safetensors").exists() and (src / "config.json").exists():
        print(f"reusing {src}", flush=True)
        return src, {"reused": True}
    shutil.rmtree(src, ignore_errors=True)
    t = time.perf_counter()
    res = run_child("write", out=str(src), seed=args.seed)
    if "error" in res:
        sys.exit(f"writing the source failed: {res['error']}\n{res['stderr']}")
    print(f"wrote {src} in {time.perf_counter() - t:.0f} s (peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB)", flush=True)
    return src, res


def measure(name: str, src: Path, work: Path, args) -> dict:
    kwargs, row = SCHEMES[name], {"notes_gb": NOTES_GB[name]}
    out = src
    if kwargs is not None:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        q = run_child("quantize", src=str(src), dst=str(out), scheme=kwargs, threads=args.threads)
        row["quantize"] = q
        if "error" in q:
            print(f"{name}: quantize failed\n{q['stderr']}", flush=True)
            return row
        print(f"{name}: quantized in {q['seconds']:.0f} s, peak RSS {q['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    row["bytes"] = header_bytes(out)
    t = run_child(
        "time", model_dir=str(out), threads=args.threads, steps=args.steps, prompt=args.prompt, seed=args.seed
    )
    row["timing"] = t
    if "error" in t:
        print(f"{name}: load/denoise failed\n{t['stderr']}", flush=True)
    else:
        print(f"{name}: step {t['step_ms']:.0f} ms, load peak RSS {t['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    if kwargs is not None and not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def summary(rows: dict) -> dict:
    base = rows["bf16"].get("timing", {}).get("step_ms")
    out = {}
    for name, r in rows.items():
        b, t, q = r.get("bytes", {}), r.get("timing", {}), r.get("quantize", {})
        step = t.get("step_ms")
        out[name] = {
            "projected_gb": b["projected_bytes"] / 1e9 if b else None,
            "projected_gib": b["projected_bytes"] / 2**30 if b else None,
            "notes_gb": r["notes_gb"],
            "per_sliding_layer_bytes": b.get("layer0"),
            "per_full_layer_bytes": b.get("layer1"),
            "globals_bytes": b.get("globals"),
            "embedding_bytes": b.get("embedding"),
            "final_norm_bytes": b.get("final_norm"),
            "self_conditioning_bytes": b.get("self_conditioning"),
            "two_layer_file_bytes": q.get("out_bytes"),
            "quantize_peak_rss_bytes": q.get("peak_rss_bytes"),
            "quantize_peak_anon_bytes": q.get("peak_anon_bytes"),
            "quantize_seconds": q.get("seconds"),
            "load_peak_rss_bytes": t.get("peak_rss_bytes"),
            "load_peak_anon_bytes": t.get("peak_anon_bytes"),
            "step_ms": step,
            "step_ratio_vs_fp32": step / base if step and base else None,
            "sc_mix_ms": t.get("sc_mix_ms"),
            "logits_finite": t.get("logits_finite"),
            "error": q.get("error") or t.get("error"),
        }
    return out


def fmt(v, scale=1.0, spec=".2f") -> str:
    return "-" if v is None else format(v / scale, spec)


def print_table(schemes: dict, largest: int) -> None:
    head = ("scheme", "sliding MB", "full MB", "globals MB", "proj GB", "proj GiB", "notes GB", "quant RSS GB",
            "quant anon GB", "load RSS GB", "load anon GB", "step ms", "x fp32", "SC mix ms")  # fmt: skip
    print("\n" + " | ".join(f"{h:>18}" if i == 0 else f"{h:>12}" for i, h in enumerate(head)))
    for name, s in schemes.items():
        cells = (
            name,
            fmt(s["per_sliding_layer_bytes"], 1e6, ".1f"),
            fmt(s["per_full_layer_bytes"], 1e6, ".1f"),
            fmt(s["globals_bytes"], 1e6, ".1f"),
            fmt(s["projected_gb"]),
            fmt(s["projected_gib"]),
            fmt(s["notes_gb"]),
            fmt(s["quantize_peak_rss_bytes"], 1e9),
            fmt(s["quantize_peak_anon_bytes"], 1e9),
            fmt(s["load_peak_rss_bytes"], 1e9),
            fmt(s["load_peak_anon_bytes"], 1e9),
            fmt(s["step_ms"], 1, ".0f"),
            fmt(s["step_ratio_vs_fp32"]),
            fmt(s["sc_mix_ms"], 1, ".0f"),
        )
        print(" | ".join(f"{c:>18}" if i == 0 else f"{c:>12}" for i, c in enumerate(cells)))
    print(
        f"largest source tensor: {largest / 1e9:.3f} GB (bf16 embedding); step = median of timed 2-layer denoise;"
        " RSS = ru_maxrss (counts mapped checkpoint pages), anon = peak RssAnon"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="where checkpoints go (default: a temp dir, removed at the end)")
    ap.add_argument(
        "--schemes", default=",".join(SCHEMES), help=f"subset of {','.join(SCHEMES)} (bf16 is the baseline)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the quantized checkpoints")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        task = json.loads(args.child)
        print(json.dumps(CHILDREN[task.pop("task")](**task)))
        return
    names = ["bf16"] + [n for n in args.schemes.split(",") if n != "bf16"]
    if unknown := sorted(set(names) - set(SCHEMES)):
        sys.exit(f"unknown schemes {unknown}; choose from {list(SCHEMES)}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="quant_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src, written = prepare(args, work)
        rows = {name: measure(name, src, work, args) for name in names}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    schemes = summary(rows)
    largest = rows["bf16"]["bytes"]["largest_tensor_bytes"]
    print_table(schemes, largest)
    int4 = [s["projected_gb"] for n, s in schemes.items() if n.startswith("int4") and s["projected_gb"]]
    result = {
        "schemes": schemes,
        "largest_source_tensor_bytes": largest,
        "source_write_peak_rss_bytes": written.get("peak_rss_bytes"),
        "target_int4_gb": TARGET_GB,
        "int4_meets_target": bool(int4) and min(int4) <= TARGET_GB,
        "layers_projected": REAL_LAYERS,
        "canvas": 256,
        "prompt": args.prompt,
        "threads": args.threads,
        "timed_steps": args.steps,
        "activation_dtype": "float32",
        "errors": {
            n: {"quantize": r.get("quantize", {}).get("stderr"), "timing": r.get("timing", {}).get("stderr")}
            for n, r in rows.items()
            if schemes[n]["error"]
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
