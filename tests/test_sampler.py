"""Sampler rules on fake logits (spec d.1), no model: schedule, acceptance, sampling, stopping, settings."""

from __future__ import annotations

import math

import pytest
import torch

from dgemma.config import ConfigError, GenerationSettings
from dgemma.model import flush_subnormals_
from dgemma.sampler import (
    CanvasSampler,
    block_argmax,
    entropy_bound_mask,
    gumbel_sample,
    is_stable,
    make_generators,
    score_canvas,
    score_canvas_slow,
    temperature,
    token_entropy,
)


def test_temperature_schedule_endpoints():
    assert temperature(48, 48, 0.4, 0.8).item() == pytest.approx(0.8)  # first step: all 48 remaining
    assert temperature(1, 48, 0.4, 0.8).item() == pytest.approx(0.4 + 0.4 / 48)  # last step, never t_min itself
    steps = [temperature(r, 48, 0.4, 0.8).item() for r in range(48, 0, -1)]
    assert steps == sorted(steps, reverse=True)


def test_token_entropy_uniform_and_peaked():
    z = torch.stack([torch.zeros(16), torch.tensor([50.0] + [0.0] * 15)])
    h = token_entropy(z)
    assert h[0].item() == pytest.approx(math.log(16), rel=1e-5)
    assert h[1].item() == pytest.approx(0.0, abs=1e-12)


def test_entropy_bound_mask_exact_count():
    # sorted: 0.01 0.02 0.05 0.30 0.90; sums of strictly lower: 0 0.01 0.03 0.08 0.38 -> the 4 lowest pass 0.1
    h = torch.tensor([0.05, 0.30, 0.01, 0.02, 0.90])
    assert entropy_bound_mask(h, 0.1).tolist() == [True, True, True, True, False]
    assert entropy_bound_mask(h, 0.02).tolist() == [False, False, True, True, False]


def test_entropy_bound_mask_always_accepts_one_and_works_per_row():
    h = torch.tensor([[5.0, 6.0, 7.0, 4.5], [0.0, 0.0, 0.0, 0.0]])
    mask = entropy_bound_mask(h, 0.1)
    assert mask[0].tolist() == [False, False, False, True]  # only the lowest, however high it is
    assert mask[1].all()


def test_gumbel_sample_distribution():
    probs = torch.tensor([0.1, 0.2, 0.7])
    z = probs.log().expand(40_000, 3)
    u = torch.rand(z.shape, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(gumbel_sample(z, u), minlength=3).float() / z.shape[0]
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)


def test_gumbel_sample_survives_zero_uniforms():
    z = torch.tensor([[0.0, 1.0, 2.0]])
    assert gumbel_sample(z, torch.zeros_like(z)).item() in (0, 1, 2)


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0, 60.0])  # near-uniform to peaked (underflowing softmax)
def test_score_canvas_matches_slow_twin(scale):
    """The fast exponential-race scorer draws the same tokens as the literal Gumbel-max formula on real tensors."""
    g = torch.Generator().manual_seed(int(scale * 100))
    for _ in range(10):
        z = torch.randn(64, 2048, generator=g) * scale
        z[:8, :3] += 40.0  # a few rows with a dominant token
        u = torch.rand(z.shape, generator=g)
        u[0, :7] = 0.0  # torch.rand may return exactly 0
        slow, fast = score_canvas_slow(z, u.clone()), score_canvas(z, u.clone())
        assert torch.equal(fast.sampled, slow.sampled)
        assert torch.equal(fast.argmax, slow.argmax)
        torch.testing.assert_close(fast.entropy, slow.entropy, atol=2e-5, rtol=1e-5)
        exact = torch.softmax(z, dim=-1, dtype=torch.float32)  # what the reference's self-conditioning computes
        assert (fast.probs - exact).abs().max() < 2.0**-125  # only the subnormal-range entries are zeroed
        assert torch.equal(fast.probs, flush_subnormals_(exact.clone(), below=2.0**-125))
        emb = torch.randn(2048, 32, generator=g)
        assert torch.equal(fast.probs @ emb, exact @ emb)  # and the self-conditioning product keeps every bit


