"""Entropy-bounded denoising of one canvas (spec section d.1), model-agnostic and text-free.

`CanvasSampler` holds one request's canvas state and turns each step's logits [C, V] into the next canvas, the
accepted mask and the stop decision. The schedule, acceptance and stop rules are small pure functions. Randomness
follows dgemma's seeded protocol: canvas init and renoise draw `randint(0, V, (1, C))` from `noise_gen`; sampling
draws `u = rand((C, V))` from `sample_gen` (Gumbel-max), per step sampling first, then renoise. Generators are
per request, so results never depend on what else shares a batch.

Per step the vocabulary-wide work is done once by `score_canvas` (fast path: one softmax, one log of u);
`token_entropy` + `gumbel_sample` + `argmax` are its slow, literal twin (tests/test_sampler.py compares them).

Pins (`Pins`, addressed by output position through `Layout`) are the one mechanism that fixes canvas content: a pinned position always holds its token in the model
input, in every draft and in the committed canvas, and is never renoised; other positions may be limited to a
vocabulary subset. Both act on the temperature-scaled logits before scoring (`Pins.constrain`): a pinned row becomes
one-hot at its token (entropy 0, so its self-conditioning input says "certain"), a limited row gets -inf outside its
set. Pinned positions are kept out of the acceptance budget and out of the stop rule's mean entropy: they are
context, not predictions, and counting their zero entropy would make a mostly pinned canvas look confident before
its free positions are. Without pins nothing here changes, so seeded outputs stay equal to the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping

import torch

from .config import GenerationSettings
from .model import flush_subnormals_

# The least temperature a step divides by. Below it softmax is already the argmax (a logit gap of 1e-5 gives the
# runner-up e^-10); nearer 0 the division overflows float32 (1e-38 underflows to 0) and every score is NaN.
MIN_TEMPERATURE = 1e-6


@functools.lru_cache(maxsize=4096)
def temperature(remaining: int, total: int, t_min: float, t_max: float) -> torch.Tensor:
    """Linear schedule indexed by steps *remaining* (N at the first step, 1 at the last), float32 like the reference.
    Cached (a few tensor ops per request per step otherwise); callers must not modify the result in place."""
    frac = torch.tensor(remaining, dtype=torch.int32) / total
    return t_min + (t_max - t_min) * frac


def token_entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) per position, [.., C, V] -> [.., C], computed as the reference Categorical does."""
    logp = z - z.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(logp, dim=-1)
    return -(logp.clamp(min=torch.finfo(logp.dtype).min) * p).sum(-1)


