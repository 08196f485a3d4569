"""Micro training run: the objective learns, and the result is a normal checkpoint the loader and sampler accept."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from dgemma.bpe import load_corpus_lines
from dgemma.generate import Pipeline
from dgemma.loader import load_model
from dgemma.train import TrainConfig, Trainer, block_masks, corrupt

CORPUS = Path(__file__).resolve().parents[1] / "data" / "web" / "val.txt.gz"


def test_block_mask_semantics():
    """Noised block b sees clean tokens before b*C (sliding: only the last W-1) and its own block, nothing else."""
    masks = block_masks(["sliding_attention", "full_attention"], seq_len=12, canvas=4, window=3)
    full, sliding = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]
    L = 12
    assert full[5, 3] and not full[3, 5]  # clean stream is causal
    assert not full[:L, L:].any()  # clean never sees noised tokens
    row = L + 9  # noised token in block 2 (positions 8..11)
    assert full[row, :8].all() and not full[row, 8:L].any()
    assert full[row, L + 8 : L + 12].all() and not full[row, L : L + 8].any()
    assert sliding[row, 6:8].all() and not sliding[row, :6].any()  # last W-1 = 2 prefix tokens
    assert sliding[5, 3] and not sliding[5, 2]  # clean sliding: j > i - W


def test_corrupt_levels():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 128, dtype=torch.long)
    y = corrupt(x, canvas=32, vocab=1000, high_frac=1.0, g=g)
    assert (y != x).float().mean() > 0.75  # all blocks at noise >= 0.8 (a replacement may redraw 0 rarely)


def micro_corpus(root: Path) -> Path:
    lines = load_corpus_lines(CORPUS)
    corpus = root / "corpus"
    corpus.mkdir()
    with gzip.open(corpus / "train.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[4:24]))
    (corpus / "val.txt").write_text("\n".join(lines[:2]), encoding="utf-8")
    return corpus


def micro_config(corpus: Path, out: Path, **overrides) -> TrainConfig:
    tc = TrainConfig(
        corpus=str(corpus),
        out=str(out),
        vocab_size=320,
        hidden_size=48,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=2,
        top_k_experts=1,
        num_layers=2,
        num_heads=2,
        head_dim=24,
        kv_heads=1,
        global_head_dim=24,
        global_kv_heads=1,
        sliding_window=16,
        canvas_length=8,
        seq_len=32,
        batch_size=8,
        steps=60,
        lr=1e-2,
        warmup=5,
        eval_every=60,
        eval_batches=2,
        ckpt_every=30,
        threads=0,
    )
    return TrainConfig(**{**tc.__dict__, **overrides})


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    trainer = Trainer(micro_config(micro_corpus(root), root / "run"))
    trainer.train()
    return trainer


def test_micro_training_beats_unigram(micro_run):
    first = micro_run.history["train"][0][1]
    val = micro_run.history["val"][-1][1]
    assert micro_run.history["train"][-1][1] < first - 1.0
    assert val["noise_0.25"] < val["unigram"] - 1.0, val  # well below the context-free baseline


def test_micro_checkpoint_loads_and_generates(micro_run):
    pipe = Pipeline.load(Path(micro_run.tc.out) / "model", device="cpu")
    assert pipe.model.config.canvas_length == 8 and pipe.tokenizer is not None
    a = pipe.generate("In the", seed=3, max_new_tokens=16)
    b = pipe.generate("In the", seed=3, max_new_tokens=16)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0
    assert isinstance(a.text, str)


def test_resume_continues_from_checkpoint(micro_run):
    tc = micro_run.tc
    resumed = Trainer(TrainConfig(**{**tc.__dict__, "steps": 62}))
    assert resumed.step == 60
    resumed.train()
    assert resumed.step == 62


def test_warm_start_from_exported_checkpoint(micro_run, tmp_path):
    tc = micro_run.tc
    warm = Trainer(
        TrainConfig(**{**tc.__dict__, "out": str(tmp_path / "warm"), "init_from": str(Path(tc.out) / "model")})
    )
    assert warm.step == 0
    exported = load_model(Path(tc.out) / "model", dtype=torch.float32)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(warm.model.state_dict()[name], tensor), name


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
    """2 steps, a fresh process-like restart from train_state.pt, 2 more steps == 4 steps: bit-identical weights."""
    corpus = micro_corpus(tmp_path)
    budget = {"tokens": 4 * 8 * 32, "warmup": 2, "eval_every": 3, "ckpt_every": 1000, "ckpt_every_min": 0.0}
    whole = Trainer(micro_config(corpus, tmp_path / "whole", **budget))
    whole.train()
    first = Trainer(micro_config(corpus, tmp_path / "split", **budget, time_limit_min=60.0))
    first.train(max_steps=2)  # an interruption: saves, the schedule does not move
    assert first.step == 2
    second = Trainer(micro_config(corpus, tmp_path / "split", **budget))
    assert second.step == 2 and second.tokens_seen == 2 * 8 * 32
    second.train()
    assert whole.step == second.step == 4
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor), name
    assert json.loads(json.dumps(whole.history)) == json.loads(
        json.dumps(second.history)
    )  # same losses and evals, step by step
    assert whole.rng.getstate() == second.rng.getstate()


def test_schedule_is_a_function_of_tokens_only(tmp_path):
    """Warm-up then cosine to min_lr_ratio at the token budget; a time limit does not move it."""
    corpus = micro_corpus(tmp_path)
    batch = 8 * 32
    plain = Trainer(micro_config(corpus, tmp_path / "a", tokens=100 * batch, warmup=10, lr=1e-2, min_lr_ratio=0.1))
    timed = Trainer(
        micro_config(
            corpus, tmp_path / "b", tokens=100 * batch, warmup=10, lr=1e-2, min_lr_ratio=0.1, time_limit_min=0.01
        )
    )
    for t in (0, 5 * batch, 10 * batch, 50 * batch, 100 * batch):
        assert plain.lr_at(t) == timed.lr_at(t)
    assert plain.lr_at(0) == pytest.approx(1e-3) and plain.lr_at(9 * batch) == pytest.approx(1e-2)
    assert plain.lr_at(100 * batch) == pytest.approx(1e-3) and plain.lr_at(50 * batch) == pytest.approx(5.5e-3)
