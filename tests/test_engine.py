"""The serving engine without HTTP: batch-invariant model mode (a row computes bit-for-bit what it computes alone),
early settlement with pinning, cancellation, the bounded queue and fault isolation."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from tiny import random_model, tiny_config

from dgemma.cache import stack_caches
from dgemma.config import GenerationSettings
from dgemma.engine import Engine, Failed, Finished, Job, PinnedGeneration, QueueFull, Settle, Tokens
from dgemma.generate import Generation, StepEvent, denoise_step
from dgemma.model import INVARIANT_ROWS, pad_rows

SETTINGS = GenerationSettings(max_new_tokens=32, steps=4, eos_token_ids=(1,))
PROMPTS = [[2, 5, 9], [2] + list(range(10, 40)), [2, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]]


@pytest.fixture(scope="module")
def model():
    # 8 experts over a 16-token canvas: some experts get fewer than INVARIANT_ROWS tokens from a request
    return random_model(tiny_config(canvas_length=16, num_experts=8, top_k_experts=2), seed=2)


@pytest.mark.parametrize("k, n", [(64, 96), (96, 32), (64, 128), (32, 64), (128, 4096), (4096, 128), (256, 512)])
def test_padded_gemm_rows_do_not_depend_on_the_rest_of_the_call(k, n):
    """The BLAS property batch-invariant mode relies on: once a call's rows are padded to a multiple of
    INVARIANT_ROWS, a row's result depends neither on how many other rows share the call nor on its place."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    for m in [1, 3, 5, 11, 12, 16, 17, 31, 64, 100]:
        x = torch.randn(m, k, generator=g)
        alone = F.linear(pad_rows(x), w)[:m]
        for before, after in [(37, 300), (5, 2), (0, 100), (64, 0)]:
            stacked = torch.cat([torch.randn(before, k, generator=g), x, torch.randn(after, k, generator=g)])
            assert torch.equal(F.linear(pad_rows(stacked), w)[before : before + m], alone)


def test_pad_rows():
    x = torch.randn(5, 3)
    padded = pad_rows(x)
    assert padded.shape == (INVARIANT_ROWS, 3) and torch.equal(padded[:5], x) and not padded[5:].any()
    assert pad_rows(torch.randn(2 * INVARIANT_ROWS, 3)).shape[0] == 2 * INVARIANT_ROWS  # already a multiple


def prefilled(model, prompts, seeds):
    gens = [Generation(model, p, SETTINGS, s) for p, s in zip(prompts, seeds)]
    for g in gens:
        g.prefill()
    return gens


def test_batched_denoise_is_bitwise_solo(model):
    """Different prompt lengths (left-padded caches), first step and self-conditioned steps, small expert groups."""
    model.batch_invariant = True
    try:
        batch, solo = prefilled(model, PROMPTS, [1, 2, 3]), prefilled(model, PROMPTS, [1, 2, 3])
        for _ in range(3):
            events = denoise_step(model, batch)
            for g, ev in zip(solo, events):
                alone = denoise_step(model, [g])[0]
                assert alone[0].draft == ev[0].draft and alone[0].entropy == ev[0].entropy
        model.batch_invariant = False  # the default path: same math, low bits may differ
        loose = prefilled(model, PROMPTS, [1, 2, 3])
        rows = torch.stack([g.sampler.canvas for g in loose])
        logits = model.denoise(rows, stack_caches([g.cache for g in loose]))
        model.batch_invariant = True
        exact = model.denoise(rows, stack_caches([g.cache for g in loose]))
        torch.testing.assert_close(logits, exact, rtol=1e-4, atol=1e-4)
    finally:
        model.batch_invariant = False


def step_event(draft, entropy):
    c = len(draft)
    return StepEvent(0, 1, list(draft), list(draft), [True] * c, list(entropy), sum(entropy) / c)


