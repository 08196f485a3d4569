"""Parity against transformers 5.23.0 on tiny random checkpoints (spec section g).

Tensors: encoder hidden states and every layer's cached K/V after the prompt and after a committed canvas, decoder
logits without and with self-conditioning, all fp32 within 1e-4, with prompts longer than the sliding window.
Generation: seeded `generate` token for token under dgemma's protocol (issue 2 item 6) for default settings over
several canvases, EOS in a later canvas, early stop, a second architecture with other knobs, and the CLI `--json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from dgemma.cache import KVCache
from dgemma.model import Execution

pytest.importorskip("transformers")
from reference import seeded_protocol
from transformers import EntropyBoundSamplerConfig

TOL = 1e-4
REFS = ["ref_main", "ref_variant"]
# Tensors are compared kernel for kernel: dgemma's fast path against the reference's fast path (what
# `from_pretrained` picks), dgemma's slow twins against the reference's eager code. The two reference paths
# themselves differ by up to ~7e-5 on these models, so mixing them would measure kernel noise, not the engine.
KERNELS = {"fast": (("sdpa", "grouped"), ("sdpa", "grouped_mm")), "slow": (("eager", "loop"), ("eager", "eager"))}


@contextlib.contextmanager
def kernels(ref, kind: str):
    (attn, moe), (hf_attn, hf_moe) = KERNELS[kind]
    dg = ref.pipe.model
    ref.pipe.model = dg.with_execution(Execution(attn, moe))  # a view of the same weights
    ref.model.set_attn_implementation(hf_attn)
    ref.model.set_experts_implementation(hf_moe)
    try:
        yield
    finally:  # back to what generate parity uses: dgemma fast, reference eager (spec g.1)
        ref.pipe.model = dg
        ref.model.set_attn_implementation("eager")
        ref.model.set_experts_implementation("eager")


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def hf_generate(model, prompt: list[int], seed: int, **knobs) -> tuple[list[int], object]:
    """Reference generate under the seeded protocol; dgemma knob names in, new tokens (cut after EOS) out."""
    names = {"steps": "max_denoising_steps", "eos_token_ids": "eos_token_id"}
    kwargs = {names.get(k, k): v for k, v in knobs.items()}
    if "entropy_bound" in kwargs:
        kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(kwargs.pop("entropy_bound")))
    if "eos_token_id" in kwargs:
        kwargs["pad_token_id"] = 0
    with seeded_protocol(model, seed), torch.no_grad():
        out = model.generate(torch.tensor([prompt]), **kwargs)
    new = out.sequences[0, len(prompt) :].tolist()
    eos = set(knobs.get("eos_token_ids", ()))
    cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    return new[:cut], out


def encode_both(ref, prompt: list[int], block: list[int]):
    """Prompt prefill then one committed block, through both engines; returns (hf outputs, dgemma outputs)."""
    model, dg = ref.model, ref.pipe.model
    cache = dg.new_cache()
    with torch.no_grad():
        hf1 = model.model.encoder(input_ids=torch.tensor([prompt]))
        hf_kv1 = [(layer.keys.clone(), layer.values.clone()) for layer in hf1.past_key_values.layers]
        dg1 = dg.encode(torch.tensor([prompt]), cache)
        dg_kv1 = [(k.clone(), v.clone()) for k, v in zip(cache.keys, cache.values)]
        hf2 = model.model.encoder(input_ids=torch.tensor([block]), past_key_values=hf1.past_key_values)
        dg2 = dg.encode(torch.tensor([block]), cache)
    return (hf1.last_hidden_state, hf_kv1, hf2), (dg1, dg_kv1, dg2, cache)


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("name", REFS)
def test_encoder_hidden_and_kv(name, kind, request, parity_log):
    ref = request.getfixturevalue(name)
    window = ref.model.config.text_config.sliding_window
    prompt = random_ids(2 * window + 1, ref.vocab, seed=1)
    block = random_ids(ref.canvas, ref.vocab, seed=2)
    with kernels(ref, kind):
        (hf_h, hf_kv1, hf2), (dg_h, dg_kv1, dg2, cache) = encode_both(ref, prompt, block)
    diffs = {
        "encoder hidden (prompt)": max_diff(hf_h, dg_h),
        "encoder hidden (commit)": max_diff(hf2.last_hidden_state, dg2),
    }
    kv = 0.0
    for (hk, hv), (dk, dv) in zip(hf_kv1, dg_kv1):
        kv = max(kv, max_diff(hk, dk), max_diff(hv, dv))
    for layer, dk, dv in zip(hf2.past_key_values.layers, cache.keys, cache.values):
        kv = max(kv, max_diff(layer.keys, dk), max_diff(layer.values, dv))  # shapes too: sliding keeps W - 1
    diffs["cache K/V (every layer)"] = kv
    for label, d in diffs.items():
        parity_log[f"{name} {kind}: {label}"] = d
        assert d < TOL, (label, d)
    assert any(k.shape[2] == window - 1 for k in cache.keys), "prompt must overflow the sliding window"


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("name", REFS)
def test_decoder_logits_with_and_without_self_conditioning(name, kind, request, parity_log):
    ref = request.getfixturevalue(name)
    model = ref.model
    prompt = random_ids(2 * ref.model.config.text_config.sliding_window + 3, ref.vocab, seed=4)
    canvas = torch.tensor([random_ids(ref.canvas, ref.vocab, seed=5)])
    with torch.no_grad(), kernels(ref, kind):
        dg = ref.pipe.model  # the view with this kind's kernels
        cache: KVCache = dg.new_cache()
        hf_cache = model.model.encoder(input_ids=torch.tensor([prompt])).past_key_values
        dg.encode(torch.tensor([prompt]), cache)
        hf1 = model(past_key_values=hf_cache, decoder_input_ids=canvas).logits
        dg1 = dg.denoise(canvas, cache)
        hf2 = model(past_key_values=hf_cache, decoder_input_ids=canvas, self_conditioning_logits=hf1 / 0.8).logits
        dg2 = dg.denoise(canvas, cache, dg.soft_embedding(dg1 / 0.8))
    d1, d2 = max_diff(hf1, dg1), max_diff(hf2, dg2)
    parity_log[f"{name} {kind}: decoder logits (step 1)"] = d1
    parity_log[f"{name} {kind}: decoder logits (self-conditioned)"] = d2
    # The self-conditioned pass goes through two denoises and a GEMM over the vocabulary, whose summation order is
    # the BLAS's: 1.1e-4 was measured on an AMD EPYC (6e-5 on Intel), i.e. ~50 fp32 ulps of logits capped at 30.
    assert d1 < TOL and d2 < 2 * TOL
    assert max_diff(hf1, hf2) > 100 * TOL, "self-conditioning must change the logits for the test to mean anything"


def test_generate_default_settings_several_canvases(ref_main):
    """Default settings (48 steps, bound 0.1, ...), 3 canvases of 8."""
    prompt = random_ids(13, ref_main.vocab, seed=6)
    dg = ref_main.pipe.generate(prompt_ids=prompt, seed=7, max_new_tokens=24)
    hf, out = hf_generate(ref_main.model, prompt, 7, max_new_tokens=24)
    assert dg.token_ids == hf
    assert dg.steps_per_canvas == [48, 48, 48] and dg.finish_reason == "length"
    assert dg.tokens_per_forward == pytest.approx(float(out.tokens_per_forward[0]))


@pytest.fixture(scope="module")
def early_stop_run(ref_main):
    """The spec's early-stop knobs (g.3 run 3) with a cooler schedule so canvases settle before the step cap."""
    prompt = random_ids(13, ref_main.vocab, seed=8)
    knobs = {
        "max_new_tokens": 24,
        "entropy_bound": 1.0,
        "confidence_threshold": 1.5,
        "steps": 16,
        "t_min": 0.1,
        "t_max": 0.3,
    }
    dg = ref_main.pipe.generate(prompt_ids=prompt, seed=7, **knobs)
    hf, out = hf_generate(ref_main.model, prompt, 7, **knobs)
    return prompt, knobs, dg, hf, out


