"""The model on its own (no transformers): fast paths against their slow twins, low precision, batched denoising."""

from __future__ import annotations

import pytest
import torch
from tiny import random_model, tiny_config

from dgemma.config import GenerationSettings
from dgemma.export import save_model
from dgemma.generate import Generation, Request, denoise_step
from dgemma.loader import load_model
from dgemma.model import Execution


def run_twins(model, attention: str, moe: str, prompt, canvas):
    """(encoder hidden, step-1 logits, self-conditioned logits) with the given kernels."""
    model = model.with_execution(Execution(attention, moe))
    cache = model.new_cache(batch_size=prompt.shape[0])
    hidden = model.encode(prompt, cache)
    step1 = model.denoise(canvas, cache)
    step2 = model.denoise(canvas, cache, model.soft_embedding(step1 / 0.8))
    return hidden, step1, step2


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=1)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 128, (2, 19), generator=g), torch.randint(0, 128, (2, 8), generator=g)


@pytest.mark.parametrize(
    "attention,moe",
    [("eager", "grouped"), ("sdpa", "loop"), ("eager", "loop"), ("sdpa", "grouped_mm"), ("eager", "grouped_mm")],
)
def test_fast_paths_match_slow_twins(model, inputs, attention, moe):
    fast = run_twins(model, "sdpa", "grouped", *inputs)
    slow = run_twins(model, attention, moe, *inputs)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_self_conditioning_changes_logits(model, inputs):
    _, step1, step2 = run_twins(model, "sdpa", "grouped", *inputs)
    assert (step1 - step2).abs().max() > 1e-3


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("fp32"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(saved, model, inputs, dtype):
    """Loaded in bf16/fp16 (weights cast once, RoPE kept fp32): finite logits, argmax close to fp32."""
    low = load_model(saved, dtype=dtype)
    assert low.dtype == dtype
    ref = run_twins(model, "sdpa", "grouped", *inputs)
    out = run_twins(low, "sdpa", "grouped", *inputs)
    for r, o in zip(ref, out):
        assert o.dtype == (torch.float32 if o.shape[-1] == 128 else dtype)  # logits are always fp32
        assert torch.isfinite(o).all()
    for r, o in zip(ref[1:], out[1:]):
        agree = (r.argmax(-1) == o.argmax(-1)).float().mean().item()
        assert agree >= 0.9, agree
        assert (r - o).abs().max() < 1.5


def solo(model, prompt, settings, seed):
    g = Generation(model, Request(tuple(prompt), settings, seed))
    g.prefill()
    while not g.finished:
        denoise_step(model, [g])
    return g


def test_batched_denoise_equals_solo(model):
    """Two requests with different prompt lengths, knobs and lengths share forward passes; each gets exactly its
    solo tokens (per-request generators, left-padded caches)."""
    base = GenerationSettings(
        max_new_tokens=24, steps=16, entropy_bound=1.0, confidence_threshold=1.5, t_min=0.1, t_max=0.3
    )
    requests = [
        (list(range(3, 8)), base, 21),
        (list(range(40, 61)), base.override(max_new_tokens=16, stability_threshold=2, entropy_bound=0.3), 22),
    ]
    expected = [solo(model, *r) for r in requests]
    gens = [Generation(model, Request(tuple(p), st, sd)) for p, st, sd in requests]
    for g in gens:
        g.prefill()
    shared = 0
    while live := [g for g in gens if not g.finished]:
        shared += len(live) == 2
        denoise_step(model, live)
    for got, want in zip(gens, expected):
        assert got.token_ids == want.token_ids
        assert got.steps_per_canvas == want.steps_per_canvas
    assert shared > 0
    assert gens[0].steps_per_canvas != gens[1].steps_per_canvas or len(gens[0].token_ids) != len(gens[1].token_ids)


def test_grouped_mm_moe_matches_the_loop_with_empty_experts():
    """The sync-free MoE (device offsets, no host read) equals the per-pair loop, experts without tokens included."""
    model = random_model(tiny_config(num_experts=8, top_k_experts=2), seed=3)
    experts = model.layers[0].experts
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 64, generator=g)
    idx = torch.tensor([[0, 3], [3, 0], [7, 3], [0, 7], [3, 7]])  # experts 1, 2, 4, 5, 6 get nothing
    w = torch.rand(5, 2, generator=g)
    torch.testing.assert_close(experts.grouped_mm(x, w, idx), experts.loop(x, w, idx), atol=1e-5, rtol=1e-5)


def test_execution_views_share_weights(model):
    view = model.with_execution(Execution("eager", "loop", invariant=True))
    assert view.execution.invariant and not model.execution.invariant and view is not model
    assert view.embed_tokens.weight is model.embed_tokens.weight
    assert model.with_execution(model.execution) is model
    with pytest.raises(ValueError):
        Execution(moe="fast")


def test_invariance_refuses_the_unpadded_moe():
    with pytest.raises(ValueError, match="grouped"):
        Execution(moe="grouped_mm", invariant=True)
    assert Execution.for_serving("cpu") == Execution(moe="grouped", invariant=True)
    assert not Execution.for_serving("cuda").invariant


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_mm_on_cuda_matches_the_loop():
    """The sync-free MoE where it is meant to run: bf16 on the GPU, against the per-pair loop in fp32."""
    model = random_model(tiny_config(num_experts=8, top_k_experts=2), seed=3).cuda()
    experts = model.layers[0].experts
    x = torch.randn(40, 64, device="cuda")
    idx = torch.randint(0, 8, (40, 2), device="cuda")
    w = torch.rand(40, 2, device="cuda")
    want = experts.loop(x, w, idx)
    torch.testing.assert_close(experts.grouped_mm(x, w, idx), want, atol=1e-4, rtol=1e-4)
    experts.to(torch.bfloat16)
    got = experts.grouped_mm(x.bfloat16(), w, idx).float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
