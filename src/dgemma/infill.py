"""Infill and inline edit on the pin mechanism: where the suffix goes, which gap lengths to try, how to choose.

The prefix goes to the encoder; the suffix is pinned after a gap of L free positions (`infill_layout`: in a later
canvas when L is long, followed by EOS and padding when it ends the text); several L (`infill_lengths`) run side by
side in one batch, and `choose_infill` keeps the candidate whose fill best leads into the suffix (the seam probe of
`generate.Generation._probe`). An edit is an infill of a span with everything around it fixed; `line_span` and
`parse_range` turn line ranges into character spans. Text-level helpers only: no model runs here.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .config import ConfigError
from .sampler import Layout

SEAM_TOKENS = 8  # suffix tokens right after the gap that score an infill candidate


@dataclasses.dataclass
class InfillCandidate:
    """One tried gap length and what its generation left (from a Generation, or the server's Finished)."""

    length: int
    token_ids: list[int]
    seam_nll: float | None  # Generation.seam_nll (None: nothing after the gap)
    free_entropy: list[float]

    @classmethod
    def of(cls, lengths: list[int], results: list) -> list[InfillCandidate]:
        """Candidates from finished generations: a Generation or an engine Finished (both carry token_ids,
        seam_nll and free_entropy)."""
        return [cls(n, r.token_ids, r.seam_nll, r.free_entropy) for n, r in zip(lengths, results)]

    @property
    def fill(self) -> list[int]:
        return self.token_ids[: self.length]

    @property
    def entropy(self) -> float:
        """Mean final entropy of the free positions (the gap: the rest is pinned) over the canvases the gap spans."""
        return sum(self.free_entropy) / max(len(self.free_entropy), 1)

    @property
    def score(self) -> float:
        return (self.seam_nll or 0.0) + self.entropy


def infill_lengths(canvas_length: int, max_fill: int | None = None, hint: int | None = None) -> list[int]:
    """Candidate gap lengths in tokens: around `hint` (an edit's original span: x0.5 ... x2 and +-1), or every length
    from 1 to 8 and then steps of x sqrt(2) up to `max_fill` (default: one canvas): 12 candidates for a canvas of
    32, 18 for 256. Gaps of a canvas or more put the suffix in a later canvas, which the first cannot see."""
    if hint:
        near = [round(hint * f) for f in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)] + [hint - 1, hint + 1]
        return sorted({min(max(n, 1), max_fill or 2 * hint) for n in near})
    top = max(1, max_fill or canvas_length)
    out, n = set(range(1, min(8, top) + 1)), 8.0
    while n < top:
        n *= math.sqrt(2)
        out.add(min(round(n), top))
    return sorted(out)


def infill_layout(
    length: int,
    suffix_ids: list[int],
    canvas_length: int,
    eos_id: int | None,
    banned: torch.Tensor | None,
    pad_id: int | None = None,
) -> tuple[Layout, int]:
    """(layout, budget) for a gap of `length` free positions then the suffix. The suffix is pinned from there to the
    end of the canvas that holds its first `canvas_length` tokens (a long suffix fills that canvas's tail, the rest
    is left out). A suffix that fits whole, with room after it, is followed by `eos_id` (the text ends there) and the
    rest of that canvas by `pad_id` (or EOS): training canvases end that way, and no step is spent denoising
    positions nobody reads. `banned` [V] bool: tokens a gap position may not take (EOS and control tokens)."""
    c = canvas_length
    end = math.ceil((length + max(min(len(suffix_ids), c), eos_id is not None)) / c) * c
    tail = list(suffix_ids[: end - length])
    fixed = {length + i: t for i, t in enumerate(tail)}
    budget = length + len(tail)
    if eos_id is not None and len(tail) == len(suffix_ids) and budget < end:
        fixed[budget] = eos_id
        fixed.update(dict.fromkeys(range(budget + 1, end), eos_id if pad_id is None else pad_id))
        budget += 1
    masks = mask_at = None
    if banned is not None and length:
        masks, mask_at = (~banned)[None], dict.fromkeys(range(length), 0)
    probe = (length, min(SEAM_TOKENS, budget - length)) if budget > length else None
    return Layout(fixed, masks, mask_at or {}, probe=probe), budget


def move_space(prefix: str) -> tuple[str, bool]:
    """Word-piece vocabularies carry the space before a word in the word's token (" light"), so a prefix that ends
    in a single space is cut before it and the fill may start with it: (prefix, whether the fill's leading space is
    dropped). Runs of spaces (indentation) stay where they are; at the very start of a text a fill starts with no
    space either."""
    if prefix.endswith(" ") and not prefix.endswith("  "):
        return prefix[:-1], True
    return prefix, prefix == ""


def drop_moved_space(fill: str, moved: bool) -> str:
    """The fill as the user's text sees it: the space `move_space` took from the prefix is not repeated."""
    return fill[1:] if moved and fill.startswith(" ") else fill


def parse_range(text: str, what: str) -> tuple[int, int]:
    """'A-B' or 'A' (ASCII digits) -> (A, B)."""
    first, sep, last = text.strip().partition("-")
    if not all(x.isascii() and x.isdigit() for x in (first, last if sep else first)):
        raise ConfigError(f"{what} must look like 10-12 (non-negative integers), got {text!r}")
    return int(first), int(last if sep else first)


def line_span(text: str, first: int, last: int) -> tuple[int, int]:
    """Character span [start, end) of lines first..last (1-based, inclusive, split at \\n as editors do; a \\r\\n
    ending counts as one); the last line's ending stays out of the span."""
    lines = text.split("\n")
    if lines[-1] == "" and len(lines) > 1:
        lines.pop()  # a final newline ends the last line; it does not start another
    if not 1 <= first <= last <= len(lines):
        raise ConfigError(f"lines must be within 1-{len(lines)} and ascending, got {first}-{last}")
    start = sum(len(x) + 1 for x in lines[: first - 1])
    end = sum(len(x) + 1 for x in lines[: last - 1]) + len(lines[last - 1].removesuffix("\r"))
    return start, end


def choose_infill(candidates: list[InfillCandidate]) -> int:
    """Index of the candidate to keep: the lowest score = seam NLL (`Generation._probe`: how well the model restores
    the first SEAM_TOKENS suffix tokens from the prefix and this fill, i.e. does the fill lead into the suffix?) +
    mean final entropy of the free positions (did the fill converge?). Both are per-token means, so no length wins
    by having more positions. Ties: the shorter fill."""
    return min(range(len(candidates)), key=lambda i: (candidates[i].score, candidates[i].length))


@dataclasses.dataclass
class InfillResult:
    text: str  # the fill only
    token_ids: list[int]  # the fill's tokens
    length: int  # chosen gap length
    candidates: list[dict]  # every tried length: length, score, seam_nll, entropy, text
    forward_passes: int
    total_s: float
    seed: int | None

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / max(self.total_s, 1e-9)


@dataclasses.dataclass
class EditResult:
    text: str  # the whole edited text
    replacement: str  # what replaced text[start:end]
    start: int
    end: int
    infill: InfillResult