@pytest.mark.parametrize("shape", [(5, 4096), (2, 3, 256), (4, 96), (3, 128)])
def test_block_argmax_is_torch_argmax(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for scale in (1e-3, 1.0, 100.0):
        x = torch.randn(shape, generator=g) * scale
        flat = x.view(-1, shape[-1])
        flat[0, 7] = flat[0, shape[-1] - 1] = flat[0].max() + 1  # a tie: the first index wins
        flat[-1] = 2.0  # a constant row
        assert torch.equal(block_argmax(x), torch.argmax(x, dim=-1))
        flat[1 % flat.shape[0], 70 % shape[-1]] = float("nan")  # NaN counts as the maximum, as in torch.argmax
        assert torch.equal(block_argmax(x), torch.argmax(x, dim=-1))


def test_score_canvas_distribution():
    probs = torch.tensor([0.1, 0.2, 0.7])
    z = probs.log().expand(40_000, 3).contiguous()
    u = torch.rand(z.shape, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(score_canvas(z, u).sampled, minlength=3).float() / z.shape[0]
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)


def test_is_stable():
    a, b = torch.tensor([1, 2]), torch.tensor([1, 3])
    assert is_stable([], a, 0)
    assert not is_stable([], a, 1)
    assert is_stable([a], a, 1) and not is_stable([b], a, 1)
    assert not is_stable([a], a, 2) and is_stable([b, a, a], a, 2)


@pytest.mark.parametrize("threshold", [0, 1, 2, 3])
def test_device_stop_flags_match_the_host_rule(threshold):
    """`prepare` decides stability on the device (one host read per batch step); it agrees with `is_stable`."""
    settings = GenerationSettings(steps=50, stability_threshold=threshold, confidence_threshold=1e9)
    sampler = CanvasSampler(settings, 4, 8, *make_generators(0))
    g = torch.Generator().manual_seed(threshold)
    for _ in range(12):
        z = torch.zeros(4, 8)
        z[torch.arange(4), torch.randint(0, 2, (4,), generator=g)] = 50.0  # argmax flips between two tokens
        scores = score_canvas(z.clone(), sampler.draw())
        want = is_stable(sampler.history, scores.argmax, threshold)
        r = sampler.resolve(p := sampler.prepare(z, scores), p.flags.tolist())
        assert r.done == want and r.first_token == int(scores.argmax[0])


def peaked_logits(c: int, v: int, token: int = 3) -> torch.Tensor:
    z = torch.zeros(c, v)
    z[:, token] = 60.0
    return z


def run_sampler(settings, logits_fn, c=6, v=32, seed=0):
    sampler = CanvasSampler(settings, c, v, *make_generators(seed))
    while True:
        r = sampler.step(logits_fn(c, v))
        if r.done:
            return sampler, r


@pytest.mark.parametrize("stability,expected_steps", [(0, 1), (1, 2), (2, 3)])
def test_stop_when_stable_and_confident(stability, expected_steps):
    settings = GenerationSettings(steps=10, stability_threshold=stability)
    sampler, r = run_sampler(settings, peaked_logits)
    assert sampler.steps == expected_steps
    assert r.argmax.tolist() == [3] * 6 and r.accepted.all()


def test_no_stop_without_confidence():
    settings = GenerationSettings(steps=7, stability_threshold=0)
    sampler, r = run_sampler(settings, lambda c, v: torch.zeros(c, v))  # uniform: entropy log(32) every step
    assert sampler.steps == 7 and r.entropy.mean().item() == pytest.approx(math.log(32), rel=1e-5)


def test_seeded_protocol_draws():
    """Canvas init from randint(0, V, (1, C)) on generator S; sampling uniforms from generator S + 1, then renoise."""
    c, v, seed = 5, 11, 42
    sampler = CanvasSampler(GenerationSettings(steps=4), c, v, *make_generators(seed))
    noise, uniforms = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    assert sampler.canvas.tolist() == torch.randint(0, v, (1, c), generator=noise)[0].tolist()
    logits = torch.randn(c, v, generator=torch.Generator().manual_seed(0))
    r = sampler.step(logits)
    z = logits / temperature(4, 4, 0.4, 0.8)
    sampled = gumbel_sample(z, torch.rand((c, v), generator=uniforms))
    renoise = torch.randint(0, v, (1, c), generator=noise)[0]
    assert r.canvas.tolist() == torch.where(r.accepted, sampled, renoise).tolist()
    assert torch.equal(sampler.sc_logits, z)  # the temperature-scaled logits are fed back


def test_unseeded_generators_differ():
    a, _ = make_generators(None)
    b, _ = make_generators(None)
    assert a.initial_seed() != b.initial_seed()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stability_threshold": -1}, "stability_threshold"),
        ({"entropy_bound": 0.0}, "entropy_bound"),
        ({"confidence_threshold": -0.1}, "confidence_threshold"),
        ({"entropy_bound": float("nan")}, "entropy_bound"),
        ({"t_min": "0.4"}, "t_min"),
        ({"t_min": 0.8, "t_max": 0.8}, "t_min < t_max"),
        ({"t_min": -0.1}, "t_min"),
        ({"steps": True}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"eos_token_ids": (1, -2)}, "eos token id"),
    ],
)
def test_settings_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GenerationSettings(**kwargs)


