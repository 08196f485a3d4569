"""Write a `DiffusionGemma` to a directory in the Hugging Face checkpoint layout (spec b.2).

The inverse of the loader: `config.json` (diffusion_gemma / text_config with `per_layer_config`),
`generation_config.json`, `model.safetensors` with `model.decoder.*` + encoder `layer_scalar` keys, and optionally
`tokenizer.json` + `tokenizer_config.json`. Used by the trainer and by tests that need a checkpoint with a tokenizer.
`quantize_checkpoint` (`dgemma quantize`) streams a float checkpoint into dgemma's int8/int4 layout.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import FULL, CheckpointError, GenerationSettings, ModelConfig, read_json
from .loader import TORCH_DTYPES, check_tensors, expected_tensors, plan_tensors, resolve_model_dir, safetensors_table
from .model import DiffusionGemma
from .quantize import PACK_ELEMENTS, QuantSpec, Scheme, pack_slices, plan_scheme

DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def config_dict(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json content for a ModelConfig (HF field names)."""
    t = config.text
    first = t.layers[0]
    per_layer = {
        str(i): {"head_dim": g.head_dim, "num_key_value_heads": g.num_kv_heads}
        for i, g in enumerate(t.layers)
        if (g.head_dim, g.num_kv_heads) != (first.head_dim, first.num_kv_heads) or g.layer_type == FULL
    }
    text = {
        "model_type": "diffusion_gemma_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "moe_intermediate_size": t.moe_intermediate_size,
        "num_experts": t.num_experts,
        "top_k_experts": t.top_k_experts,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": first.num_kv_heads,
        "head_dim": first.head_dim,
        "layer_types": t.layer_types,
        "per_layer_config": per_layer,
        "sliding_window": t.sliding_window,
        "rope_parameters": t.rope_parameters,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": "vision",
        "tie_word_embeddings": True,
        "pad_token_id": t.pad_token_id,
        "eos_token_id": t.eos_token_id,
        "bos_token_id": t.bos_token_id,
    }
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": config.canvas_length,
        "text_config": text,
        "tie_word_embeddings": True,
        "eos_token_id": config.eos_token_id or t.eos_token_id,
        "dtype": DTYPE_NAMES[dtype],
    }


def generation_dict(s: GenerationSettings) -> dict:
    """generation_config.json content in the reference's format (sampler_config with _cls_name)."""
    return {
        "max_new_tokens": s.max_new_tokens,
        "max_denoising_steps": s.steps,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": s.entropy_bound},
        "t_min": s.t_min,
        "t_max": s.t_max,
        "stability_threshold": s.stability_threshold,
        "confidence_threshold": s.confidence_threshold,
        "eos_token_id": list(s.eos_token_ids),
        "pad_token_id": s.pad_token_id,
    }


