"""The one pin mechanism: fixed positions hold bit for bit in every model input, draft and commit (in later canvases
too); vocabulary limits hold in every argmax; pinned positions stay out of acceptance and the stop rule's mean; no
pins changes nothing; and batching stays bitwise invariant with pinned and unpinned requests mixed."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import random_model, tiny_config

from dgemma.config import GenerationSettings
from dgemma.generate import CanvasEvent, Generation, Request, StepEvent, denoise_step
from dgemma.model import Execution
from dgemma.sampler import CanvasSampler, Layout, Pins, make_generators, score_canvas

C, V = 16, 128
SETTINGS = GenerationSettings(max_new_tokens=3 * C, steps=8, eos_token_ids=(1,))


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(canvas_length=C, num_experts=8, top_k_experts=2), seed=4)


def layout_with_limits() -> Layout:
    fixed = {0: 40, 5: 41, 6: 42, C - 1: 43, C + 3: 44, 2 * C + 7: 45}  # in all three canvases
    allowed = torch.zeros(2, V, dtype=torch.bool)
    allowed[0, 60:70] = True
    allowed[1, [7, 9, 11]] = True
    return Layout(fixed, allowed, {2: 0, 3: 0, C + 8: 1, 2 * C: 1})


def run(model, request: Request) -> tuple[Generation, list]:
    g = Generation(model, request)
    g.prefill()
    events = []
    while not g.finished:
        events += denoise_step(model, [g])[0]
    return g, events


def canvas_of(ev: StepEvent) -> int:
    return ev.canvas_index * C


def test_pins_and_limits_hold_in_every_step_and_commit(model):
    layout = layout_with_limits()
    g, events = run(model, Request((2, 3, 4), SETTINGS.override(eos_token_ids=()), 5, layout=layout, draft=True))
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert {e.canvas_index for e in steps} == {0, 1, 2}
    for e in steps:
        base = canvas_of(e)
        for p, t in layout.fixed.items():
            if base <= p < base + C:
                assert e.draft[p - base] == t and e.canvas[p - base] == t and e.fixed[p - base]
                assert not e.accepted[p - base] and e.entropy[p - base] == 0
        for p, row in layout.mask_at.items():
            if base <= p < base + C:
                assert layout.masks[row, e.draft[p - base]]
        free = [h for i, h in enumerate(e.entropy) if not e.fixed[i]]
        assert e.mean_entropy == pytest.approx(sum(free) / len(free), rel=1e-5)  # pins stay out of the mean
    out = g.token_ids
    assert len(out) == 3 * C and all(out[p] == t for p, t in layout.fixed.items())
    assert all(layout.masks[row, out[p]] for p, row in layout.mask_at.items())
    commits = [e for e in events if isinstance(e, CanvasEvent)]
    assert [t for e in commits for t in e.token_ids] == out


def test_first_model_input_holds_the_pins(model):
    noise, sample = make_generators(3)
    pins = Pins(C, {1: 50, 4: 51})
    s = CanvasSampler(SETTINGS, C, V, noise, sample, pins=pins)
    assert s.canvas[1] == 50 and s.canvas[4] == 51
    plain = CanvasSampler(SETTINGS, C, V, *make_generators(3))
    keep = [i for i in range(C) if i not in (1, 4)]
    assert torch.equal(s.canvas[keep], plain.canvas[keep])  # same init draw: only the pins differ


def test_acceptance_budget_ignores_pinned_positions():
    """A pinned position costs no entropy budget and takes no acceptance slot; a free one is always accepted."""
    noise, sample = make_generators(1)
    pins = Pins(C, {i: 3 for i in range(C - 2)})  # all but two positions pinned
    s = CanvasSampler(SETTINGS.override(entropy_bound=1e-6), C, V, noise, sample, pins=pins)
    z = torch.randn(C, V, generator=torch.Generator().manual_seed(0)) * 3
    s.constrain(z)
    r = s.advance(z, score_canvas(z, s.draw()))
    assert r.accepted[: C - 2].sum() == 0 and r.accepted[C - 2 :].sum() == 1  # only the lowest free position
    assert math.isclose(r.mean_entropy, float(r.entropy[C - 2 :].mean()), rel_tol=1e-6)


def test_an_empty_layout_changes_nothing(model):
    plain, _ = run(model, Request((2, 9, 9), SETTINGS, 11))
    empty, _ = run(model, Request((2, 9, 9), SETTINGS, 11, layout=Layout()))
    assert plain.token_ids == empty.token_ids and plain.steps_per_canvas == empty.steps_per_canvas


def test_mixed_batch_is_bitwise_invariant(model):
    """Pinned, limited and unpinned requests in one batch each get exactly their solo drafts, entropies and tokens."""
    requests = [
        Request((2, 3, 4), SETTINGS, 1, layout=layout_with_limits(), draft=True),
        Request(tuple(range(10, 40)), SETTINGS, 2, draft=True),
        Request((2, 8), SETTINGS.override(max_new_tokens=C), 3, layout=Layout({4: 77, 9: 78}), draft=True),
    ]
    model = model.with_execution(Execution(moe="grouped", invariant=True))
    solo = [run(model, r) for r in requests]
    gens = [Generation(model, r) for r in requests]
    for g in gens:
        g.prefill()
    got: list[list] = [[] for _ in gens]
    while live := [i for i, g in enumerate(gens) if not g.finished]:
        for i, evs in zip(live, denoise_step(model, [gens[i] for i in live])):
            got[i] += evs
    for (g_solo, ev_solo), g, evs in zip(solo, gens, got):
        assert g.token_ids == g_solo.token_ids and g.steps_per_canvas == g_solo.steps_per_canvas
        steps_solo = [(e.draft, e.entropy) for e in ev_solo if isinstance(e, StepEvent)]
        assert [(e.draft, e.entropy) for e in evs if isinstance(e, StepEvent)] == steps_solo


def test_bad_pinned_ids_are_refused(model):
    from dgemma.config import ConfigError

    with pytest.raises(ConfigError, match="pinned token ids"):
        Generation(model, Request((2,), SETTINGS, 0, layout=Layout({0: V + 5})))


def test_budget_is_exact_and_never_exceeded(model):
    for budget in (1, 5, C, C + 3):
        g, events = run(model, Request((2, 3), SETTINGS.override(max_new_tokens=budget, eos_token_ids=()), 7))
        assert len(g.token_ids) == budget and g.finish_reason == "length"
        assert sum(len(e.token_ids) for e in events if isinstance(e, CanvasEvent)) == budget