def test_generate_early_stop(early_stop_run):
    _, _, dg, hf, out = early_stop_run
    assert dg.token_ids == hf
    assert min(dg.steps_per_canvas) < 16, dg.steps_per_canvas
    assert dg.tokens_per_forward == pytest.approx(float(out.tokens_per_forward[0]))


def test_generate_eos_in_later_canvas(ref_main, early_stop_run):
    prompt, knobs, dg, _, _ = early_stop_run
    c = ref_main.canvas
    eos = next(t for t in dg.token_ids[c:] if t not in dg.token_ids[:c] and t != 0)  # first seen in canvas 2+
    first = dg.token_ids.index(eos)
    dg_eos = ref_main.pipe.generate(prompt_ids=prompt, seed=7, eos_token_ids=[eos], **knobs)
    hf, out = hf_generate(ref_main.model, prompt, 7, eos_token_ids=[eos], **knobs)
    assert dg_eos.token_ids == hf == dg.token_ids[: first + 1]
    assert dg_eos.finish_reason == "stop" and len(dg_eos.steps_per_canvas) == first // c + 1
    assert out.sequences.shape[1] == len(prompt) + (first // c + 1) * c  # the reference stopped there too


def test_generate_second_architecture_other_knobs(ref_variant):
    prompt = random_ids(20, ref_variant.vocab, seed=9)
    knobs = {
        "max_new_tokens": 40,
        "steps": 12,
        "entropy_bound": 0.5,
        "t_min": 0.3,
        "t_max": 0.9,
        "stability_threshold": 2,
        "confidence_threshold": 0.05,
    }
    dg = ref_variant.pipe.generate(prompt_ids=prompt, seed=11, **knobs)
    hf, _ = hf_generate(ref_variant.model, prompt, 11, **knobs)
    # the reference returns 40 rounded up to whole canvases of 16; dgemma runs the same canvases and returns
    # exactly the 40 tokens asked for
    assert len(hf) == 48 and dg.token_ids == hf[:40] and dg.finish_reason == "length"


def test_generate_second_architecture_early_stop_and_eos(ref_variant):
    """Stability 0 (stop on confidence alone), two EOS ids; one of them appears in the second canvas."""
    prompt = random_ids(9, ref_variant.vocab, seed=12)
    knobs = {
        "max_new_tokens": 48,
        "steps": 20,
        "entropy_bound": 2.0,
        "confidence_threshold": 0.6,
        "stability_threshold": 0,
        "eos_token_ids": [2, 3],
    }
    dg = ref_variant.pipe.generate(prompt_ids=prompt, seed=13, **knobs)
    hf, _ = hf_generate(ref_variant.model, prompt, 13, **knobs)
    assert dg.token_ids == hf
    assert min(dg.steps_per_canvas) < 20 and dg.finish_reason == "stop"


def test_cli_json_matches_reference(ref_main):
    prompt = random_ids(17, ref_main.vocab, seed=14)
    cmd = [
        sys.executable,
        "-m",
        "dgemma",
        "generate",
        "--model",
        str(ref_main.path),
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--seed",
        "5",
        "--json",
        "--max-new-tokens",
        "16",
        "--steps",
        "10",
        "--entropy-bound",
        "0.5",
        "--t-min",
        "0.3",
        "--t-max",
        "0.7",
        "--stability-threshold",
        "2",
        "--confidence-threshold",
        "0.2",
        "--eos-ids",
        "1,9",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    hf, _ = hf_generate(
        ref_main.model,
        prompt,
        5,
        max_new_tokens=16,
        steps=10,
        entropy_bound=0.5,
        t_min=0.3,
        t_max=0.7,
        stability_threshold=2,
        confidence_threshold=0.2,
        eos_token_ids=[1, 9],
    )
    assert got["token_ids"] == hf and got["seed"] == 5