def test_settings_from_dict_and_override():
    raw = {
        "max_denoising_steps": None,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.3},
        "t_max": 0.9,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
    }
    s = GenerationSettings.from_dict(raw)
    assert (s.steps, s.entropy_bound, s.t_max, s.eos_token_ids, s.pad_token_id) == (48, 0.3, 0.9, (1, 106), 0)
    assert GenerationSettings.from_dict(None) == GenerationSettings()
    assert s.override(steps=5, t_min=None).steps == 5 and s.override(t_min=None).t_min == 0.4
    with pytest.raises(ConfigError, match="unknown"):
        s.override(top_k=5)
    raw["temperature"], raw["top_p"] = 0.3, 0.5  # the reference ignores these in generation_config.json, so do we
    assert GenerationSettings.from_dict(raw).temperature == 1.0 and GenerationSettings.from_dict(raw).top_p == 1.0
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"temperature": math.inf}):
        with pytest.raises(ConfigError):
            s.override(**bad)
    with pytest.raises(ConfigError, match="t_min < t_max"):
        s.override(t_min=0.95)


def test_nucleus_sample_matches_its_slow_twin():
    from dgemma.sampler import nucleus_sample, nucleus_sample_slow

    g = torch.Generator().manual_seed(3)
    for top_p in (0.05, 0.5, 0.9, 0.999):
        z = torch.randn(16, 512, generator=g) * 3
        u = torch.rand(16, 512, generator=g)
        slow = nucleus_sample_slow(z, u.clone(), top_p)
        fast = nucleus_sample(torch.softmax(z, -1), u.clone().clamp_min_(1e-20).log_().neg_(), top_p)
        assert torch.equal(fast, slow)
    z = torch.randn(16, 512, generator=g)
    tiny = nucleus_sample(torch.softmax(z, -1), torch.rand(16, 512, generator=g), 1e-6)
    assert torch.equal(tiny, z.argmax(-1))  # a nucleus of one token is the argmax


def test_temperature_scales_the_schedule_and_zero_samples_the_argmax():
    s = GenerationSettings(steps=4)
    noise, sample = make_generators(1)
    base = CanvasSampler(s, 8, 64, noise, sample)
    hot = CanvasSampler(s.override(temperature=0.5), 8, 64, *make_generators(1))
    assert base.temperature() is temperature(4, 4, 0.4, 0.8)  # the reference path is untouched
    assert torch.allclose(hot.temperature(), base.temperature() * 0.5)
    cold = CanvasSampler(s.override(temperature=0), 8, 64, *make_generators(1))
    assert torch.equal(cold.temperature(), base.temperature())  # acceptance and stopping keep the schedule
    logits = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 4
    r = cold.step(logits)
    accepted = r.accepted
    assert torch.equal(r.canvas[accepted], r.argmax[accepted])  # accepted positions take the argmax, not a sample
