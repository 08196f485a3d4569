"""The serving batch's static KV cache against its slow twin, the dynamic cache: the same keys, values and positions
bit for bit after prefill, commits (sliding layers shifted to their window), row moves and growth, and the same
denoise logits through the batch view."""

from __future__ import annotations

import pytest
import torch
from tiny import random_model, tiny_config

from dgemma.cache import StaticCache, stack_caches
from dgemma.model import Execution

C = 16


@pytest.fixture(scope="module")
def model():
    # window 8 < canvas 16: every commit overflows the sliding layers; invariant kernels for bitwise comparisons
    return random_model(tiny_config(canvas_length=C), seed=5).with_execution(Execution(moe="grouped", invariant=True))


def prefilled(model, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache()
    model.encode(torch.randint(3, 128, (1, n), generator=g), cache)
    return cache


def same(a, b) -> None:
    for layer in range(len(a.keys)):
        assert torch.equal(a.keys[layer], b.keys[layer]), layer
        assert torch.equal(a.values[layer], b.values[layer]), layer
        assert torch.equal(a.positions[layer], b.positions[layer]), layer
    assert torch.equal(a.length, b.length)


def test_rows_match_the_dynamic_twin_through_commits_moves_and_growth(model):
    lengths = [3, 19, 40]
    twins = [prefilled(model, n, i) for i, n in enumerate(lengths)]
    static = StaticCache(twins[0], rows=4, capacity=32, extra=C)  # capacity 32 < 40: grows at admission
    rows = [static.admit(t.clone()) for t in twins]
    assert static.capacity == 64
    g = torch.Generator().manual_seed(9)
    for _ in range(3):  # commits: every row encodes a canvas into its own cache; the row 40+48 grows again
        for row, twin in zip(rows, twins):
            canvas = torch.randint(3, 128, (1, C), generator=g)
            model.encode(canvas, twin)
            model.encode(canvas, row)
            same(row, twin)
    assert static.capacity == 128
    moved = static.release(rows[0])  # the last row moves into slot 0
    assert moved is rows[2] and moved.slot == 0 and static.used == 2
    same(rows[2], twins[2])
    same(rows[1], twins[1])


def test_batch_view_denoises_like_the_stacked_dynamic_caches(model):
    twins = [prefilled(model, n, 10 + n) for n in (5, 21, 33)]
    static = StaticCache(twins[0], rows=3, capacity=64, extra=C)
    for t in twins:
        static.admit(t.clone())
    g = torch.Generator().manual_seed(3)
    canvas = torch.randint(3, 128, (3, C), generator=g)
    soft = torch.randn(3, C, 64, generator=g)
    want = model.denoise(canvas, stack_caches(twins), soft)
    got = model.denoise(canvas, static.batch(3), soft)
    assert torch.equal(got, want)


def test_a_full_static_cache_refuses_another_row(model):
    static = StaticCache(prefilled(model, 4, 0), rows=1, capacity=16, extra=C)
    static.admit(prefilled(model, 4, 1))
    with pytest.raises(RuntimeError, match="holds 1 rows"):
        static.admit(prefilled(model, 4, 2))