def test_settle_pins_a_stable_prefix_and_the_commit_keeps_it(model):
    gen = PinnedGeneration(model, [2, 5], SETTINGS, 0)
    gen.prefill()
    c = gen.canvas_length
    rule = Settle(steps=2, entropy=0.1)
    low, high = [0.01] * c, [0.01, 0.01, 0.5] + [0.01] * (c - 3)
    a = [20 + i for i in range(c)]
    assert gen.settle(step_event(a, low), rule) == []  # seen once: not stable yet
    assert gen.settle(step_event(a, high), rule) == a[:2]  # position 2 is unsure, so the prefix stops there
    b = a[:3] + [99] + a[4:]
    assert gen.settle(step_event(b, low), rule) == a[2:3]  # position 3 changed: its run restarts
    final = torch.tensor([7] * c)
    event = gen._commit(final)
    assert event.token_ids == a[:3] + [7] * (c - 3)  # pins kept, the rest is the final argmax
    assert gen.pins == [] and gen.committed_pins == a[:3]


def test_settle_stops_after_eos(model):
    gen = PinnedGeneration(model, [2, 5], SETTINGS, 0)
    gen.prefill()
    draft = [30, 1, 31] + [32] * (gen.canvas_length - 3)
    rule = Settle(steps=1, entropy=1.0)
    assert gen.settle(step_event(draft, [0.0] * len(draft)), rule) == [30, 1]
    assert gen.settle(step_event(draft, [0.0] * len(draft)), rule) == []
    assert gen._commit(torch.tensor(draft)).token_ids == [30, 1] and gen.finish_reason == "stop"


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, (Finished, Failed)):
            self.done.set()


def job(prompt, seed, settings=SETTINGS, **kw):
    c = Collector()
    return Job(prompt, settings, seed, c, **kw), c


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("workers", [1, 2])
def test_engine_matches_solo_generation_and_reports_tokens(model, workers):
    engine = Engine(model, max_batch=2, workers=workers).start()
    try:
        jobs = [job(p, s) for p, s in zip(PROMPTS, [5, 6, 7])]  # 3 jobs, batch of 2: one joins later
        engine.submit([j for j, _ in jobs])
        for (j, c), prompt, seed in zip(jobs, PROMPTS, [5, 6, 7]):
            assert c.done.wait(30)
            fin = c.events[-1]
            streamed = [t for e in c.events if isinstance(e, Tokens) for t in e.ids]
            ref = Generation(model, prompt, SETTINGS, seed)
            ref.prefill()
            while not ref.finished:
                denoise_step(model, [ref])
            assert fin.token_ids == streamed == ref.token_ids
            assert fin.steps_per_canvas == ref.steps_per_canvas and fin.first_commit_s is not None
        assert engine.counters["peak_batch"] == 2
    finally:
        engine.stop()
        model.batch_invariant = False


def test_engine_queue_cancel_and_faults(model):
    slow = SETTINGS.override(steps=1024, confidence_threshold=1e-30, max_new_tokens=64)
    engine = Engine(model, max_batch=1, max_queue=2).start()
    try:
        running, _ = job([2, 3], 1, slow)
        engine.submit([running])
        wait_for(lambda: engine.stats()["active"] == 1)
        queued = [job([2, 4], 2, slow), job([2, 5], 3, slow)]
        with pytest.raises(QueueFull):
            engine.submit([j for j, _ in queued] + [job([2], 4)[0]])  # all or nothing
        engine.submit([j for j, _ in queued])
        assert engine.stats()["queued"] == 2
        engine.cancel(queued[0][0])
        assert engine.stats()["queued"] == 1  # a queued job leaves at once
        engine.cancel(running)
        wait_for(lambda: engine.stats()["active"] == 1 and engine.stats()["queued"] == 0)  # the next one runs
        engine.cancel(queued[1][0])
        wait_for(lambda: engine.stats()["active"] == 0)
        bad, bc = job([2, 10**6], 1)  # out-of-vocabulary id: fails in prefill, the worker survives
        engine.submit([bad])
        assert bc.done.wait(10) and isinstance(bc.events[-1], Failed)
        ok, oc = job([2, 3], 1)
        engine.submit([ok])
        assert oc.done.wait(30) and isinstance(oc.events[-1], Finished)
        late, lc = job([2, 3], 1, slow)
        engine.submit([late])
        wait_for(lambda: engine.stats()["active"] == 1)
    finally:
        engine.stop()
        model.batch_invariant = False
    assert lc.done.wait(10) and isinstance(lc.events[-1], Failed)  # stopping fails what is left
    assert not engine.healthy()
