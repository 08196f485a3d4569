"""Writers of tiny pre-quantized checkpoints (ModelOpt NVFP4, compressed-tensors FP8-dynamic) from a float model.

The round-to-nearest quantizers follow the research notes (quantized-formats.md 1a, 1b) and are written without
`dgemma.prequant` or `dgemma.quantize`, so reading a fixture back tests the reader against the format, not against
itself. Experts are split per expert (`experts.{j}.{gate,up,down}_proj`) as both formats store them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from dgemma.export import save_model
from dgemma.loader import expected_tensors
from dgemma.model import DiffusionGemma

E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # codes 0..7; code bit 3 is the sign
ATTN_MLP = re.compile(r"\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")

MODELOPT_CONFIG = {
    "config_groups": {
        "group_0": {
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
            "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
            "targets": ["Linear"],
        }
    },
    "ignore": ["lm_head", "*self_attn*", "*mlp.*", "*router*", "*self_conditioning*"],
    "quant_algo": "NVFP4",
    "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
    "producer": {"name": "modelopt", "version": "0.45.0"},
    "quant_method": "modelopt",
}
HF_QUANT_CONFIG = {
    "producer": {"name": "modelopt", "version": "0.45.0"},
    "quantization": {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": "FP8",
        "group_size": 16,
        "exclude_modules": ["lm_head", "*self_attn*", "*mlp.*", "*router*", "*self_conditioning*"],
    },
}
FP8_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 8,
                "type": "float",
                "strategy": "channel",
                "symmetric": True,
                "dynamic": False,
                "observer": "minmax",
            },
            "input_activations": {
                "num_bits": 8,
                "type": "float",
                "strategy": "token",
                "symmetric": True,
                "dynamic": True,
            },
            "output_activations": None,
        }
    },
    "ignore": ["lm_head", "re:.*embed.*", "re:.*router.*", "re:.*vision.*", "re:.*self_conditioning.*"],
    "kv_cache_scheme": None,
}


def nvfp4_rtn(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModelOpt NVFP4 of a float weight [N, K] (notes 1a): ws2 = amax / (6 * 448); block scale
    fp8(block_amax / (6 * ws2)) clamped to [2^-9, 448]; codes the nearest E2M1 values, element 2k in the low nibble."""
    w = w.detach().float()
    ws2 = (w.abs().amax() / (6 * 448)).clamp_min(1e-12)
    blocks = w.unflatten(-1, (-1, 16))  # [N, K/16, 16]
    scale = (blocks.abs().amax(-1) / (6 * ws2)).clamp(2**-9, 448).to(torch.float8_e4m3fn)  # [N, K/16]
    x = blocks / (scale.float()[..., None] * ws2)
    magnitude = (x.abs()[..., None] - E2M1_MAGNITUDES).abs().argmin(-1)  # [N, K/16, 16] codes 0..7
    codes = (magnitude | ((x < 0).long() << 3)).flatten(-2).to(torch.uint8)  # [N, K]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [N, K/2]
    return {
        "weight": packed,
        "weight_scale": scale,
        "weight_scale_2": ws2.reshape(()),
        "input_scale": torch.tensor(0.01),
    }


def fp8_rtn(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """compressed-tensors FP8 per output channel (notes 1b): scale = amax / 448 in the model dtype, [N, 1]."""
    w = w.detach().float()
    scale = (w.abs().amax(-1, keepdim=True) / 448).clamp_min(1e-12).to(scale_dtype)  # [N, 1]
    q = (w / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}


def write_nvfp4(dst: Path, model: DiffusionGemma, experts_only: bool = True, tokenizer=None) -> Path:
    """A ModelOpt NVFP4 checkpoint: experts (and, unless `experts_only`, attention and dense MLP) in NVFP4."""
    linears = EXPERTS if experts_only else re.compile(f"{EXPERTS.pattern}|{ATTN_MLP.pattern}")
    write_checkpoint(dst, model, tokenizer, nvfp4_rtn, linears, MODELOPT_CONFIG)
    (dst / "hf_quant_config.json").write_text(json.dumps(HF_QUANT_CONFIG, indent=2) + "\n")
    return dst


def write_fp8(dst: Path, model: DiffusionGemma, tokenizer=None) -> Path:
    """A compressed-tensors FP8-dynamic checkpoint: experts, attention and dense MLP in FP8 per channel."""
    linears = re.compile(f"{EXPERTS.pattern}|{ATTN_MLP.pattern}")
    return write_checkpoint(dst, model, tokenizer, fp8_rtn, linears, FP8_CONFIG)


def write_checkpoint(dst: Path, model, tokenizer, quantize: Callable, linears: re.Pattern, quant_config: dict) -> Path:
    """save_model's configs and tokenizer, then its weights file rewritten with the quantized linears."""
    save_model(model, dst, tokenizer=tokenizer, dtype=torch.bfloat16)
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    tensors = {}
    for key, (name, _) in expected_tensors(model).items():
        w = state[name].detach().float()
        if not linears.search(key):
            tensors[key] = w.to(torch.bfloat16).contiguous()
            continue
        for base, part in _linears(key, w).items():
            tensors.update({f"{base}.{s}": t.contiguous() for s, t in quantize(part).items()})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quant_config
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


def _linears(key: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Checkpoint linear base name -> its [N, K] weight; fused experts split per expert as the formats store them."""
    if not EXPERTS.search(key):
        return {key[: -len(".weight")]: w}
    prefix, name = key.rsplit(".", 1)
    if name == "down_proj":
        return {f"{prefix}.{j}.down_proj": w[j] for j in range(w.shape[0])}
    gate, up = w.chunk(2, dim=1)  # [E, I, H] each: gate rows then up rows
    out = {}
    for j in range(w.shape[0]):
        out[f"{prefix}.{j}.gate_proj"], out[f"{prefix}.{j}.up_proj"] = gate[j], up[j]
    return out