def entropy_bound_mask(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept the k lowest-entropy positions whose strictly-lower entropies sum to <= bound (always >= 1)."""
    sorted_h, order = torch.sort(entropy, dim=-1)
    keep_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def gumbel_sample(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One categorical sample per row of z via Gumbel-max with uniforms u (same shape)."""
    return torch.argmax(torch.log_softmax(z, dim=-1) - torch.log(-torch.log(u.clamp_min(1e-20))), dim=-1)


@dataclasses.dataclass
class CanvasScores:
    """Everything a step needs from the temperature-scaled logits z [C, V]."""

    sampled: torch.Tensor  # [C] Gumbel-max sample (the protocol's draw)
    argmax: torch.Tensor  # [C]
    entropy: torch.Tensor  # [C]
    probs: torch.Tensor  # [C, V] softmax(z) in fp32, reused for self-conditioning

    def row(self, b: int) -> CanvasScores:
        """Request b's scores when z was a batch [B, C, V] (every field is computed row by row, so a row equals
        what scoring that request alone gives)."""
        return CanvasScores(self.sampled[b], self.argmax[b], self.entropy[b], self.probs[b])


def score_canvas(z: torch.Tensor, u: torch.Tensor) -> CanvasScores:
    """Fast twin of (`gumbel_sample`, `argmax`, `token_entropy`), one softmax and one log per entry:
    - the sample uses the exponential-race form of Gumbel-max, argmax(log p - log(-log u)) = argmax(p / -log u);
    - the entropy uses log p = (z - max z) + log p_max, so no log-softmax pass is needed;
    - argmaxes go through `block_argmax`.
    `torch.exp` is avoided on purpose: on CPU it takes a slow path for the underflowing entries a peaked softmax has
    (10-20x slower); the softmax kernel does not. Subnormal probabilities are flushed to 0 (`flush_subnormals_`).
    `u` is consumed (overwritten)."""
    # Logits more than 87 below the row's max are clamped there: exp underflows below -87.3, and the softmax kernel's
    # subnormal path is 2x slower. Their probabilities (< 2^-125 after normalising) are then zeroed with the
    # subnormals, so no probability, entropy, sample or argmax changes; -inf logits keep probability 0 and give
    # 0 * finite in the entropy, not NaN.
    shifted = (z - z.amax(-1, keepdim=True)).clamp_(min=-87.0)
    probs = flush_subnormals_(torch.softmax(shifted, dim=-1), below=2.0**-125)
    entropy = _entropy(shifted, probs)
    race = probs / u.clamp_min_(1e-20).log_().neg_()
    return CanvasScores(block_argmax(race), block_argmax(z), entropy, probs)


def _entropy(shifted: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p with log p = (z - max z) + log p_max (`shifted` is consumed)."""
    log_p_max = probs.amax(-1).log_()
    return -(shifted.mul_(probs).sum(-1) + log_p_max * probs.sum(-1))


def token_entropy_from(z: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The entropies `score_canvas` computes, from z and its (flushed) softmax."""
    return _entropy((z - z.amax(-1, keepdim=True)).clamp_(min=-87.0), probs)


def block_argmax(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """torch.argmax over the last dim (first index of the maximum, NaN counting as maximum) in two passes: the
    first block whose max is the row's max, then the argmax inside it. ~2x faster on CPU, where argmax is scalar
    code and amax is vectorised."""
    *lead, v = x.shape
    if v % block or v < 2 * block:
        return torch.argmax(x, dim=-1)
    blocks = x.reshape(*lead, v // block, block)
    first = torch.argmax(blocks.amax(-1), dim=-1, keepdim=True)  # [.., 1]
    inside = torch.take_along_dim(blocks, first[..., None], dim=-2).squeeze(-2)  # [.., block]
    return (first * block + torch.argmax(inside, dim=-1, keepdim=True)).squeeze(-1)


def nucleus_sample(probs: torch.Tensor, exp_noise: torch.Tensor, top_p: float) -> torch.Tensor:
    """The exponential-race sample [C] restricted to each row's nucleus: the fewest most probable tokens whose
    probabilities sum to >= top_p (the first always kept). `exp_noise` = -log u, as `score_canvas` leaves it, so
    the draw uses the same uniforms as the unrestricted sample."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [C, V]
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    nucleus = torch.zeros_like(keep).scatter_(-1, order, keep)
    return block_argmax(probs.masked_fill(~nucleus, 0.0) / exp_noise)


def nucleus_sample_slow(z: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """Slow twin of `nucleus_sample`: renormalise the nucleus and Gumbel-sample it with the uniforms u."""
    probs = torch.softmax(z, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (sorted_p.cumsum(-1) - sorted_p) < top_p)
    return gumbel_sample(z.masked_fill(~keep, -math.inf), u)


def score_canvas_slow(z: torch.Tensor, u: torch.Tensor) -> CanvasScores:
    """Slow twin of `score_canvas`: the protocol's formulas written out literally."""
    probs = torch.softmax(z, dim=-1)
    return CanvasScores(gumbel_sample(z, u), torch.argmax(z, dim=-1), token_entropy(z), probs)


def is_stable(history: list[torch.Tensor], argmax: torch.Tensor, threshold: int) -> bool:
    """True when the last `threshold` argmax canvases all equal this one (history starts empty = never stable)."""
    if threshold == 0:
        return True
    return len(history) >= threshold and all(torch.equal(h, argmax) for h in history[-threshold:])


def make_generators(seed: int | None, device: str | torch.device = "cpu") -> tuple[torch.Generator, torch.Generator]:
    """(noise_gen, sample_gen): seeded S and S+1 on the CPU (the protocol: the same numbers on every machine), or
    fresh entropy on `device` (unseeded requests promise no reproducibility, so an accelerator draws its own
    [C, V] uniforms instead of the CPU making and copying them every step)."""
    if seed is not None:
        return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    device = torch.device(device)
    fresh = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(torch.seed())))
    return torch.Generator(device).manual_seed(fresh), torch.Generator(device).manual_seed(fresh + 1)


class Pins:
    """Fixed tokens and vocabulary limits of one canvas: `fixed` [C] bool with `tokens` [C] (read where fixed);
    `masks` [M, V] bool rows of allowed tokens with `mask_at` {position: row}. Counts are kept as Python ints so
    that no step has to ask the device whether anything is pinned."""

    def __init__(
        self,
        canvas_length: int,
        fixed: dict[int, int] | None = None,
        masks: torch.Tensor | None = None,
        mask_at: dict[int, int] | None = None,
        device="cpu",
    ):
        device = torch.device(device)
        self.fixed = torch.zeros(canvas_length, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(canvas_length, dtype=torch.long, device=device)
        self.count = 0
        self.blocked: torch.Tensor | None = None  # [M, V] bool: tokens a limited position may not take
        self.runs: list[tuple[int, int, int]] = []  # (start, stop, row): consecutive positions sharing a limit
        if mask_at:
            assert masks is not None and masks.dtype == torch.bool
            self.blocked = (~masks).to(device)
            for p in sorted(mask_at):
                start, stop, row = self.runs[-1] if self.runs else (-1, -1, -1)
                if p == stop and mask_at[p] == row:
                    self.runs[-1] = (start, p + 1, row)
                else:
                    self.runs.append((p, p + 1, mask_at[p]))
        if fixed:
            self.pin(list(fixed), list(fixed.values()))

    def pin(self, positions: list[int], tokens: list[int]) -> None:
        """Fix more positions (settled streaming pins the prefix it has sent)."""
        idx = torch.tensor(positions, dtype=torch.long, device=self.fixed.device)
        self.fixed[idx] = True
        self.tokens[idx] = torch.tensor(tokens, dtype=torch.long, device=self.fixed.device)
        self.count = int(self.fixed.sum())
        self._fixed_idx = self.fixed.nonzero()[:, 0]

    def apply(self, canvas: torch.Tensor) -> torch.Tensor:
        """The canvas [C] with pinned positions holding their tokens (a pin is the last writer)."""
        return torch.where(self.fixed, self.tokens, canvas) if self.count else canvas

    def constrain(self, z: torch.Tensor) -> None:
        """Limit the temperature-scaled logits z [C, V] in place."""
        for start, stop, row in self.runs:  # in place on row slices: no [L, V] temporaries at a 262k vocabulary
            z[start:stop].masked_fill_(self.blocked[row], -math.inf)
        if self.count:
            idx = self._fixed_idx
            z[idx] = -math.inf
            z[idx, self.tokens[idx]] = 0.0  # one-hot: entropy 0, argmax and sample = the pinned token


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Pins by output position (0 = the first new token; position p lives in canvas p // C at slot p % C).
    `fixed`: position -> token id. `masks` [M, V] bool with `mask_at`: position -> row (allowed tokens).
    `finalize(start, logprobs [C, V]) -> {position: token}`: chooses the tokens of a canvas at commit (structured
    output picks a grammar-valid path); the settled prefix never passes a position it may change (`mask_at`).
    `probe` (position, count): at the commit of the canvas holding `position`, renoise `count` positions from there
    and score how well the model restores them (`generate.Generation.seam_nll`, infill scoring)."""

    fixed: Mapping[int, int] = dataclasses.field(default_factory=dict)
    masks: torch.Tensor | None = None
    mask_at: Mapping[int, int] = dataclasses.field(default_factory=dict)
    finalize: Callable[[int, torch.Tensor], dict[int, int]] | None = None
    probe: tuple[int, int] | None = None

    def pins(self, canvas_index: int, canvas_length: int, device) -> Pins | None:
        lo, hi = canvas_index * canvas_length, (canvas_index + 1) * canvas_length
        fixed = {p - lo: t for p, t in self.fixed.items() if lo <= p < hi}
        mask_at = {p - lo: m for p, m in self.mask_at.items() if lo <= p < hi}
        if not fixed and not mask_at:
            return None
        return Pins(canvas_length, fixed, self.masks, mask_at, device=device)


@dataclasses.dataclass
class StepResult:
    """What one denoising step did to a canvas."""

    step: int  # 1-based step index within the canvas
    canvas: torch.Tensor  # [C] next model input (accepted samples + fresh noise)
    argmax: torch.Tensor  # [C] current answer candidate
    accepted: torch.Tensor  # [C] bool
    entropy: torch.Tensor  # [C] per-position entropy of the temperature-scaled distribution
    mean_entropy: float  # over the free (unpinned) positions
    done: bool  # stable and confident, or out of steps
    first_token: int | None = None  # argmax[0], read with the flags (the empty-reply guard needs it)


class CanvasSampler:
    """State of one canvas being denoised: current input, self-conditioning logits and argmax history."""

    def __init__(
        self,
        settings: GenerationSettings,
        canvas_length: int,
        vocab_size: int,
        noise_gen: torch.Generator,
        sample_gen: torch.Generator,
        device="cpu",
        pins: Pins | None = None,
    ):
        self.settings, self.vocab, self.device = settings, vocab_size, torch.device(device)
        self.noise_gen, self.sample_gen = noise_gen, sample_gen
        self.pins = pins
        self.canvas = self._noise(canvas_length)  # [C] (the init draw is always made, pinned or not)
        if pins is not None:
            self.canvas = pins.apply(self.canvas)
        self.sc_logits: torch.Tensor | None = None  # [C, V] temperature-scaled logits of the previous step
        self.history: list[torch.Tensor] = []
        self.steps = 0
        self.last: StepResult | None = None

    def _noise(self, length: int) -> torch.Tensor:
        g = self.noise_gen
        return torch.randint(0, self.vocab, (1, length), generator=g, device=g.device)[0].to(self.device)

    def draw(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """This step's sampling uniforms u [C, V] on the generator's device (into `out` if given). Logits never
        influence it, so it may run ahead of `step` (the batching code draws on a side thread while the model
        runs)."""
        g = self.sample_gen
        return torch.rand((self.canvas.shape[0], self.vocab), generator=g, device=g.device, out=out)

    def temperature(self) -> torch.Tensor:
        """This step's temperature (0-dim float32): the logits are divided by it before scoring. The request's
        `temperature` scales the schedule (1: the reference; 0 keeps the schedule for acceptance and stopping and
        takes the argmax as the sample, see `adjust`)."""
        s = self.settings
        t = temperature(s.steps - self.steps, s.steps, s.t_min, s.t_max)
        t = t if s.temperature in (0, 1) else t * s.temperature
        return t if t >= MIN_TEMPERATURE else t.clamp(min=MIN_TEMPERATURE)

    @property
    def adjusts_sample(self) -> bool:
        return self.settings.temperature == 0 or self.settings.top_p < 1

    def adjust(self, scores: CanvasScores, exp_noise: torch.Tensor) -> CanvasScores:
        """This request's sample under temperature 0 (the argmax: nothing random is kept but the renoise) or
        top_p < 1 (`nucleus_sample`); acceptance, stopping and self-conditioning still see the full distribution."""
        if self.settings.temperature == 0:
            return dataclasses.replace(scores, sampled=scores.argmax)
        return dataclasses.replace(scores, sampled=nucleus_sample(scores.probs, exp_noise, self.settings.top_p))

    def pin(self, positions: list[int], tokens: list[int]) -> None:
        """Fix more positions from now on, the next model input included."""
        if self.pins is None:
            self.pins = Pins(self.canvas.shape[0], device=self.device)
        self.pins.pin(positions, tokens)
        self.canvas = self.pins.apply(self.canvas)

    def constrain(self, z: torch.Tensor) -> None:
        """Apply this canvas's pins to its temperature-scaled logits z [C, V] in place, before scoring."""
        if self.pins is not None:
            self.pins.constrain(z)

    def step(self, logits: torch.Tensor, u: torch.Tensor | None = None) -> StepResult:
        """Consume this step's raw logits [C, V] (fp32, soft-capped) and advance the canvas; `u`: this step's
        `draw()` when it was taken ahead. (Batches score all rows at once and call `advance` per request.)"""
        z = logits / self.temperature().to(logits.device)
        u = (self.draw() if u is None else u).to(z.device)  # sampling draw first
        self.constrain(z)
        scores = score_canvas(z, u)  # leaves -log u in u
        return self.advance(z, self.adjust(scores, u) if self.adjusts_sample else scores)

    def accepted(self, entropy: torch.Tensor) -> torch.Tensor:
        """The acceptance rule: [C] bool, pinned positions never (they are not predictions)."""
        pins = self.pins
        if pins is None or not pins.count:
            return entropy_bound_mask(entropy, self.settings.entropy_bound)
        return entropy_bound_mask(entropy.masked_fill(pins.fixed, math.inf), self.settings.entropy_bound) & ~pins.fixed

    def sample_accepted(self, z: torch.Tensor, entropy: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
        """Fast mode (`sparse_sampling`): the sample [C] at the positions `accepted` keeps, drawn with uniforms for
        those rows only (rand((n, V)) from the sampling generator: not the exact protocol's numbers); the argmax
        elsewhere (renoised anyway). Temperature 0 and top_p act as in `adjust`."""
        rows = self.accepted(entropy).nonzero()[:, 0]
        sampled = argmax.clone()
        if self.settings.temperature == 0 or not len(rows):
            return sampled
        g = self.sample_gen
        u = torch.rand((len(rows), z.shape[-1]), generator=g, device=g.device).to(z.device)
        probs = flush_subnormals_(torch.softmax(z[rows], dim=-1))
        noise = u.clamp_min_(1e-20).log_().neg_()
        if self.settings.top_p < 1:
            sampled[rows] = nucleus_sample(probs, noise, self.settings.top_p)
        else:
            sampled[rows] = block_argmax(probs / noise)
        return sampled

    def advance(self, z: torch.Tensor, scores: CanvasScores) -> StepResult:
        """Accept, renoise and decide to stop, given this step's temperature-scaled (and `constrain`ed) logits
        z [C, V] and their `score_canvas`: `prepare` then `resolve` (one host read of this request's flags)."""
        pending = self.prepare(z, scores)
        return self.resolve(pending, pending.flags.tolist())

    def prepare(self, z: torch.Tensor, scores: CanvasScores) -> PendingStep:
        """The device half of a step: acceptance, the renoise, the argmax history, and the stop rule's inputs as
        one small tensor `flags` [stable, confident, mean entropy, first argmax], so a batch reads every request's
        flags from the device at once (`generate.denoise_step`)."""
        s = self.settings
        remaining = s.steps - self.steps
        self.steps += 1
        argmax, entropy = scores.argmax, scores.entropy
        pins = self.pins
        accepted = self.accepted(entropy)
        if pins is None or not pins.count:
            self.canvas = torch.where(accepted, scores.sampled, self._noise(z.shape[-2]))  # then the renoise draw
            mean = entropy.mean()
        else:
            free = ~pins.fixed
            self.canvas = pins.apply(torch.where(accepted, scores.sampled, self._noise(z.shape[-2])))
            argmax = pins.apply(argmax)
            mean = torch.where(free, entropy, 0.0).sum() / max(free.numel() - pins.count, 1)
        k = s.stability_threshold
        if k == 0:
            stable = torch.ones((), dtype=torch.bool, device=argmax.device)
        elif len(self.history) < k:
            stable = torch.zeros((), dtype=torch.bool, device=argmax.device)
        else:  # the last k argmax canvases all equal this one, decided on the device
            stable = torch.stack([(h == argmax).all() for h in self.history[-k:]]).all()
        self.history = (self.history + [argmax])[-max(k, 1) :]
        confident = mean < s.confidence_threshold  # compared in float32, as the reference does
        self.sc_logits = z  # a commit's structured-output chooser reads them
        flags = torch.stack([stable.float(), confident.float(), mean.float(), argmax[0].float()])
        return PendingStep(self.steps, argmax, accepted, entropy, remaining == 1, flags)

    def resolve(self, pending: PendingStep, flags: list[float]) -> StepResult:
        """The host half: the stop decision from the flags read back."""
        stable, confident, mean = bool(flags[0]), bool(flags[1]), flags[2]
        done = (stable and confident) or pending.last
        self.last = StepResult(pending.step, self.canvas, pending.argmax, pending.accepted, pending.entropy, mean, done)
        self.last.first_token = int(flags[3])
        return self.last


@dataclasses.dataclass
class PendingStep:
    """A step whose stop decision waits for its flags from the device."""

    step: int
    argmax: torch.Tensor
    accepted: torch.Tensor
    entropy: torch.Tensor
    last: bool  # out of steps: done whatever the flags say
    flags: torch.Tensor  # [stable, confident, mean entropy, argmax[0]] (float32, on the device)
