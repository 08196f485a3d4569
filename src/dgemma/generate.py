"""Generation: one `Request` -> canvases -> tokens, as one event stream (spec d.1); infill and inline edit on pins.

- `Request` is the only request type: built once at the boundary (Python API, CLI, server) and carried unchanged to
  `Generation`, the state machine of one request (prefill, denoise steps, settle, commit, next canvas, finish).
- `Layout` pins output positions (fixed tokens, vocabulary limits, a commit-time chooser for structured output);
  `Settle` pins a canvas's settled prefix so streamed text is never retracted. Both become the sampler's `Pins`,
  the one mechanism that decides what a canvas holds besides the model.
- `denoise_step` advances any number of generations with one batched forward, so the single-request
  `stream_generate`, `infill` candidates and the server's engine run the same code.
- `Pipeline` bundles a loaded model, tokenizer and default settings; `stream_generate` is the centre that the CLI,
  the server's text layer and the benchmarks share. Text is made only by `text.TextStream`.

Infill: the prefix goes to the encoder, the suffix is pinned after a gap of L free positions (in a later canvas when
L is long), and several L run side by side in one batch; `choose_infill` keeps the candidate whose fill best
explains the suffix (see its docstring). An edit is an infill of a span with everything around it fixed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .cache import CacheRow, KVCache, PrefixCache, stack_caches
from .chat import ChatParser, Delta
from .config import ConfigError, GenerationSettings
from .infill import (
    EditResult,
    InfillCandidate,
    InfillResult,
    choose_infill,
    drop_moved_space,
    infill_layout,
    infill_lengths,
    line_span,
    move_space,
)
from .loader import TORCH_DTYPES, load_generation_settings, load_model, resolve_model_dir
from .model import INVARIANT_ROWS, DiffusionGemma, flush_subnormals_
from .runtime import tune_allocator
from .sampler import (
    CanvasSampler,
    CanvasScores,
    Layout,
    Pins,
    StepResult,
    block_argmax,
    make_generators,
    score_canvas,
    token_entropy_from,
)
from .structured import structured_layout
from .text import TextStream
from .tokenizer import Tokenizer

BUNDLED_MODEL = Path(__file__).parent / "bundled"
PROBE_DRAWS = 4  # noise draws averaged by the seam probe (one batched forward)
VOCAB_CHUNK_BYTES = 64 << 20  # vocabulary-wide temporaries of a step's scoring (see score_rows)


# --- the request ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settle:
    """Settled-prefix streaming: a canvas position is settled once it and every position before it kept the same
    argmax for `steps` consecutive steps with entropy below `entropy` (nats). Settled tokens are released at once
    and pinned, so the commit keeps them (the reference would commit the last argmax: a deliberate deviation, made
    only for requests that ask for it)."""

    steps: int = 3
    entropy: float = 0.1


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    """Everything one generation needs. `settings.max_new_tokens` is the exact token budget (canvases are rounded
    up, the output never is). `draft`: emit a StepEvent per denoising step."""

    prompt_ids: tuple[int, ...]
    settings: GenerationSettings
    seed: int | None = None
    stop: tuple[str, ...] = ()
    layout: Layout | None = None
    settle: Settle | None = None
    draft: bool = False
    no_first: tuple[int, ...] = ()  # the empty-reply guard's last re-draw bars these ids (and EOS, pad) first

    @property
    def max_tokens(self) -> int:
        return self.settings.max_new_tokens


# --- events -----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepEvent:
    """One denoising step of the current canvas (only for requests with `draft`)."""

    canvas_index: int
    step: int
    draft: list[int]  # argmax canvas with pins (what would be committed now)
    canvas: list[int]  # next model input: accepted samples + fresh noise + pins
    accepted: list[bool]
    entropy: list[float]  # per position, temperature-scaled distribution
    mean_entropy: float  # over free positions
    settled: int = 0  # positions of this canvas already released (settled prefix)
    fixed: list[bool] | None = None  # pinned positions (None: nothing pinned)


@dataclasses.dataclass
class SettleEvent:
    """Tokens of the current canvas released before its commit (settled prefix, pinned from now on)."""

    canvas_index: int
    token_ids: list[int]
    text: str = ""  # set by the text layer
    delta: Delta | None = None  # set by the text layer: content, reasoning and tool calls


@dataclasses.dataclass
class CanvasEvent:
    """A committed canvas: its kept tokens (cut after the first EOS and at the budget)."""

    canvas_index: int
    token_ids: list[int]
    new_ids: list[int]  # those not already released by SettleEvents
    steps: int
    finished: bool
    text: str = ""  # set by the text layer: the text delta this commit released
    delta: Delta | None = None  # set by the text layer: content, reasoning and tool calls


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]  # new tokens (at most max_new_tokens) up to and including the first EOS
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    steps_per_canvas: list[int]
    forward_passes: int
    prefill_s: float
    denoise_s: float
    total_s: float
    seed: int | None
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    empty_redraws: int = 0  # first canvases drawn again by the empty-reply guard
    reasoning: str = ""  # with a chat parser: the thought channel (`text` is then the answer's content)
    tool_calls: list = dataclasses.field(default_factory=list)  # with a chat parser: chat.ToolCall's

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


# --- the state machine ------------------------------------------------------------------------------------------------
class Generation:
    """One request: prefill its prompt into its own cache, then denoise and commit canvases until EOS or budget."""

    def __init__(self, model: DiffusionGemma, request: Request):
        vocab, ids = model.text.vocab_size, request.prompt_ids
        if not ids:
            raise ConfigError("the prompt is empty; give at least one token")
        if bad := [i for i in ids if not 0 <= i < vocab]:
            raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        layout = request.layout
        if layout is not None and any(not 0 <= t < vocab for t in layout.fixed.values()):
            raise ConfigError(f"pinned token ids must be in [0, {vocab})")
        if layout is not None and layout.mask_at and layout.masks.shape[-1] != vocab:
            raise ConfigError(f"vocabulary masks have {layout.masks.shape[-1]} columns; the model has {vocab} tokens")
        self.model, self.request, self.settings = model, request, request.settings
        self.canvas_length = c = model.config.canvas_length
        self.max_canvases = math.ceil(request.max_tokens / c)
        limit = model.text.max_position_embeddings
        if len(ids) + self.max_canvases * c > limit:
            raise ConfigError(
                f"prompt ({len(ids)} tokens) + {self.max_canvases} canvas(es) of {c} exceeds the model's {limit} "
                "positions"
            )
        self.device = model.device
        self.noise_gen, self.sample_gen = make_generators(request.seed, self.device)
        self.cache = model.new_cache()
        self.eos = frozenset(self.settings.eos_token_ids)
        self.token_ids: list[int] = []
        self.steps_per_canvas: list[int] = []
        self.forward_passes = 0
        self.finish_reason: str | None = None
        self.sampler: CanvasSampler | None = None
        self.released: list[int] = []  # tokens of the current canvas already released (settled prefix)
        self.seam_nll: float | None = None  # layout.probe's score
        self.free_entropy: list[float] = []  # per committed canvas: final mean entropy of its free positions
        self.prefill_s = self.denoise_s = 0.0
        self.cached_tokens = 0  # prompt tokens reused from a prefix cache
        self.redraws = 0  # empty-reply guard: first canvases drawn again
        self._runs: list[int] = []
        self._prev: list[int] | None = None

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.request.prompt_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def canvas_index(self) -> int:
        return len(self.steps_per_canvas)

    def prefill(self, prefix: PrefixCache | None = None, progress: Callable[[], None] | None = None) -> None:
        """Encode the prompt into this request's cache. With a prefix cache: reuse its longest stored block-aligned
        prefix, encode the rest block by block (as a cold prefill does, so the result is the same bits; `progress`
        is called after each block) and store the prompt's last full block boundary."""
        t0 = time.perf_counter()
        ids = self.prompt_ids
        if prefix is None:
            self.model.encode(torch.tensor([ids], device=self.device), self.cache)
        else:
            n, cached = prefix.lookup(ids)
            if cached is not None:
                self.cache, self.cached_tokens = cached, n
            block, boundary = prefix.block, len(ids) // prefix.block * prefix.block
            for start in range(n, len(ids), block):
                chunk = ids[start : start + block]
                self.model.encode(torch.tensor([chunk], device=self.device), self.cache)
                if start + len(chunk) == boundary and boundary > n:
                    prefix.store(tuple(ids[:boundary]), self.cache)
                if progress is not None:
                    progress()
        self.prefill_s += time.perf_counter() - t0
        self._new_canvas()

    def _new_canvas(self, pins: Pins | None = None) -> None:
        c, layout = self.canvas_length, self.request.layout
        if pins is None and layout is not None:
            pins = layout.pins(self.canvas_index, c, self.device)
        v = self.model.text.vocab_size
        self.sampler = CanvasSampler(self.settings, c, v, self.noise_gen, self.sample_gen, self.device, pins)
        self.released, self._runs, self._prev = [], [], None
        self.soft = None  # [C, H] self-conditioning input of the next step (None: the canvas's first step)

    def _may_redraw(self) -> bool:
        """The empty-reply guard applies: first canvas, plain request, re-draws left."""
        return self.canvas_index == 0 and self.request.layout is None and self.redraws < self.settings.empty_redraws

    def _redraw(self) -> None:
        """Empty-reply guard: the first canvas committed an EOS at its first position, so it is drawn again with
        fresh generators seeded `redraw_seed(seed, k)` for re-draw k (unseeded requests: fresh random ones); the last
        allowed re-draw also bars the EOS ids (and the pad id) from the first position, so the reply cannot be empty."""
        self.redraws += 1
        seed = self.request.seed
        self.noise_gen, self.sample_gen = make_generators(
            None if seed is None else redraw_seed(seed, self.redraws), self.device
        )
        pins = None
        if self.redraws == self.settings.empty_redraws:
            allowed = torch.ones(1, self.model.text.vocab_size, dtype=torch.bool)
            barred = set(self.eos) | ({self.settings.pad_token_id} - {None}) | set(self.request.no_first)
            allowed[0, [i for i in barred if i < allowed.shape[1]]] = False
            pins = Pins(self.canvas_length, masks=allowed, mask_at={0: 0}, device=self.device)
        self._new_canvas(pins)

    def observe(self, z: torch.Tensor, scores: CanvasScores, pending=None, flags: list[float] | None = None) -> list:
        """Consume this request's temperature-scaled, constrained logits [C, V] and their scores; settle or commit.
        `pending`/`flags`: the step's device half (`sampler.prepare`) and its flags, when the batch read them."""
        if pending is None:
            r = self.sampler.advance(z, scores)
        else:
            r = self.sampler.resolve(pending, flags)
        self.forward_passes += 1
        events: list = []
        settled = []
        if not r.done and self.request.settle is not None:
            settled = self._settle(r)
        if self.request.draft:
            pins = self.sampler.pins
            fixed = pins.fixed.tolist() if pins is not None and pins.count else None
            events.append(
                StepEvent(
                    self.canvas_index,
                    r.step,
                    r.argmax.tolist(),
                    r.canvas.tolist(),
                    r.accepted.tolist(),
                    r.entropy.tolist(),
                    r.mean_entropy,
                    len(self.released),
                    fixed,
                )
            )
        if settled:
            events.append(SettleEvent(self.canvas_index, settled))
        if r.done:
            if self._may_redraw() and r.first_token in self.eos:
                self._redraw()
            else:
                events.append(self._commit(r))
        self.sampler.sc_logits = None  # this step's [C, V] logits are not kept
        return events

    def _settle(self, r: StepResult) -> list[int]:
        """Extend the released prefix with positions that are now settled; pin and return them."""
        rule, pins = self.request.settle, self.sampler.pins
        draft, entropy = r.argmax.tolist(), r.entropy.tolist()
        prev = self._prev or [-1] * len(draft)
        self._runs = [n + 1 if a == b else 1 for n, a, b in zip(self._runs or [0] * len(draft), draft, prev)]
        self._prev = draft
        n = len(self.released)
        if n and self.released[-1] in self.eos:
            return []  # the canvas ends here
        if n == 0 and draft[0] in self.eos and self._may_redraw():
            return []  # an empty reply is not released: the guard may draw this canvas again
        fixed = pins.fixed.tolist() if pins is not None and pins.count else [False] * len(draft)
        layout = self.request.layout
        chosen_later = layout.mask_at if layout is not None and layout.finalize is not None else {}
        start = self.canvas_index * self.canvas_length
        limit = min(len(draft), self.request.max_tokens - len(self.token_ids))
        while n < limit and (start + n) not in chosen_later:
            if not (fixed[n] or (self._runs[n] >= rule.steps and entropy[n] < rule.entropy)):
                break
            n += 1
            if draft[n - 1] in self.eos:
                break
        new = draft[len(self.released) : n]
        if new:
            self.sampler.pin(list(range(len(self.released), n)), new)
            self.released = draft[:n]
        return new

    def _commit(self, r: StepResult) -> CanvasEvent:
        """Keep the argmax canvas (pins applied; cut after the first EOS and at the budget); encode it into the
        cache if generation continues."""
        canvas = r.argmax
        layout, start = self.request.layout, self.canvas_index * self.canvas_length
        if layout is not None and layout.finalize is not None:
            chosen = layout.finalize(start, torch.log_softmax(self.sampler.sc_logits, dim=-1))
            if chosen:
                canvas = canvas.clone()
                idx = torch.tensor([p - start for p in chosen], dtype=torch.long, device=canvas.device)
                canvas[idx] = torch.tensor(list(chosen.values()), dtype=canvas.dtype, device=canvas.device)
        if layout is not None and layout.probe is not None and start <= layout.probe[0] < start + self.canvas_length:
            self.seam_nll = self._probe(canvas, layout.probe[0] - start, layout.probe[1])
        pins = self.sampler.pins
        if pins is None or pins.count < self.canvas_length:  # a wholly pinned canvas has no entropy to report
            self.free_entropy.append(r.mean_entropy)
        tokens = canvas.tolist()
        cut = next((i + 1 for i, t in enumerate(tokens) if t in self.eos), None)
        kept = (tokens if cut is None else tokens[:cut])[: self.request.max_tokens - len(self.token_ids)]
        assert kept[: len(self.released)] == self.released, "a released token changed"
        new = kept[len(self.released) :]
        self.token_ids += kept
        self.steps_per_canvas.append(self.sampler.steps)
        if any(t in self.eos for t in kept):
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.request.max_tokens or self.canvas_index >= self.max_canvases:
            self.finish_reason = "length"
        else:
            t0 = time.perf_counter()
            self.model.encode(canvas[None], self.cache)  # same positions it was denoised at (spec d.1)
            self.prefill_s += time.perf_counter() - t0
            self._new_canvas()
        return CanvasEvent(self.canvas_index - 1, kept, new, self.steps_per_canvas[-1], self.finished)

    def _probe(self, canvas: torch.Tensor, at: int, count: int) -> float:
        """Mean NLL of canvas[at : at + count] when those positions are replaced by uniform noise and the rest of
        the canvas stays: PROBE_DRAWS noise draws in one batched forward, no self-conditioning, its own seeded
        noise. A pinned token's own NLL says nothing (the model copies a clean input), but restoring the first
        suffix tokens from the prefix and the fill measures how well the fill leads into them."""
        hi = min(at + count, canvas.shape[0])
        g = torch.Generator().manual_seed((self.request.seed or 0) + 2)
        x = canvas.repeat(PROBE_DRAWS, 1)  # [D, C]
        x[:, at:hi] = torch.randint(0, self.model.text.vocab_size, (PROBE_DRAWS, hi - at), generator=g).to(x.device)
        logits = self.model.denoise(x, stack_caches([self.cache] * PROBE_DRAWS))[:, at:hi]  # [D, count, V]
        truth = canvas[at:hi].expand(PROBE_DRAWS, -1)
        nll = logits.logsumexp(-1) - logits.gather(-1, truth[..., None])[..., 0]
        self.forward_passes += 1
        return float(nll.mean())


