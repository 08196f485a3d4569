"""Write a `DiffusionGemma` to a directory in the Hugging Face checkpoint layout (spec b.2).

The inverse of the loader: `config.json` (diffusion_gemma / text_config with `per_layer_config`),
`generation_config.json`, `model.safetensors` with `model.decoder.*` + encoder `layer_scalar` keys, and optionally
`tokenizer.json` + `tokenizer_config.json`. Used by the trainer and by tests that need a checkpoint with a tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import FULL, GenerationSettings, ModelConfig
from .loader import TORCH_DTYPES, expected_tensors
from .model import DiffusionGemma

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
