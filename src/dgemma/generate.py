"""Generation: prompt -> canvases -> text, as one event stream (spec d.1).

`Generation` is the state machine of one request (prefill, denoise steps, commit, next canvas, finish); `denoise_step`
advances any number of them with one shared batched forward pass, so the single-request `stream_generate` and the
server's batching engine run the same code. `Pipeline` bundles a loaded model, tokenizer and default settings.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .cache import stack_caches
from .config import ConfigError, GenerationSettings
from .loader import TORCH_DTYPES, load_generation_settings, load_model, resolve_model_dir
from .model import INVARIANT_ROWS, DiffusionGemma
from .runtime import tune_allocator
from .sampler import CanvasSampler, CanvasScores, make_generators, score_canvas
from .tokenizer import Tokenizer

BUNDLED_MODEL = Path(__file__).parent / "bundled"


@dataclasses.dataclass
class StepEvent:
    """One denoising step of the current canvas."""

    canvas_index: int
    step: int
    draft: list[int]  # argmax canvas (what the text would be if committed now)
    canvas: list[int]  # next model input: accepted samples + fresh noise
    accepted: list[bool]
    entropy: list[float]  # per position, temperature-scaled distribution
    mean_entropy: float


@dataclasses.dataclass
class CanvasEvent:
    """A committed canvas: its kept tokens (cut after the first EOS) and the newly settled text."""

    canvas_index: int
    token_ids: list[int]
    text: str  # text delta since the previous CanvasEvent
    steps: int
    finished: bool


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]  # new tokens up to and including the first EOS (all when none)
    text: str
    finish_reason: str  # "stop" (EOS) or "length"
    steps_per_canvas: list[int]
    forward_passes: int
    prefill_s: float
    denoise_s: float
    total_s: float
    seed: int | None

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(self.forward_passes, 1)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / max(self.total_s, 1e-9)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(tokens_per_forward=self.tokens_per_forward, tokens_per_s=self.tokens_per_s)
        return d


class Generation:
    """One request: prefill its prompt into its own cache, then denoise and commit canvases until EOS or length."""

    def __init__(self, model: DiffusionGemma, prompt_ids: list[int], settings: GenerationSettings,
                 seed: int | None = None):  # fmt: skip
        vocab = model.text.vocab_size
        if not prompt_ids:
            raise ConfigError("the prompt is empty; give at least one token")
        if bad := [i for i in prompt_ids if not 0 <= i < vocab]:
            raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        self.model, self.settings, self.seed = model, settings, seed
        self.prompt_ids = list(prompt_ids)
        self.canvas_length = model.config.canvas_length
        self.max_canvases = math.ceil(settings.max_new_tokens / self.canvas_length)
        limit = model.text.max_position_embeddings
        if len(prompt_ids) + self.max_canvases * self.canvas_length > limit:
            raise ConfigError(
                f"prompt ({len(prompt_ids)} tokens) + {self.max_canvases} canvas(es) of {self.canvas_length} "
                f"exceeds the model's {limit} positions"
            )
        self.device = model.embed_tokens.weight.device
        self.noise_gen, self.sample_gen = make_generators(seed, self.device)
        self.cache = model.new_cache()
        self.token_ids: list[int] = []
        self.steps_per_canvas: list[int] = []
        self.forward_passes = 0
        self.finish_reason: str | None = None
        self.sampler: CanvasSampler | None = None
        self.prefill_s = self.denoise_s = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def prefill(self) -> None:
        t0 = time.perf_counter()
        self.model.encode(torch.tensor([self.prompt_ids], device=self.device), self.cache)
        self.prefill_s += time.perf_counter() - t0
        self._new_canvas()

    def _new_canvas(self) -> None:
        v = self.model.text.vocab_size
        self.sampler = CanvasSampler(self.settings, self.canvas_length, v, self.noise_gen, self.sample_gen, self.device)

    def sc_probs(self) -> torch.Tensor | None:
        """Self-conditioning probabilities [C, V] (fp32) for the next step; None on a canvas's first step."""
        sc = self.sampler.sc_logits
        if sc is None:
            return None
        if self.model.dtype == torch.float32:  # the sampler's softmax(z) is exactly what the reference computes
            return self.sampler.sc_probs
        return torch.softmax(sc.to(self.model.dtype), dim=-1, dtype=torch.float32)  # reference: logits cast first

    def observe(self, z: torch.Tensor, scores: CanvasScores) -> list[StepEvent | CanvasEvent]:
        """Consume this request's temperature-scaled logits [C, V] and their scores; commit when done."""
        r = self.sampler.advance(z, scores)
        self.forward_passes += 1
        events: list = [StepEvent(
            len(self.steps_per_canvas), r.step, r.argmax.tolist(), r.canvas.tolist(), r.accepted.tolist(),
            r.entropy.tolist(), r.mean_entropy,
        )]  # fmt: skip
        if r.done:
            events.append(self._commit(r.argmax))
        return events

    def _commit(self, argmax: torch.Tensor) -> CanvasEvent:
        """Keep the argmax canvas (cut after the first EOS); encode it into the cache if generation continues."""
        tokens = argmax.tolist()
        eos = set(self.settings.eos_token_ids)
        cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), None)
        kept = tokens if cut is None else tokens[:cut]
        self.token_ids += kept
        self.steps_per_canvas.append(self.sampler.steps)
        if cut is not None:
            self.finish_reason = "stop"
        elif len(self.steps_per_canvas) >= self.max_canvases:
            self.finish_reason = "length"
        else:
            t0 = time.perf_counter()
            self.model.encode(argmax[None], self.cache)  # same positions it was denoised at (spec d.1)
            self.prefill_s += time.perf_counter() - t0
            self._new_canvas()
        return CanvasEvent(len(self.steps_per_canvas) - 1, kept, "", self.sampler.steps, self.finished)


