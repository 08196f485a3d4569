"""Multi-turn prefix cache (exact reuse, bounded LRU, cached_tokens on the wire) and the empty-reply guard."""

from __future__ import annotations

import openai
import pytest
import torch
from gemma4 import gemma4_checkpoint, scripted_pipeline
from serving import LiveServer

from dgemma.cache import PrefixCache
from dgemma.generate import Generation, Pipeline, redraw_seed, run_batch
from dgemma.server import create_app

TURN1 = [{"role": "system", "content": "You answer briefly. " * 6}, {"role": "user", "content": "Where is Paris?"}]
TURN2 = TURN1 + [
    {"role": "assistant", "content": "In France, on the Seine."},
    {"role": "user", "content": "And Rome?"},
]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Pipeline:
    # tiny_config's sliding window is 8, smaller than the 16-token block: reuse crosses trimmed sliding layers
    return Pipeline.load(gemma4_checkpoint(tmp_path_factory.mktemp("pc")), device="cpu", dtype="float32")


def _run(pipe, ids, prefix, seed=5):
    gen = Generation(pipe.model, pipe.request(prompt_ids=ids, seed=seed, max_new_tokens=40))
    for _ in run_batch(pipe.model, [gen], prefix):
        pass
    return gen


def test_reuse_is_exact(pipe):
    ids1 = pipe.prompt_ids(messages=TURN1)
    ids2 = pipe.prompt_ids(messages=TURN2)
    assert ids2[: len(ids1)] == ids1
    warm = PrefixCache(1 << 30, pipe.canvas_length)
    _run(pipe, ids1, warm)
    hit = _run(pipe, ids2, warm)
    cold = _run(pipe, ids2, PrefixCache(0, pipe.canvas_length))
    assert hit.cached_tokens == len(ids1) // 16 * 16 > 0 and cold.cached_tokens == 0
    assert hit.token_ids == cold.token_ids
    # the prompt caches themselves are equal bit for bit, sliding layers (trimmed to W - 1) included
    a, b = PrefixCache(1 << 30, 16), PrefixCache(0, 16)
    g1, g2 = (Generation(pipe.model, pipe.request(prompt_ids=ids2)) for _ in range(2))
    a.store(tuple(ids1[:16]), _prefilled(pipe, ids1[:16]))
    g1.prefill(a)
    g2.prefill(b)
    assert g1.cached_tokens == 16
    for k1, k2, p1, p2 in zip(g1.cache.keys, g2.cache.keys, g1.cache.positions, g2.cache.positions):
        assert torch.equal(k1, k2) and torch.equal(p1, p2)


def _prefilled(pipe, ids):
    g = Generation(pipe.model, pipe.request(prompt_ids=ids))
    g.prefill(PrefixCache(0, 16))
    return g.cache


def test_lru_is_bounded_by_bytes(pipe):
    one = _prefilled(pipe, list(range(3, 19))).nbytes()
    pc = PrefixCache(2 * one + one // 2, 16)
    for k in range(4):
        pc.store(tuple(range(3 + k, 19 + k)), _prefilled(pipe, list(range(3 + k, 19 + k))))
    s = pc.stats()
    assert s["entries"] == 2 and s["bytes"] <= pc.max_bytes
    assert pc.lookup(list(range(3, 19)) + [5])[0] == 0  # the oldest was evicted
    assert pc.lookup(list(range(6, 22)) + [5])[0] == 16


def test_turn_two_reports_cached_tokens_and_same_output(tmp_path_factory):
    path = gemma4_checkpoint(tmp_path_factory.mktemp("srv"))
    outs = {}
    for size in (1 << 30, 0):
        pipe = Pipeline.load(path, device="cpu", dtype="float32")
        with LiveServer(create_app(pipe, model_id="g4", prefix_cache_bytes=size)) as live:
            client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
            r1 = client.chat.completions.create(model="g4", messages=TURN1, seed=9, max_tokens=24)
            r2 = client.chat.completions.create(model="g4", messages=TURN2, seed=9, max_tokens=24)
            outs[size] = (r1.choices[0].message.content, r2.choices[0].message.content)
            cached = r2.usage.prompt_tokens_details.cached_tokens
            assert r1.usage.prompt_tokens_details.cached_tokens == 0
            if size:
                assert cached == r1.usage.prompt_tokens // 16 * 16 > 0
            else:
                assert cached == 0
    assert outs[1 << 30] == outs[0]


# --- empty-reply guard --------------------------------------------------------------------------------------------
def test_empty_reply_is_redrawn(tmp_path):
    pipe = scripted_pipeline(tmp_path, lambda context: "")  # the script answers with EOS straight away
    ids = pipe.prompt_ids(messages=[{"role": "user", "content": "Hi"}])
    off = pipe.generate(prompt_ids=ids, seed=1)
    assert off.token_ids == [106] and off.empty_redraws == 0
    on = pipe.generate(prompt_ids=ids, seed=1, empty_redraws=2)
    assert on.empty_redraws == 2 and on.token_ids[0] not in pipe.invisible_ids() + (0, 1, 106, 50)
    assert on.token_ids[0] not in pipe.invisible_ids()  # text, or a marker the chat parser shows: not empty
    assert on.token_ids == pipe.generate(prompt_ids=ids, seed=1, empty_redraws=2).token_ids  # seeded rule
    assert redraw_seed(1, 1) != redraw_seed(1, 2) != 1


def test_redraw_stats_on_the_wire(tmp_path):
    pipe = scripted_pipeline(tmp_path, lambda context: "")
    with LiveServer(create_app(pipe, model_id="g4", empty_redraws=1)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="g4", messages=[{"role": "user", "content": "Hi"}], seed=2)
        assert r.choices[0].model_extra["dgemma"]["empty_redraws"] == 1 and r.usage.completion_tokens > 1
        r = client.chat.completions.create(
            model="g4", messages=[{"role": "user", "content": "Hi"}], seed=2, extra_body={"empty_redraws": 0}
        )
        assert r.usage.completion_tokens == 1 and "empty_redraws" not in r.choices[0].model_extra["dgemma"]
