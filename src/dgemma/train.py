"""Train a small DiffusionGemma-architecture model on a text corpus (the bundled model is made with this).

Objective, matching how the sampler uses the model (spec d.1): the clean sequence runs in causal encoder mode, each
canvas-sized block is corrupted by uniform-noise replacement at its own random level (no mask token), and the
decoder predicts the clean token at every canvas position. All blocks train in one forward pass with a block
attention mask (BD3-LM, Arriola et al. 2025): a clean causal stream followed by the noised blocks, each of which sees
the clean prefix before it (sliding layers: only its last W-1 tokens, as at inference) and its own block.
Self-conditioning is trained on half of the steps by feeding the detached, temperature-scaled output of a first pass.

Resumable by construction: the learning rate is a function of the tokens seen (warm-up, then cosine to the --tokens
budget), batches are drawn from a saved RNG, and `train_state.pt` (weights, optimizer, tokens, both RNGs) is replaced
atomically every few minutes and on SIGTERM/SIGINT or --time-limit-min. So a run stopped and restarted any number of
times with the same command computes the same weights as one uninterrupted run.

Not here: sampling, evaluation of generated text (scripts/eval_bundled.py), or anything the loader does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .bpe import BOS_ID, EOS_ID, PAD_ID, load_corpus_lines, train_bpe
from .config import GenerationSettings, ModelConfig
from .model import DiffusionGemma, rms_norm
from .train_config import TrainConfig

log = logging.getLogger(__name__)


def model_config(tc: TrainConfig) -> ModelConfig:
    """A DiffusionGemma config with sliding and full layers (full every third layer, last forced full)."""
    layer_types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(tc.num_layers)]
    text = {
        "vocab_size": tc.vocab_size,
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "moe_intermediate_size": tc.moe_intermediate_size,
        "num_experts": tc.num_experts,
        "top_k_experts": tc.top_k_experts,
        "num_hidden_layers": tc.num_layers,
        "num_attention_heads": tc.num_heads,
        "num_key_value_heads": tc.kv_heads,
        "head_dim": tc.head_dim,
        "global_head_dim": tc.global_head_dim,
        "num_global_key_value_heads": tc.global_kv_heads,
        "layer_types": layer_types,
        "sliding_window": tc.sliding_window,
        "max_position_embeddings": 4096,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
    }
    return ModelConfig.from_dict(
        {
            "model_type": "diffusion_gemma",
            "canvas_length": tc.canvas_length,
            "text_config": text,
            "eos_token_id": [EOS_ID],
        }
    )


def init_weights(model: DiffusionGemma, seed: int) -> None:
    """Normal(0, 0.02) projections and embedding, residual outputs scaled down by depth; norms stay at 1."""
    g = torch.Generator().manual_seed(seed)
    depth_scale = 1 / math.sqrt(2 * len(model.layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.02 * (depth_scale if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else 1)
                p.copy_(torch.randn(p.shape, generator=g) * std)


def block_masks(n_layers_types: list[str], seq_len: int, canvas: int, window: int) -> dict[str, torch.Tensor]:
    """Allowed-attention masks [1, 1, 2L, 2L] for [clean stream ; noised blocks], per layer type."""
    i = torch.arange(seq_len)
    q, k = i[:, None], i[None, :]
    bq, bk = q // canvas, k // canvas
    out = {}
    for layer_type in set(n_layers_types):
        sliding = layer_type == "sliding_attention"
        clean_clean = (k <= q) & ((k > q - window) if sliding else True)
        prefix_end = bq * canvas  # noised block b sees clean tokens [.., b*C)
        noisy_clean = (k < prefix_end) & ((k >= prefix_end - (window - 1)) if sliding else True)
        noisy_noisy = bk == bq
        top = torch.cat([clean_clean, torch.zeros_like(clean_clean)], dim=1)
        bottom = torch.cat([noisy_clean, noisy_noisy], dim=1)
        out[layer_type] = torch.cat([top, bottom], dim=0)[None, None]  # [1, 1, 2L, 2L]
    return out


def corrupt(x: torch.Tensor, canvas: int, vocab: int, high_frac: float, g: torch.Generator) -> torch.Tensor:
    """Uniform-noise replacement with one noise level per block (a share of blocks at high noise)."""
    b, n = x.shape
    levels = torch.rand(b, n // canvas, generator=g)
    high = torch.rand(b, n // canvas, generator=g) < high_frac
    levels = torch.where(high, 0.8 + 0.2 * levels, levels).repeat_interleave(canvas, dim=1)  # [B, L]
    replace = torch.rand(b, n, generator=g) < levels
    return torch.where(replace, torch.randint(0, vocab, (b, n), generator=g), x)


class Trainer:
    """Owns model, optimizer, data and the loop; checkpoints to `out/train_state.pt` and resumes from it."""

    def __init__(self, tc: TrainConfig):
        self.tc, self.out = tc, Path(tc.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.folders = [Path(c) for c in tc.corpus.split(",") if c]
        self.tokenizer = self._tokenizer()
        self.train_ids = torch.cat([self._tokens(self._corpus_file(f, "train")) for f in self.folders])
        self.val_ids = self._tokens(self._corpus_file(self.folders[0], "val"))
        self.extra_val = {  # other folders' held-out text: logged beside the reported val, never trained on
            f.name: self._tokens(self._corpus_file(f, "val")) for f in self.folders[1:] if self._has_file(f, "val")
        }
        self.config = model_config(tc)
        self.model = DiffusionGemma(self.config)
        init_weights(self.model, tc.seed)
        resuming = (self.out / "train_state.pt").is_file()
        if tc.init_from and not resuming:
            self._warm_start(Path(tc.init_from))
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr,
            betas=(0.9, 0.95),
        )
        self.masks = block_masks(self.config.text.layer_types, tc.seq_len, tc.canvas_length, tc.sliding_window)
        self.positions = torch.arange(tc.seq_len).repeat(2)[None]  # noised tokens sit at their clean positions
        self.step, self.history, self.tokens_seen, self.elapsed = 0, {"train": [], "val": []}, 0, 0.0
        self.gen = torch.Generator().manual_seed(tc.seed)
        self.rng = random.Random(tc.seed)
        self.stop_requested = False
        self._resume()

    @property
    def budget(self) -> int:
        """Training tokens in all: the schedule's length and the end of the run."""
        return self.tc.tokens or self.tc.steps * self.tc.batch_size * self.tc.seq_len

    # --- data ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _has_file(base: Path, split: str) -> bool:
        return any((base / f"{split}{ext}").is_file() for ext in (".txt", ".txt.gz"))

    @staticmethod
    def _corpus_file(base: Path, split: str) -> Path:
        for name in (f"{split}.txt", f"{split}.txt.gz"):
            if (base / name).is_file():
                return base / name
        raise FileNotFoundError(f"{base} has no {split}.txt or {split}.txt.gz")

    def _tokenizer(self):
        from tokenizers import Tokenizer

        path = self.out / "tokenizer.json"
        if not path.is_file() and self.tc.init_from and (Path(self.tc.init_from) / "tokenizer.json").is_file():
            path.write_bytes((Path(self.tc.init_from) / "tokenizer.json").read_bytes())  # keep the warm start's ids
        if path.is_file():
            return Tokenizer.from_file(str(path))
        lines = [line for f in self.folders for line in load_corpus_lines(self._corpus_file(f, "train"))]
        tok = train_bpe(lines, self.tc.vocab_size)
        tok.save(str(path))
        return tok

    def _tokens(self, path: Path) -> torch.Tensor:
        """Documents as [BOS] text [EOS], concatenated into one stream."""
        ids: list[int] = []
        for enc in self.tokenizer.encode_batch(load_corpus_lines(path), add_special_tokens=False):
            ids += [BOS_ID, *enc.ids, EOS_ID]
        return torch.tensor(ids, dtype=torch.long)

    def batch(self, ids: torch.Tensor, rng: random.Random) -> torch.Tensor:
        n = self.tc.seq_len
        starts = [rng.randrange(0, len(ids) - n) for _ in range(self.tc.batch_size)]
        return torch.stack([ids[s : s + n] for s in starts])  # [B, L]

    # --- model --------------------------------------------------------------------------------------------------
    def denoise_logits(self, clean, noisy, soft=None) -> torch.Tensor:
        """Decoder logits [B, L, V] for every noised position, given the clean stream as prefix."""
        m = self.model
        x_noisy = m.embed(noisy)
        if soft is not None:
            x_noisy = x_noisy + m.self_conditioning(soft)
        x = torch.cat([m.embed(clean), rms_norm(x_noisy, m.text.rms_norm_eps)], dim=1)  # [B, 2L, H]
        allowed = [self.masks[t] for t in m.text.layer_types]
        h = m.forward_masked(x, self.positions, allowed, decoder=True)
        return m.logits(h[:, self.tc.seq_len :])

    def loss(self, clean: torch.Tensor, gen: torch.Generator, self_condition: bool) -> torch.Tensor:
        noisy = corrupt(clean, self.tc.canvas_length, self.tc.vocab_size, self.tc.high_noise_frac, gen)
        soft = None
        if self_condition:
            with torch.no_grad():
                t = 0.4 + 0.4 * torch.rand(1, generator=gen).item()  # the sampler feeds logits / T, T in [0.4, 0.8]
                soft = self.model.soft_embedding(self.denoise_logits(clean, noisy) / t).detach()
        logits = self.denoise_logits(clean, noisy, soft)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), clean.reshape(-1))

    def lr_at(self, tokens_seen: int) -> float:
        """Linear warm-up over `warmup` batches, then cosine to min_lr_ratio at the budget: a function of tokens only."""
        tc = self.tc
        batch = tc.batch_size * tc.seq_len
        if tokens_seen < tc.warmup * batch:
            return tc.lr * (tokens_seen // batch + 1) / tc.warmup
        frac = min(tokens_seen / self.budget, 1.0)
        return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    # --- loop ---------------------------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> None:
        """Train to the budget; stop early (saving, schedule untouched) on the time limit, a signal or `max_steps`."""
        tc = self.tc
        self.model.train()
        started = last_save = window_t = time.time()
        window_tokens, steps_here = 0, 0
        while self.tokens_seen < self.budget:
            t_step = time.time()
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.tokens_seen)
            clean = self.batch(self.train_ids, self.rng)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16):
                loss = self.loss(clean, self.gen, self.rng.random() < tc.sc_prob)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.step += 1
            self.tokens_seen += clean.numel()
            window_tokens += clean.numel()
            self.elapsed += time.time() - t_step
            steps_here += 1
            self.history["train"].append((self.step, loss.item()))
            done = self.tokens_seen >= self.budget
            if self.step % 10 == 0:
                rate = window_tokens / (time.time() - window_t)
                log.info(
                    "step %d tokens %d/%d loss %.4f lr %.2e %.0f tok/s",
                    self.step,
                    self.tokens_seen,
                    self.budget,
                    loss.item(),
                    self.lr_at(self.tokens_seen),
                    rate,
                )
                window_t, window_tokens = time.time(), 0
            if self.step % tc.eval_every == 0 or done:
                self.history["val"].append((self.step, self.evaluate()))
            out_of_time = bool(tc.time_limit_min) and time.time() - started >= tc.time_limit_min * 60
            stop = out_of_time or self.stop_requested or steps_here == max_steps
            ckpt_due = bool(tc.ckpt_every_min) and time.time() - last_save >= tc.ckpt_every_min * 60
            if self.step % tc.ckpt_every == 0 or ckpt_due or done or stop:
                self.save()
                last_save = time.time()
            if stop:
                why = "time limit" if out_of_time else "signal" if self.stop_requested else "max_steps"
                log.info(
                    "stopped (%s) at step %d, %d tokens; rerun the same command to resume",
                    why,
                    self.step,
                    self.tokens_seen,
                )
                return
        log.info("budget reached: step %d, %d tokens", self.step, self.tokens_seen)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out denoising loss at fixed noise levels (no self-conditioning), plus the unigram baseline."""
        self.model.eval()
        out = self.val_losses(self.val_ids)
        out["unigram"] = unigram_loss(self.train_ids, self.val_ids, self.tc.vocab_size)
        for name, ids in self.extra_val.items():
            out.update({f"{name}/{k}": v for k, v in self.val_losses(ids).items()})
        log.info("eval step %d: %s", self.step, json.dumps({k: round(v, 4) for k, v in out.items()}))
        self.model.train()
        return out

    def val_losses(self, ids: torch.Tensor) -> dict:
        rng, gen = random.Random(1234), torch.Generator().manual_seed(1234)
        out = {}
        for level in (0.25, 0.5, 0.75, 1.0):
            losses = []
            for _ in range(self.tc.eval_batches):
                clean = self.batch(ids, rng)
                replace = torch.rand(clean.shape, generator=gen) < level
                noisy = torch.where(replace, torch.randint(0, self.tc.vocab_size, clean.shape, generator=gen), clean)
                logits = self.denoise_logits(clean, noisy)
                losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), clean.reshape(-1)).item())
            out[f"noise_{level}"] = sum(losses) / len(losses)
        return out

    # --- persistence --------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Training state (resumable, tensors only) + an exported checkpoint + the loss curve."""
        state = {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "history": json.dumps(self.history),
            "gen": self.gen.get_state(),
            "rng": json.dumps(self.rng.getstate()),
            "train_tokens": len(self.train_ids),
            "config": json.dumps(dataclasses.asdict(self.tc)),
        }
        tmp = self.out / "train_state.pt.tmp"
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.out / "train_state.pt")  # atomic: a kill leaves the old state or the new one, never half
        self.export(self.out / "model")
        plot_losses(self.history, self.out / "loss.png")
        log.info("saved step %d (%d tokens) to %s", self.step, self.tokens_seen, self.out / "train_state.pt")

    def export(self, path: Path) -> None:
        from .export import save_model

        settings = GenerationSettings(eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID, max_new_tokens=128)
        self.model.eval()
        save_model(self.model, path, settings=settings, tokenizer=self.tokenizer, dtype=torch.float32)
        self.model.train()
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": round(self.elapsed),
            "train_config": dataclasses.asdict(self.tc),
            "val": self.history["val"][-1][1] if self.history["val"] else None,
        }
        (path / "training.json").write_text(json.dumps(meta, indent=2) + "\n")

    def _warm_start(self, model_dir: Path) -> None:
        """Copy the weights of an exported checkpoint (validated by the normal loader) into the fresh model."""
        from .loader import load_model

        source = load_model(model_dir, dtype=torch.float32)
        if source.config != self.config:
            raise ValueError(f"{model_dir} has another architecture than the one requested; pass matching flags")
        self.model.load_state_dict(source.state_dict())
        log.info("initialised from %s", model_dir)

    def _resume(self) -> None:
        path = self.out / "train_state.pt"
        if not path.is_file():
            return
        state = torch.load(path, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        self.history = json.loads(state["history"])
        self.gen.set_state(state["gen"])
        rng_state = json.loads(state["rng"])
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        if state.get("train_tokens", len(self.train_ids)) != len(self.train_ids):
            log.warning(
                "the corpus changed since the checkpoint (%d train tokens, now %d): batches will differ",
                state["train_tokens"],
                len(self.train_ids),
            )
        log.info("resumed from %s at step %d, %d/%d tokens", path, self.step, self.tokens_seen, self.budget)


def unigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab: int) -> float:
    """Cross-entropy of the val tokens under the (add-one smoothed) train unigram distribution."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = torch.log(counts / counts.sum())
    return float(-logp[val_ids].mean())


def plot_losses(history: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional (train extra)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        steps, losses = zip(*history["train"])
        k = max(1, len(losses) // 100)
        smooth = [sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, label="train (smoothed, mixed noise)")
    for key in ("noise_0.25", "noise_0.5", "noise_0.75"):
        pts = [(s, v[key]) for s, v in history["val"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"val {key}")
    if history["val"]:
        ax.axhline(history["val"][-1][1]["unigram"], color="gray", linestyle="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_train(args) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if tc.seq_len % tc.canvas_length:
        raise ValueError(f"--seq-len {tc.seq_len} must be a multiple of --canvas-length {tc.canvas_length}")
    trainer = Trainer(tc)

    def request_stop(signum, _frame):  # finish the step, save, exit: `kill PID` loses no work
        log.info("signal %d: saving after this step", signum)
        trainer.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    trainer.train()
    return 0