def redraw_seed(seed: int, k: int) -> int:
    """The seed of the empty-reply guard's k-th re-draw of a request seeded `seed` (documented, reproducible)."""
    return (seed + k * 0x9E3779B97F4A7C15) % 2**63


_draw_pool: ThreadPoolExecutor | None = None


def _draw_ahead(
    generations: list[Generation], canvas: int, vocab: int, device: torch.device, inline: bool = False
) -> Future:
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


@torch.no_grad()
def denoise_step(model: DiffusionGemma, generations: list[Generation]) -> list[list]:
    """One batched denoising forward for every unfinished generation; returns each one's events."""
    if model.batch_invariant and len(generations) > 1 and model.config.canvas_length % INVARIANT_ROWS:
        # dense GEMMs see B*C rows: bitwise batch invariance needs C to be a multiple of INVARIANT_ROWS
        return [denoise_step(model, [g])[0] for g in generations]
    t0 = time.perf_counter()
    device = model.device
    dense = [g for g in generations if not g.settings.sparse_sampling]  # fast mode draws later, fewer rows
    row_of = {id(g): i for i, g in enumerate(dense)}
    draws = _draw_ahead(
        dense,
        model.config.canvas_length,
        model.text.vocab_size,
        device,
        inline=device.type == "cpu" and torch.get_num_threads() >= (os.cpu_count() or 1),
    )
    canvases = torch.stack([g.sampler.canvas for g in generations])  # [B, C]
    cache = batch_cache([g.cache for g in generations])
    conditioned = [i for i, g in enumerate(generations) if g.soft is not None]
    soft = None
    if conditioned:  # a canvas's first step gets zeros, as in the reference
        soft = torch.zeros(len(generations), *generations[conditioned[0]].soft.shape, dtype=model.dtype, device=device)
        for i in conditioned:
            soft[i] = generations[i].soft
    try:
        logits = model.denoise(canvases, cache, soft)  # [B, C, V]
    finally:
        uniforms = draws.result()  # never leave a draw running past the step
    elapsed = (time.perf_counter() - t0) / len(generations)
    pending = []
    for b, g in enumerate(generations):
        t1 = time.perf_counter()
        z = logits[b].div_(g.sampler.temperature().to(logits.device))
        g.sampler.constrain(z)  # pins act on the scaled logits before scoring
        u = uniforms[row_of[id(g)]] if id(g) in row_of else None
        scores, g.soft = score_rows(model, g.sampler, z, u)
        pending.append((z, scores, g.sampler.prepare(z, scores)))
        g.denoise_s += elapsed + time.perf_counter() - t1
    flags = torch.stack([p.flags for _, _, p in pending]).tolist()  # the step's one host read, for the whole batch
    return [g.observe(z, scores, p, f) for g, (z, scores, p), f in zip(generations, pending, flags)]


