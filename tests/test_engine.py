"""The serving engine without HTTP: batch-invariant model mode (a row computes bit-for-bit what it computes alone),
early settlement with pinning, cancellation, the bounded queue and fault isolation."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from tiny import random_model, tiny_config

from dgemma.cache import PrefixCache, stack_caches
from dgemma.config import GenerationSettings
from dgemma.engine import Engine, Failed, Finished, Job, QueueFull
from dgemma.generate import CanvasEvent, Generation, Request, Settle, SettleEvent, denoise_step
from dgemma.model import INVARIANT_ROWS, Execution, pad_rows
from dgemma.sampler import StepResult

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
    gens = [Generation(model, Request(tuple(p), SETTINGS, s, draft=True)) for p, s in zip(prompts, seeds)]
    for g in gens:
        g.prefill()
    return gens


def test_batched_denoise_is_bitwise_solo(model):
    """Different prompt lengths (left-padded caches), first step and self-conditioned steps, small expert groups."""
    exact_model = model.with_execution(Execution(moe="grouped", invariant=True))
    batch, solo = prefilled(exact_model, PROMPTS, [1, 2, 3]), prefilled(exact_model, PROMPTS, [1, 2, 3])
    for _ in range(3):
        events = denoise_step(exact_model, batch)
        for g, ev in zip(solo, events):
            alone = denoise_step(exact_model, [g])[0]
            assert alone[0].draft == ev[0].draft and alone[0].entropy == ev[0].entropy
    loose = prefilled(model, PROMPTS, [1, 2, 3])  # the default path: same math, low bits may differ
    rows = torch.stack([g.sampler.canvas for g in loose])
    logits = model.denoise(rows, stack_caches([g.cache for g in loose]))
    exact = exact_model.denoise(rows, stack_caches([g.cache for g in loose]))
    torch.testing.assert_close(logits, exact, rtol=1e-4, atol=1e-4)


def step_result(draft, entropy, done=False):
    c = len(draft)
    t = torch.tensor(draft)
    return StepResult(1, t, t, torch.ones(c, dtype=torch.bool), torch.tensor(entropy), sum(entropy) / c, done)


def settling(model, rule):
    gen = Generation(model, Request((2, 5), SETTINGS, 0, settle=rule))
    gen.prefill()
    return gen


def test_settle_pins_a_stable_prefix_and_the_commit_keeps_it(model):
    gen = settling(model, Settle(steps=2, entropy=0.1))
    c = gen.canvas_length
    low, high = [0.01] * c, [0.01, 0.01, 0.5] + [0.01] * (c - 3)
    a = [20 + i for i in range(c)]
    assert gen._settle(step_result(a, low)) == []  # seen once: not stable yet
    assert gen._settle(step_result(a, high)) == a[:2]  # position 2 is unsure, so the prefix stops there
    b = a[:3] + [99] + a[4:]
    assert gen._settle(step_result(b, low)) == a[2:3]  # position 3 changed: its run restarts
    pins = gen.sampler.pins
    assert pins.fixed.tolist() == [True] * 3 + [False] * (c - 3) and pins.tokens[:3].tolist() == a[:3]
    assert pins.apply(torch.full((c,), 7)).tolist() == a[:3] + [7] * (c - 3)  # the model input holds them


def test_settled_tokens_hold_in_the_real_canvas_and_commit(model):
    """End to end through the sampler: once released, a token is in every later model input and in the commit."""
    gen = settling(model, Settle(steps=1, entropy=10.0))  # everything settles after one step
    released = []
    for e in denoise_step(model, [gen])[0]:
        released += e.token_ids if isinstance(e, SettleEvent) else []
    assert released and gen.sampler.canvas[: len(released)].tolist() == released
    while not gen.finished:
        for e in denoise_step(model, [gen])[0]:
            if isinstance(e, SettleEvent) and e.canvas_index == 0:
                released += e.token_ids
            elif isinstance(e, CanvasEvent) and e.canvas_index == 0:
                assert e.token_ids[: len(released)] == released and e.new_ids == e.token_ids[len(released) :]


def test_settle_stops_after_eos(model):
    gen = settling(model, Settle(steps=1, entropy=1.0))
    draft = [30, 1, 31] + [32] * (gen.canvas_length - 3)
    assert gen._settle(step_result(draft, [0.0] * len(draft))) == [30, 1]
    assert gen._settle(step_result(draft, [0.0] * len(draft))) == []
    event = gen._commit(step_result(draft, [0.0] * len(draft), done=True))
    assert event.token_ids == [30, 1] and event.new_ids == [] and gen.finish_reason == "stop"


def test_settle_respects_the_token_budget(model):
    gen = Generation(model, Request((2, 5), SETTINGS.override(max_new_tokens=3), 0, settle=Settle(1, 1.0)))
    gen.prefill()
    draft = list(range(30, 30 + gen.canvas_length))
    assert gen._settle(step_result(draft, [0.0] * len(draft))) == draft[:3]
    event = gen._commit(step_result(draft, [0.0] * len(draft), done=True))
    assert event.token_ids == draft[:3] and gen.token_ids == draft[:3] and gen.finish_reason == "length"


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, (Finished, Failed)):
            self.done.set()


def job(prompt, seed, settings=SETTINGS, **kw):
    c = Collector()
    return Job(Request(tuple(prompt), settings, seed, **kw), c), c


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
            streamed = [t for e in c.events if isinstance(e, CanvasEvent) for t in e.new_ids]
            ref = Generation(engine.model, Request(tuple(prompt), SETTINGS, seed))  # the engine's own view
            ref.prefill(PrefixCache(0, engine.model.config.canvas_length))  # block-wise, as the engine prefills
            while not ref.finished:
                denoise_step(engine.model, [ref])
            assert fin.token_ids == streamed == ref.token_ids
            assert fin.steps_per_canvas == ref.steps_per_canvas and fin.first_commit_s is not None
        assert engine.counters["peak_batch"] == 2
    finally:
        engine.stop()


def test_engine_queue_cancel_and_faults(model):
    slow = SETTINGS.override(steps=1024, confidence_threshold=1e-30, max_new_tokens=64)
    engine = Engine(model, max_batch=1, max_queue=2).start()
    try:
        running, _ = job([2, 3], 1, slow)
        engine.submit([running])
        wait_for(lambda: engine.stats()["active"] == 1)
        queued = [job([2, 4], 2, slow), job([2, 5], 3, slow)]
        engine.submit([j for j, _ in queued])  # one request of two generations takes one of the two places
        assert engine.stats()["queued"] == 2 and engine.stats()["queued_requests"] == 1
        other, _ = job([2, 6], 4, slow)
        engine.submit([other])
        with pytest.raises(QueueFull):
            engine.submit([job([2], 5)[0]])
        assert engine.stats()["queued_requests"] == 2 and engine.counters["rejected"] == 1
        engine.cancel(other)
        engine.cancel(queued[0][0])
        assert engine.stats()["queued"] == 1 and engine.stats()["queued_requests"] == 1  # queued jobs leave at once
        engine.cancel(running)
        wait_for(lambda: engine.stats()["active"] == 1 and engine.stats()["queued"] == 0)  # the next one runs
        assert engine.stats()["queued_requests"] == 0
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
    assert lc.done.wait(10) and isinstance(lc.events[-1], Failed)  # stopping fails what is left
    assert not engine.healthy()