_draw_pool: ThreadPoolExecutor | None = None


def _draw_ahead(generations: list[Generation], canvas: int, vocab: int, device: torch.device,
                inline: bool = False) -> Future:  # fmt: skip
    """Take this step's sampling draws [B, C, V] on a side thread (torch.rand is serial, ~0.7 ms per [32, 4096]
    canvas on CPU, and releases the GIL), overlapping them with the forward pass. Same generators, same order:
    same numbers. Seeded requests draw on the CPU (the protocol) and are copied to `device`. `inline`: draw now,
    on this thread (when torch's threads already take every core, a side thread only slows their barriers:
    measured 0.92x the speed of drawing inline with 2 threads on 2 cores)."""
    global _draw_pool
    if _draw_pool is None and not inline:
        _draw_pool = ThreadPoolExecutor(1, thread_name_prefix="dgemma-draw")

    def draw() -> torch.Tensor:
        u = torch.empty(len(generations), canvas, vocab, device=device)
        for g, row in zip(generations, u):
            if g.sample_gen.device == row.device:
                g.sampler.draw(out=row)
            else:
                row.copy_(g.sampler.draw())
        return u

    if inline:
        done: Future = Future()
        done.set_result(draw())
        return done
    return _draw_pool.submit(draw)


def denoise_step(model: DiffusionGemma, generations: list[Generation]) -> list[list]:
    """One batched denoising forward for every unfinished generation; returns each one's events."""
    if model.batch_invariant and len(generations) > 1 and model.config.canvas_length % INVARIANT_ROWS:
        # dense GEMMs see B*C rows: bitwise batch invariance needs C to be a multiple of INVARIANT_ROWS
        return [denoise_step(model, [g])[0] for g in generations]
    t0 = time.perf_counter()
    device = model.embed_tokens.weight.device
    draws = _draw_ahead(generations, model.config.canvas_length, model.text.vocab_size, device,
                        inline=device.type == "cpu" and torch.get_num_threads() >= (os.cpu_count() or 1))  # fmt: skip
    canvases = torch.stack([g.sampler.canvas for g in generations])  # [B, C]
    cache = stack_caches([g.cache for g in generations])
    probs = [g.sc_probs() for g in generations]
    conditioned = [i for i, p in enumerate(probs) if p is not None]
    soft = None
    if conditioned:  # one GEMM for every conditioned row; a canvas's first step gets zeros, as in the reference
        embedded = model.soft_embedding_from_probs(torch.stack([probs[i] for i in conditioned]))
        if len(conditioned) == len(generations):
            soft = embedded
        else:
            soft = embedded.new_zeros(len(generations), *embedded.shape[1:])
            soft[conditioned] = embedded  # [B, C, H]
    try:
        logits = model.denoise(canvases, cache, soft)  # [B, C, V]
    finally:
        uniforms = draws.result()  # never leave a draw running past the step
    # every request's temperature at once, then one scoring pass for the batch: fewer, larger kernels, and each
    # row is computed exactly as it would be alone
    temperatures = torch.stack([g.sampler.temperature() for g in generations]).to(logits.device)
    z = logits.div_(temperatures[:, None, None])
    scores = score_canvas(z, uniforms)
    elapsed = (time.perf_counter() - t0) / len(generations)
    out = []
    for b, g in enumerate(generations):
        g.denoise_s += elapsed
        out.append(g.observe(z[b], scores.row(b)))
    return out


