"""Tiny random dgemma models and checkpoints for tests that must not depend on transformers.

`random_model` mirrors the reference's sensitive initialisation (spec g.1): norms and router scales 1 + 0.3·N,
embedding 0.6·N, other weights N(0, 0.02), distinct encoder/decoder layer scalars. `checkpoint_with_tokenizer`
writes a complete checkpoint (weights, configs, a byte-level BPE trained on a few lines of the web corpus).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import torch

from dgemma.bpe import train_bpe
from dgemma.config import GenerationSettings, ModelConfig
from dgemma.export import save_model
from dgemma.model import DiffusionGemma

VAL_TEXT = Path(__file__).resolve().parents[1] / "data" / "web" / "val.txt.gz"


def tiny_config(canvas_length: int = 8, **overrides) -> ModelConfig:
    """The spec's tiny text config (g.1) in dgemma's own terms."""
    text = {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "sliding_window": 8,
        "num_experts": 4,
        "top_k_experts": 2,
        "max_position_embeddings": 512,
    }
    text.update(overrides)
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas_length, "text_config": text})


def random_model(config: ModelConfig | None = None, seed: int = 0) -> DiffusionGemma:
    config = config or tiny_config()
    model = DiffusionGemma(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name == "embed_tokens.weight":
                p.copy_(0.6 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        for i, layer in enumerate(model.layers):
            layer.layer_scalar.fill_(0.5 + 0.1 * i)
            layer.encoder_layer_scalar.fill_(0.7 + 0.1 * i)
    return model


def corpus_lines(n: int = 40) -> list[str]:
    with gzip.open(VAL_TEXT, "rt", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line][:n]


def checkpoint_with_tokenizer(path: Path, vocab_size: int = 320, seed: int = 0, **settings) -> Path:
    """A complete tiny checkpoint whose vocabulary is a BPE trained on the validation text."""
    tok = train_bpe(corpus_lines(), vocab_size=vocab_size)
    model = random_model(tiny_config(vocab_size=tok.get_vocab_size()), seed)
    return save_model(model, path, GenerationSettings(**settings), tokenizer=tok)