def save_model(
    model: DiffusionGemma,
    out_dir: str | Path,
    settings: GenerationSettings | None = None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config, generation config, weights (and tokenizer files when a `tokenizers.Tokenizer` is given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.dtype
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    tensors = {
        key: state[name].detach().to("cpu", dtype).contiguous() for key, (name, _) in expected_tensors(model).items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_dict(model.config, dtype), indent=2) + "\n")
    settings = settings or GenerationSettings()
    (out / "generation_config.json").write_text(json.dumps(generation_dict(settings), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
        tok_cfg = {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        }
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE.read_text(encoding="utf-8"), encoding="utf-8")
    return out


# Gemma 4's chat protocol (turns, thinking, tool declarations, calls and results): see the file's header.
CHAT_TEMPLATE = Path(__file__).parent / "bundled" / "chat_template.jinja"


# --- dgemma quantize ---------------------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8}
SAFETENSORS_DTYPES.update({"U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn})
COPIED = ("*.json", "*.jinja", "tokenizer*", "*.model")  # configs and tokenizer; never code, not the float card
SHARD_BYTES = 2 << 30


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    scheme: Scheme,
    progress: Callable[[int, int], None] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> dict:
    """Stream a float checkpoint into dgemma's quantized layout, tensor by tensor (3-D experts one expert at a
    time, read through safetensors slices), so peak memory is about one expert's fp32 copy plus one output tensor,
    whatever the model's size. Output shards are written header first from the planned layout, then filled in order.
    Returns sizes and the process's peak RSS."""
    src, dst = resolve_model_dir(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    raw = read_json(src / "config.json")
    if raw.get("quantization_config"):
        raise CheckpointError(f"{src} is already quantized ({raw['quantization_config'].get('quant_method')})")
    config = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        model = DiffusionGemma(config)
    expected = expected_tensors(model)
    found = safetensors_table(src)
    entries = plan_tensors(src, raw, found)
    check_tensors(expected, entries, None)
    specs = plan_scheme(model, scheme)
    layout = _output_layout(expected, entries, specs)
    shards = _split(layout, shard_bytes)
    dst.mkdir(parents=True, exist_ok=True)
    total, done = sum(_bytes(found[k][0], found[k][1]) for k in expected), 0
    with contextlib.ExitStack() as stack:
        handles = {}

        def source(key: str):
            path = found[key][2]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            return handles[path]

        for name, keys in shards:
            with open(dst / name, "wb") as f:
                _write_header(f, {t: layout[k][t] for k in keys for t in layout[k]})
                for key in keys:
                    f.writelines(
                        tensor.contiguous().view(torch.uint8).numpy().tobytes()
                        for tensor in _produce(source(key), key, specs.get(expected[key][0]), entries[key])
                    )
                    done += _bytes(found[key][0], found[key][1])
                    if progress is not None:
                        progress(done, total)
    if len(shards) > 1:
        weight_map = {t: name for name, keys in shards for k in keys for t in layout[k]}
        index = {"metadata": {"total_size": sum(_bytes(*v) for lay in layout.values() for v in lay.values())}}
        (dst / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}, indent=2))
    _copy_side_files(src, dst)
    (dst / "config.json").write_text(json.dumps({**raw, "quantization_config": scheme.config()}, indent=2) + "\n")
    out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"in_bytes": total, "out_bytes": out_bytes, "shards": len(shards), "peak_rss_bytes": peak}


def _output_layout(expected, entries, specs) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """checkpoint key -> {output tensor name: (dtype, shape)} in the order they will be written."""
    layout = {}
    for key in expected:
        spec, shape = specs.get(expected[key][0]), tuple(entries[key].shape)
        if spec is None:
            layout[key] = {key: (entries[key].dtype, shape)}
        else:
            layout[key] = {key + suffix: v for suffix, v in spec.tensors(shape).items()}
    return layout


def _split(layout: dict, shard_bytes: int) -> list[tuple[str, list[str]]]:
    groups, size = [[]], 0
    for key, tensors in layout.items():
        n = sum(_bytes(*v) for v in tensors.values())
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]


def _produce(f, key: str, spec: QuantSpec | None, entry) -> Iterator[torch.Tensor]:
    """The bytes of one checkpoint tensor's outputs in layout order (suffixes "", "_scale", "_zero"): a float tensor
    as it is; a quantized one's codes slice by slice as they are made (one expert, or a bounded block of rows),
    then its scales (and zeros), which are small."""
    if spec is None:
        yield f.get_tensor(key)
        return
    sliced, layout = f.get_slice(key), spec.tensors(tuple(entry.shape))
    pieces: dict[str, list[torch.Tensor]] = {suffix: [] for suffix in layout if suffix}
    if len(entry.shape) == 3:  # one expert at a time
        blocks = (sliced[i : i + 1][0] for i in range(entry.shape[0]))
    else:  # a bounded block of rows at a time (the embedding is 1.5 GB in bf16)
        step = max(1, PACK_ELEMENTS // entry.shape[-1])
        blocks = (sliced[a : a + step] for a in range(0, entry.shape[0], step))
    for w in blocks:
        for p in pack_slices(w, spec):
            yield p.data
            for suffix, t in p.tensors().items():
                if suffix:
                    pieces[suffix].append(t)
    for suffix, parts in pieces.items():
        yield torch.cat(parts).to(SAFETENSORS_DTYPES[layout[suffix][0]])


def _write_header(f, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors header for tensors written back to back in this order (8-byte aligned, as the format wants)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        n = _bytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)) + raw)


def _bytes(dtype: str, shape) -> int:
    return math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize


def _copy_side_files(src: Path, dst: Path) -> None:
    for pattern in COPIED:
        for p in src.glob(pattern):
            if p.is_file() and not p.is_symlink() and p.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copyfile(p, dst / p.name)