def batch_cache(caches: list) -> KVCache:
    """The caches of a step's requests as one: a view of the static cache's rows [0, B) when the requests are
    exactly those rows in order (the serving engine's batch), else the dynamic caches stacked (a copy)."""
    first = caches[0]
    if isinstance(first, CacheRow) and all(
        isinstance(c, CacheRow) and c.static is first.static and c.slot == i for i, c in enumerate(caches)
    ):
        return first.static.batch(len(caches))
    return stack_caches(caches)


def score_rows(model: DiffusionGemma, sampler: CanvasSampler, z: torch.Tensor, u: torch.Tensor | None):
    """One request's step scores, and the next step's self-conditioning input [C, H], chunked over canvas rows so
    the vocabulary-wide temporaries (probabilities, the race, -log u) stay at VOCAB_CHUNK_BYTES, whatever the
    batch: the [B, C, V] buffers of a step are the logits and the uniforms only. Every operation is row-wise (and
    the chunk a multiple of INVARIANT_ROWS rows for the GEMM), so the bits are those of one pass over the canvas.

    Fast mode: `sc_top_k` builds the self-conditioning input from each position's top-k probabilities
    (`model.soft_embedding_top_k`); `sparse_sampling` (u is None) draws and samples only the positions the
    acceptance rule keeps, after the entropies are known (`sample_accepted`)."""
    c, v = z.shape
    settings = sampler.settings
    rows = max(INVARIANT_ROWS, VOCAB_CHUNK_BYTES // (4 * v) // INVARIANT_ROWS * INVARIANT_ROWS)
    parts, soft = [], []
    for start in range(0, c, rows):
        zr = z[start : start + rows]
        if u is None:
            probs = flush_subnormals_(torch.softmax(zr, dim=-1))
            sc = CanvasScores(None, block_argmax(zr), token_entropy_from(zr, probs), probs)
        else:
            ur = u[start : start + rows]
            sc = score_canvas(zr, ur)  # leaves -log u in ur
            if sampler.adjusts_sample:  # temperature 0 or top_p
                sc = sampler.adjust(sc, ur)
        if model.dtype == torch.float32:  # the sampler's softmax(z) is what the reference's self-conditioning uses
            probs = sc.probs
        else:  # the reference casts the logits first
            probs = torch.softmax(zr.to(model.dtype), dim=-1, dtype=torch.float32)
        if settings.sc_top_k:
            soft.append(model.soft_embedding_top_k(probs[None], settings.sc_top_k)[0])
        else:
            soft.append(model.soft_embedding_from_probs(probs[None])[0])
        parts.append(sc)
    argmax, entropy = (torch.cat([getattr(p, f) for p in parts]) for f in ("argmax", "entropy"))
    sampled = sampler.sample_accepted(z, entropy, argmax) if u is None else torch.cat([p.sampled for p in parts])
    return CanvasScores(sampled, argmax, entropy, None), torch.cat(soft)


def run_batch(
    model: DiffusionGemma, generations: list[Generation], prefix: PrefixCache | None = None
) -> Iterator[tuple[Generation, list]]:
    """Prefill and denoise several generations together until all finish, yielding (generation, events)."""
    for g in generations:
        g.prefill(prefix)
    while live := [g for g in generations if not g.finished]:
        for g, events in zip(live, denoise_step(model, live)):
            yield g, events


# --- infill and edit ----------------------------------------------------------------------------------------------
# --- the pipeline ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Pipeline:
    """A loaded checkpoint: model, tokenizer (may be None), default generation settings."""

    model: DiffusionGemma
    tokenizer: Tokenizer | None
    settings: GenerationSettings
    model_dir: Path

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        offline: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Pipeline:
        model_dir = resolve_model_dir(model_dir or BUNDLED_MODEL, offline)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cpu":
            tune_allocator()
        if isinstance(dtype, str):
            if dtype not in TORCH_DTYPES:
                raise ConfigError(f"dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
            dtype = TORCH_DTYPES[dtype]
        model = load_model(model_dir, dtype=dtype, device=device, progress=progress)
        tokenizer = Tokenizer.from_dir(model_dir)
        settings = load_generation_settings(model_dir)  # EOS ids only from here, as the reference does
        if tokenizer is not None and tokenizer.vocab_size > model.text.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.text.vocab_size}")
        return cls(model, tokenizer, settings, model_dir)

    @property
    def canvas_length(self) -> int:
        return self.model.config.canvas_length

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ConfigError(f"{self.model_dir} has no tokenizer.json; pass prompt token ids instead")
        return self.tokenizer

    def prompt_ids(
        self,
        prompt: str | None = None,
        prompt_ids: list[int] | None = None,
        chat: bool = False,
        messages: list[dict] | None = None,
        tools: list[dict] | None = None,
        **template_kwargs,
    ) -> list[int]:
        """Token ids for a text prompt (with BOS), a chat (checkpoint template, with `tools` and template flags such
        as `enable_thinking`), or ids used exactly as given."""
        if prompt_ids is not None:
            return list(prompt_ids)
        tok = self._need_tokenizer()
        if messages is not None or chat:
            messages = messages or [{"role": "user", "content": prompt or ""}]
            return tok.apply_chat_template(messages, tools=tools, **template_kwargs)
        return tok.encode(prompt or "", add_bos=True)

    def request(
        self,
        prompt: str | None = None,
        *,
        prompt_ids: list[int] | None = None,
        chat: bool = False,
        messages: list[dict] | None = None,
        seed: int | None = None,
        stop: list[str] | tuple = (),
        layout: Layout | None = None,
        settle: Settle | None = None,
        draft: bool = False,
        response_format: dict | None = None,
        **knobs,
    ) -> Request:
        """A Request from a prompt (text, ids or messages) and per-call knobs (GenerationSettings field names).
        `response_format`: OpenAI's {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}; the
        budget becomes the template's length (a smaller max_new_tokens is an error)."""
        settings = self.settings.override(**knobs)
        ids = self.prompt_ids(prompt, prompt_ids, chat, messages)
        if seed is None and settings.temperature == 0:
            seed = 0  # temperature 0 promises the same answer every time: the renoise draws must repeat too
        if (
            structured := structured_layout(
                response_format,
                self._need_tokenizer() if response_format else None,
                self.canvas_length,
                self.model.text.vocab_size,
                settings,
            )
        ) is not None:
            if layout is not None or stop:
                raise ConfigError("response_format cannot be combined with a layout or stop strings")
            layout, budget = structured
            if knobs.get("max_new_tokens") is not None and knobs["max_new_tokens"] < budget:
                raise ConfigError(f"max_new_tokens={knobs['max_new_tokens']} is too small: the schema needs {budget}")
            settings = settings.override(max_new_tokens=budget)
        return Request(tuple(ids), settings, seed, tuple(stop), layout, settle, draft, self.invisible_ids())

    def stream_generate(
        self,
        prompt: str | None = None,
        *,
        request: Request | None = None,
        prefix_cache: PrefixCache | None = None,
        parser=None,
        **kwargs,
    ) -> Iterator[StepEvent | SettleEvent | CanvasEvent | GenerationResult]:
        """Yield a StepEvent per denoising step, SettleEvents (with `settle`), a CanvasEvent per committed canvas
        (text deltas on both), then the GenerationResult. `request` or the arguments of `Pipeline.request`.
        `prefix_cache`: reuse and keep prompt caches (multi-turn chat). `parser`: a `text.OutputParser` (e.g.
        `chat.ChatParser`); the events' `delta` then carries content, reasoning and tool calls apart."""
        if request is not None and (prompt is not None or kwargs):
            raise ConfigError("give either a request or the arguments to build one, not both")
        request = request or self.request(prompt, draft=True, **kwargs)
        gen = Generation(self.model, request)
        eos = request.settings.eos_token_ids
        text = TextStream(self.tokenizer, request.stop, request.max_tokens, eos, parser)
        t0 = time.perf_counter()
        for _, events in run_batch(self.model, [gen], prefix_cache):
            for event in events:
                if isinstance(event, SettleEvent):
                    event.delta = text.push_delta(event.token_ids)
                    event.text = event.delta.content
                elif isinstance(event, CanvasEvent):
                    event.delta = text.push_delta(event.new_ids, gen.finish_reason if event.finished else None)
                    event.text = event.delta.content
                yield event
            if text.finished:
                break  # a stop string: no more canvases
        yield GenerationResult(
            list(request.prompt_ids),
            gen.token_ids,
            text.text,
            text.finish_reason or gen.finish_reason,
            gen.steps_per_canvas,
            gen.forward_passes,
            gen.prefill_s,
            gen.denoise_s,
            time.perf_counter() - t0,
            request.seed,
            gen.cached_tokens,
            gen.redraws,
            text.reasoning,
            text.tool_calls,
        )

    def generate(self, prompt: str | None = None, *, request: Request | None = None, **kwargs) -> GenerationResult:
        """Drain `stream_generate` and return its result (without per-step draft events unless `draft=True`)."""
        if request is None:
            request = self.request(prompt, **kwargs)
        elif prompt is not None or kwargs:
            raise ConfigError("give either a request or the arguments to build one, not both")
        for event in self.stream_generate(request=request):
            pass
        return event

    def chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        tool_choice: str | None = None,
        enable_thinking: bool = False,
        prefix_cache: PrefixCache | None = None,
        seed: int | None = None,
        **knobs,
    ) -> GenerationResult:
        """One assistant turn: the checkpoint's template over `messages` (with `tools` and thinking), generated and
        split into `text` (the answer), `reasoning` and `tool_calls`. `tool_choice`: None/"auto", or "required" /
        a function name to force a call (pinned: it always parses). `prefix_cache` carries prompt KV across turns."""
        ids = self.prompt_ids(messages=messages, tools=tools, enable_thinking=enable_thinking)
        settings = self.settings.override(**knobs)
        layout = None
        if tool_choice not in (None, "auto"):
            from .structured import tool_call_layout

            if not tools:
                raise ConfigError("tool_choice needs tools")
            name = None if tool_choice == "required" else tool_choice
            if name is not None and name not in {t["function"]["name"] for t in tools}:
                raise ConfigError(f"tool_choice {name!r} is not among the tools")
            layout, budget = tool_call_layout(
                tools, name, self._need_tokenizer(), self.canvas_length, self.model.text.vocab_size, settings
            )
            settings = settings.override(max_new_tokens=max(budget, settings.max_new_tokens))
        if seed is None and settings.temperature == 0:
            seed = 0
        request = Request(tuple(ids), settings, seed, layout=layout, no_first=self.invisible_ids())
        for event in self.stream_generate(request=request, prefix_cache=prefix_cache, parser=ChatParser(bool(tools))):
            pass
        return event

    def invisible_ids(self) -> tuple[int, ...]:
        """Control tokens the text layer drops (all special ids but the chat parser's markers): a reply that
        starts with one looks empty, so the empty-reply guard bars them from the first position."""
        if self.tokenizer is None:
            return ()
        markers = {self.tokenizer.id_of(m) for m in ChatParser.markers}
        return tuple(sorted(self.tokenizer.special_ids - markers))

    # --- infill and edit ----------------------------------------------------------------------------------------
    def banned_in_fill(self) -> torch.Tensor:
        """[V] bool: EOS ids and the tokenizer's control tokens, which a fill position may not take."""
        banned = torch.zeros(self.model.text.vocab_size, dtype=torch.bool)
        ids = set(self.settings.eos_token_ids) | (self.tokenizer.special_ids if self.tokenizer else set())
        banned[[i for i in ids if i < banned.numel()]] = True
        return banned

    def infill_requests(
        self,
        prompt_ids: list[int],
        suffix_ids: list[int],
        lengths: list[int],
        seed: int | None,
        eos_after_suffix: bool = True,
        **knobs,
    ) -> list[Request]:
        """One Request per candidate gap length (same seed: they differ only in where the suffix sits)."""
        settings = self.settings.override(**knobs)
        eos = settings.eos_token_ids[0] if eos_after_suffix and settings.eos_token_ids else None
        banned = self.banned_in_fill()
        out = []
        for n in lengths:
            layout, budget = infill_layout(n, suffix_ids, self.canvas_length, eos, banned, settings.pad_token_id)
            out.append(Request(tuple(prompt_ids), settings.override(max_new_tokens=budget), seed, layout=layout))
        return out

    def infill(
        self,
        prefix: str | None = None,
        suffix: str | None = None,
        *,
        prefix_ids: list[int] | None = None,
        suffix_ids: list[int] | None = None,
        lengths: list[int] | None = None,
        max_fill: int | None = None,
        seed: int | None = None,
        eos_after_suffix: bool = True,
        **knobs,
    ) -> InfillResult:
        """Fill the gap between a prefix (text with BOS, or ids as given) and a suffix; candidate gap `lengths`
        (default `infill_lengths`) run in one batch and `choose_infill` picks one."""
        prefix, moved = move_space(prefix or "") if prefix_ids is None else (None, False)
        prompt = self.prompt_ids(prefix, prefix_ids)
        if suffix_ids is None:
            suffix_ids = self._need_tokenizer().encode(suffix or "", parse_special=False)
        lengths = sorted(set(infill_lengths(self.canvas_length, max_fill) if lengths is None else lengths))
        if not lengths or min(lengths) < 1:
            raise ConfigError(f"infill lengths must be >= 1, got {lengths}")
        requests = self.infill_requests(prompt, list(suffix_ids), lengths, seed, eos_after_suffix, **knobs)
        t0 = time.perf_counter()
        gens = [Generation(self.model, r) for r in requests]
        for _ in run_batch(self.model, gens):
            pass
        cands = InfillCandidate.of(lengths, gens)
        best = choose_infill(cands)
        texts = [drop_moved_space(self.decode(c.fill), moved) for c in cands]
        table = [
            {"length": c.length, "score": c.score, "seam_nll": c.seam_nll, "entropy": c.entropy, "text": t}
            for c, t in zip(cands, texts)
        ]
        fill = cands[best].fill
        passes = sum(g.forward_passes for g in gens)
        return InfillResult(texts[best], fill, cands[best].length, table, passes, time.perf_counter() - t0, seed)

    def edit(
        self,
        text: str,
        start: int | None = None,
        end: int | None = None,
        *,
        lines: tuple[int, int] | None = None,
        context: str = "",
        lengths: list[int] | None = None,
        max_fill: int | None = None,
        seed: int | None = None,
        **knobs,
    ) -> EditResult:
        """Rewrite text[start:end] (character offsets) or `lines` (first, last: 1-based, inclusive) with everything
        else fixed: the text before it (after `context`, e.g. the prompt that produced it) is the prefix, the text
        after it is pinned; the new span's length is chosen among candidates around the old span's token length."""
        if lines is not None:
            if start is not None or end is not None:
                raise ConfigError("give either lines or start/end")
            start, end = line_span(text, *lines)
        if start is None or end is None or not 0 <= start <= end <= len(text):
            raise ConfigError(f"the span [{start}, {end}) is not inside the text (0..{len(text)})")
        tok = self._need_tokenizer()
        old = len(tok.encode(text[start:end], parse_special=False))
        if lengths is None:
            lengths = infill_lengths(self.canvas_length, max_fill, hint=old or None)
        result = self.infill(context + text[:start], text[end:], lengths=lengths, seed=seed, **knobs)
        return EditResult(text[:start] + result.text + text[end:], result.text, start, end, result)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(map(str, ids))