class TextStream:
    """Incremental detokenizer: emits only text that can no longer change (no split UTF-8 sequences)."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer, self.sent = tokenizer, ""

    def push(self, token_ids: list[int], final: bool) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(token_ids)
        if not final:
            text = text.rstrip("\ufffd")  # a multi-byte character may be completed by the next canvas
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


@dataclasses.dataclass
class Pipeline:
    """A loaded checkpoint: model, tokenizer (may be None), default generation settings."""

    model: DiffusionGemma
    tokenizer: Tokenizer | None
    settings: GenerationSettings
    model_dir: Path

    @classmethod
    def load(cls, model_dir: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
             device: str | None = None, allow_download: bool = False) -> Pipeline:  # fmt: skip
        model_dir = resolve_model_dir(model_dir or BUNDLED_MODEL, allow_download)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cpu":
            tune_allocator()
        if isinstance(dtype, str):
            if dtype not in TORCH_DTYPES:
                raise ConfigError(f"dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
            dtype = TORCH_DTYPES[dtype]
        model = load_model(model_dir, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_dir(model_dir)
        settings = load_generation_settings(model_dir)  # EOS ids only from here, as the reference does
        if tokenizer is not None and tokenizer.vocab_size > model.text.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.text.vocab_size}")
        return cls(model, tokenizer, settings, model_dir)

    def prompt_ids(self, prompt: str | None = None, prompt_ids: list[int] | None = None, chat: bool = False,
                   messages: list[dict] | None = None) -> list[int]:  # fmt: skip
        """Token ids for a text prompt (with BOS), a chat (checkpoint template), or ids used exactly as given."""
        if prompt_ids is not None:
            return list(prompt_ids)
        if self.tokenizer is None:
            raise ConfigError(f"{self.model_dir} has no tokenizer.json; pass prompt token ids instead")
        if messages is not None or chat:
            return self.tokenizer.apply_chat_template(messages or [{"role": "user", "content": prompt or ""}])
        return self.tokenizer.encode(prompt or "", add_bos=True)

    def stream_generate(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None, chat: bool = False,
                        messages: list[dict] | None = None, seed: int | None = None,
                        **knobs) -> Iterator[StepEvent | CanvasEvent | GenerationResult]:  # fmt: skip
        """Yield a StepEvent per denoising step, a CanvasEvent per committed canvas, then the GenerationResult."""
        settings = self.settings.override(**knobs)
        ids = self.prompt_ids(prompt, prompt_ids, chat, messages)
        gen = Generation(self.model, ids, settings, seed)
        t0 = time.perf_counter()
        gen.prefill()
        text = TextStream(self.tokenizer)
        while not gen.finished:
            for event in denoise_step(self.model, [gen])[0]:
                if isinstance(event, CanvasEvent):
                    event.text = text.push(gen.token_ids, gen.finished)
                yield event
        yield GenerationResult(
            ids, gen.token_ids, text.sent, gen.finish_reason, gen.steps_per_canvas, gen.forward_passes,
            gen.prefill_s, gen.denoise_s, time.perf_counter() - t0, seed,
        )  # fmt: skip

    def generate(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        """Drain `stream_generate` and return its result."""
        for event in self.stream_generate(prompt, **kwargs):
            pass
        return event
