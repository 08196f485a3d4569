"""Tiny random DiffusionGemma checkpoints built with transformers 5.23.0 (spec section g).

Test-only helper: builds a sensitive random reference model, saves it in the real HF layout and
replays the reference `generate()` under dgemma's seeded protocol (spec g.3, issue 2 item 6).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion  # noqa: E402

VISION = dict(
    model_type="gemma4_vision",
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    patch_size=4,
    pooling_kernel_size=1,
    position_embedding_size=64,
)


def text_config(**overrides) -> dict:
    """The spec's tiny text config, with overrides."""
    text = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=8,
        num_experts=4,
        top_k_experts=2,
        max_position_embeddings=512,
        use_bidirectional_attention="vision",
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    text.update(overrides)
    return text


def build(seed: int = 0, canvas_length: int = 8, **text_overrides) -> DiffusionGemmaForBlockDiffusion:
    """A random reference model made sensitive as spec g.1 describes (float32, eager)."""
    cfg = DiffusionGemmaConfig(
        text_config=text_config(**text_overrides),
        vision_config=VISION,
        canvas_length=canvas_length,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    model.set_experts_implementation("eager")
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("router.scale") or name.endswith("per_expert_scale"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        emb = model.model.decoder.embed_tokens.weight
        emb.copy_(0.6 * torch.randn(emb.shape, generator=gen))
        n = len(model.model.decoder.layers)
        for i in range(n):
            model.model.decoder.layers[i].layer_scalar.fill_(0.5 + 0.25 * i / max(n - 1, 1))
            model.model.encoder.language_model.layers[i].layer_scalar.fill_(0.7 + 0.25 * i / max(n - 1, 1))
    return model


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@contextlib.contextmanager
def seeded_protocol(model, seed: int):
    """Patch the reference sampler to dgemma's two-generator protocol (issue 2 item 6).

    Canvas init and renoise draw `randint(0, V, (1, C))` from a CPU generator seeded `seed`;
    sampling draws `u = rand((C, V))` from a CPU generator seeded `seed + 1` and takes
    `argmax(log_softmax(z) - log(-log(u)))` (Gumbel-max), replacing `torch.multinomial`.
    """
    g_noise = torch.Generator().manual_seed(seed)
    g_gumbel = torch.Generator().manual_seed(seed + 1)
    orig_prepare = model._prepare_sampler
    orig_multinomial = torch.multinomial

    def prepare_sampler(*args, **kwargs):
        sampler = orig_prepare(*args, **kwargs)

        def initialize_canvas(batch_size, device):
            shape = (batch_size, model.config.canvas_length)
            return torch.randint(0, model.config.text_config.vocab_size, shape, generator=g_noise)

        # renoise_canvas draws through initialize_canvas, so one patch covers both draws.
        sampler.initialize_canvas = initialize_canvas
        return sampler

    def multinomial(probs, num_samples, *a, **k):
        u = torch.rand(probs.shape, generator=g_gumbel).clamp_min(1e-20)
        return torch.argmax(torch.log(probs) - torch.log(-torch.log(u)), dim=-1, keepdim=True)

    model._prepare_sampler = prepare_sampler
    torch.multinomial = multinomial
    try:
        yield
    finally:
        model._prepare_sampler = orig_prepare
        torch.multinomial = orig_multinomial
