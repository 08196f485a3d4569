"""Structured output: compile an OpenAI `response_format` into a JSON template the diffusion engine fills.

A template pins the JSON skeleton (braces, keys, colons, commas, padding whitespace, the final EOS) to fixed output
positions and leaves every scalar value a *slot*: a run of positions inside one canvas whose tokens must spell a
word of a byte-level DFA (a JSON string, number, literal, enum, ... with optional surrounding whitespace, which is
how a fixed-size slot holds a shorter value). Each slot position gets an allowed-vocabulary mask (tokens that lie on
some accepted path of exactly the slot's length), so denoising stays on grammar; positions are sampled
independently, though, so the guarantee comes from `JsonTemplate.finalize`: at commit it returns, per slot, the
most probable token path the DFA accepts (Viterbi over positions x states).

Everything per-token is vectorized: token bytes are read once per tokenizer, each DFA is lifted to tokens by walking
all (state, token) pairs a byte column at a time, and tokens with identical transition columns are merged into
classes so masks, viability and the DP run on [S, K] tables instead of [S, V].

Value constraints are compiled into the DFA, never checked after the fact: integer bounds become a digit-by-digit
range automaton (intersected with a remainder automaton for multipleOf), bounded numbers become fixed-point decimals
inside the bounds (no exponent, at most NUMBER_FRACTION_DIGITS fraction digits, endpoints moved to the doubles that
`json.loads` can round to, so a parsed value never lands on the wrong side), formats are exact byte grammars (a date is
a real calendar date), and minLength/maxLength multiply the string DFA by a character counter. The counter is not
materialised per token class: the lifted DFA keeps (next state, characters completed) per class, and the slot's
masks and Viterbi pass run on the (state, count) graph with classes grouped into moves (`_counted_plan`,
`_counted_viterbi`; `_expand_counter` is their slow twin).

Deliberately not here: calling the model, sampling, or any schema keyword whose output we could not guarantee to
validate -- those raise `UnsupportedSchema` naming the keyword and its place (the server answers 400).
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
import functools
import json
import math
import re
import threading
import urllib.parse
import weakref

import numpy as np
import torch

from .config import ConfigError, GenerationSettings
from .sampler import Layout

# Slot sizes in tokens (a slot may be shrunk to fit one canvas). Literals get their own tokenization + 1.
STRING_TOKENS, INTEGER_TOKENS, NUMBER_TOKENS = 16, 6, 8
JSON_OBJECT_TOKENS = 256  # the free object of {"type": "json_object"}, capped at one canvas minus the EOS
MAX_TOKEN_BYTES = 64  # longer tokens are simply never allowed in a slot
MAX_POSITIONS = 4096  # template length cap (all canvases together)
MAX_DEPTH = 32
MAX_SCHEMA_NODES = 4 * MAX_POSITIONS  # more JSON values than this cannot fit a MAX_POSITIONS template: refused unread
MAX_ENUM_VALUES, MAX_ENUM_BYTES = 256, 4096
MAX_LENGTH, MAX_MIN_LENGTH = 256, 64  # string length caps: a larger maxLength is lowered to this (still valid)
NUMBER_FRACTION_DIGITS = 6  # bounded numbers are fixed-point decimals with at most this many fraction digits
MAX_INT_DIGITS = 30  # integer bounds beyond 10**30 in magnitude are refused (the range DFA grows with the square)
MAX_NUMBER_DIGITS = 15  # bounded numbers (and integers under a float multipleOf) stay below 10**15
MAX_PRODUCT_STATES = 2048  # multipleOf: the range x remainder automaton may not grow past this
FORMATS = ("date", "date-time", "email", "ipv4", "uuid")
_FLOOR = -1e9  # stands in for -inf/NaN log-probs inside the mask: such tokens lose to any finite one, yet stay usable

SUPPORTED_FEATURES = [
    (
        'response_format {"type": "text"} (no template), {"type": "json_object"} (a flat object of string keys and '
        'scalar values, one canvas long) and {"type": "json_schema", "json_schema": {"schema": ...}}'
    ),
    "type: object, array, string, integer, number, boolean, null; a list of scalar types (e.g. ['string', 'null'])",
    (
        "properties (all emitted, in schema order), required, additionalProperties and unevaluatedProperties (any value; "
        "only declared properties are emitted), minProperties/maxProperties (optional properties are dropped to fit)"
    ),
    "items (one schema), minItems/maxItems (fixed item count), uniqueItems when the count is at most 1",
    "enum and const of any JSON values (filtered by a sibling type; a single value is pinned like the skeleton)",
    (
        "integer minimum/maximum/exclusiveMinimum/exclusiveMaximum (numeric form; the draft-4 boolean form under a "
        "draft-04/03 $schema), exact for any range with bounds below 10**30; multipleOf a positive integer (exact; "
        "under a float multipleOf such as 5.0 values stay below 10**15; the automaton below MAX_PRODUCT_STATES states)"
    ),
    (
        "number bounds: fixed-point decimals inside the bounds (no exponent, up to NUMBER_FRACTION_DIGITS fraction "
        "digits, magnitudes below 10**15); number multipleOf a positive integer (integer values are emitted)"
    ),
    (
        "string minLength (up to MAX_MIN_LENGTH) and maxLength (a larger one is lowered to MAX_LENGTH), counted in code "
        "points with an escape as one character"
    ),
    (
        "string format: date (real calendar dates, leap years included), date-time (RFC 3339: T, seconds 00-59, up to 6 "
        "fraction digits, Z or +HH:MM), email (dotted local@domain), ipv4 (no leading zeros), uuid (8-4-4-4-12 hex); "
        "with minLength/maxLength only when the lengths admit every such value or none"
    ),
    "nested objects and arrays; $ref to local JSON pointers such as #/$defs/... and #/definitions/... (not recursive)",
    (
        "anyOf/oneOf/allOf with a single branch; anyOf of scalar branches (one slot accepting any branch); anyOf with an "
        "object/array branch (the first such branch is emitted)"
    ),
    "empty schema / true (any scalar value)",
    (
        "annotations ignored: title, description, default, examples, $comment, deprecated, readOnly, writeOnly, "
        "$schema, $anchor, $id at the root, x-* extensions"
    ),
]
REFUSED_FEATURES = [
    (
        "multipleOf that is not a positive integer (float division makes e.g. 0.01 unreliable in validators); number "
        "bounds with no fixed-point value inside; integer bounds beyond 10**30; an empty range"
    ),
    "minLength above MAX_MIN_LENGTH; formats other than date, date-time, email, ipv4, uuid (format on a non-string type)",
    (
        "enum/const alongside bounds, lengths, multipleOf or format; a length-limited string in one slot with another "
        "string branch (a second length range, a format or a string enum value)"
    ),
    "pattern, contentEncoding, contentMediaType, contentSchema",
    "patternProperties, propertyNames, dependentRequired, dependentSchemas, dependencies",
    (
        "prefixItems, items as a list, additionalItems, unevaluatedItems, contains, minContains, maxContains, "
        "uniqueItems with 2 or more items"
    ),
    "not, if/then/else, oneOf or allOf with several branches, type lists mixing object/array with other types",
    "recursive $ref, non-local $ref, $dynamicRef, $recursiveRef, $id below the root",
    "the schema false, required properties that are not declared, minItems > maxItems",
    "any unknown keyword; templates longer than MAX_POSITIONS tokens",
]


class UnsupportedSchema(ValueError):
    """A response_format feature whose output could not be guaranteed valid; the message names it and where."""


def _refuse(what: str, path: str) -> UnsupportedSchema:
    return UnsupportedSchema(f"response_format: {what} (at {path})")


def _malformed(what: str, path: str) -> ValueError:
    return ValueError(f"response_format: {what} (at {path})")


# --- byte-level regular expressions -> DFAs ---------------------------------------------------------------------
# A regex is an int (a 256-bit set: one byte from it) or a tuple ("seq" | "alt", *parts) / ("star" | "opt", part).


def _bs(chars: bytes | str = b"", lo: int | None = None, hi: int | None = None) -> int:
    """The byte set of `chars` plus the range lo..hi."""
    chars = chars.encode() if isinstance(chars, str) else chars
    mask = 0
    for b in chars:
        mask |= 1 << b
    if lo is not None:
        mask |= ((1 << (hi - lo + 1)) - 1) << lo
    return mask


def _lit(text: bytes | str) -> tuple:
    text = text.encode() if isinstance(text, str) else text
    return ("seq", *(1 << b for b in text))


_WS = _bs(" \t\n\r")  # RFC 8259 section 2: insignificant whitespace
_DIGIT, _HEX = _bs(lo=0x30, hi=0x39), _bs("abcdefABCDEF", 0x30, 0x39)
_CONT = _bs(lo=0x80, hi=0xBF)
_UTF8 = (  # RFC 3629 section 4: well-formed multi-byte sequences only (no surrogates, nothing above U+10FFFF)
    "alt",
    ("seq", _bs(lo=0xC2, hi=0xDF), _CONT),
    ("seq", 1 << 0xE0, _bs(lo=0xA0, hi=0xBF), _CONT),
    ("seq", _bs(lo=0xE1, hi=0xEC) | _bs(lo=0xEE, hi=0xEF), _CONT, _CONT),
    ("seq", 1 << 0xED, _bs(lo=0x80, hi=0x9F), _CONT),
    ("seq", 1 << 0xF0, _bs(lo=0x90, hi=0xBF), _CONT, _CONT),
    ("seq", _bs(lo=0xF1, hi=0xF3), _CONT, _CONT, _CONT),
    ("seq", 1 << 0xF4, _bs(lo=0x80, hi=0x8F), _CONT, _CONT),
)
# \uXXXX escapes exclude the surrogate range D800-DFFF: a lone surrogate is legal JSON text but not valid Unicode.
_UESC = ("alt", ("seq", _HEX & ~_bs("dD"), _HEX, _HEX, _HEX), ("seq", _bs("dD"), _bs(lo=0x30, hi=0x37), _HEX, _HEX))
_PLAIN = _bs(lo=0x20, hi=0x7F) & ~_bs('"\\')  # RFC 8259 section 7: control characters must be escaped
_ESCAPE = ("seq", _bs("\\"), ("alt", _bs('"\\/bfnrt'), ("seq", _bs("u"), _UESC)))
_STRING = ("seq", _bs('"'), ("star", ("alt", _PLAIN, _ESCAPE, _UTF8)), _bs('"'))
_INTEGER = ("seq", ("opt", _bs("-")), ("alt", _bs("0"), ("seq", _bs(lo=0x31, hi=0x39), ("star", _DIGIT))))
_DIGITS = ("seq", _DIGIT, ("star", _DIGIT))
_NUMBER = (
    "seq",
    _INTEGER,
    ("opt", ("seq", _bs("."), _DIGITS)),
    ("opt", ("seq", _bs("eE"), ("opt", _bs("+-")), _DIGITS)),
)
_KIND_RX = {"string": _STRING, "integer": _INTEGER, "number": _NUMBER}


def _rep(rx, lo: int, hi: int | None) -> tuple:
    """rx repeated lo..hi times (hi None: unbounded); the optional copies nest, so the NFA stays linear."""
    tail = ("star", rx) if hi is None else None
    for _ in range(0 if hi is None else hi - lo):
        tail = ("opt", rx if tail is None else ("seq", rx, tail))
    return ("seq", *[rx] * lo, *([tail] if tail is not None else []))


def _span(x: str, y: str) -> tuple:
    """Digit strings of len(x) between x and y inclusive (leading zeros allowed): the classic range split."""
    if not x:
        return ("seq",)
    w = len(x) - 1
    if x[0] == y[0]:
        return ("seq", _bs(x[0]), _span(x[1:], y[1:]))
    if set(x) == {"0"} and set(y) == {"9"}:
        return _rep(_DIGIT, w + 1, w + 1)
    parts = [("seq", _bs(x[0]), _span(x[1:], "9" * w))]
    if ord(y[0]) - ord(x[0]) > 1:
        parts.append(("seq", _bs(lo=ord(x[0]) + 1, hi=ord(y[0]) - 1), _rep(_DIGIT, w, w)))
    parts.append(("seq", _bs(y[0]), _span("0" * w, y[1:])))
    return ("alt", *parts)


def _nat_rx(lo: int, hi: int | None) -> tuple:
    """Decimal integers lo..hi (0 <= lo <= hi; hi None: unbounded) without leading zeros, split by digit count."""
    parts, width = [], len(str(lo))
    while hi is None or width <= len(str(hi)):
        a = max(lo, 10 ** (width - 1) if width > 1 else 0)
        b = 10**width - 1 if hi is None else min(hi, 10**width - 1)
        parts.append(_span(str(a), str(b)))
        if hi is None:  # every longer integer
            parts.append(("seq", _bs(lo=0x31, hi=0x39), _rep(_DIGIT, width, None)))
            break
        width += 1
    return ("alt", *parts)


def _int_rx(lo: int | None, hi: int | None) -> tuple:
    """JSON integers in [lo, hi] (None: unbounded on that side; lo <= hi); negatives are '-' and a mirrored range."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(_nat_rx(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        parts.append(("seq", _bs("-"), _nat_rx(1 if hi is None else max(1, -hi), None if lo is None else -lo)))
    return ("alt", *parts)


def _prefixes(x: str, y: str) -> tuple[bool, tuple | None]:
    """Fraction digits read as x..y once padded with zeros to len(x): (is the empty string one, the non-empty ones)."""
    if not x:
        return True, None
    empty, w = set(x) == {"0"}, len(x) - 1
    if empty and set(y) == {"9"}:
        return True, _rep(_DIGIT, 1, len(x))
    parts = []
    for mask, sub in (
        [(_bs(x[0]), _prefixes(x[1:], y[1:]))]
        if x[0] == y[0]
        else [
            (_bs(x[0]), _prefixes(x[1:], "9" * w)),
            (_bs(lo=ord(x[0]) + 1, hi=ord(y[0]) - 1) if ord(y[0]) - ord(x[0]) > 1 else 0, (True, _rep(_DIGIT, 0, w))),
            (_bs(y[0]), _prefixes("0" * w, y[1:])),
        ]
    ):
        if mask:
            rest_empty, rest = sub
            parts.append(("seq", mask, rest if not rest_empty else ("opt", rest) if rest else ("seq",)))
    return empty, ("alt", *parts)


def _ufixed_rx(lo: int, hi: int | None, digits: int) -> tuple:
    """Non-negative decimals whose value times 10**digits lies in [lo, hi], with at most `digits` fraction digits."""
    unit = 10**digits
    ia, ra = divmod(lo, unit)
    ib, rb = (None, None) if hi is None else divmod(hi, unit)

    def frac(r1: int, r2: int) -> tuple:
        empty, rest = _prefixes(f"{r1:0{digits}d}", f"{r2:0{digits}d}") if digits else (r1 == 0, None)
        return ("alt", *([("seq",)] if empty else []), *([("seq", _bs("."), rest)] if rest else []))

    if ia == ib:
        return ("seq", _nat_rx(ia, ia), frac(ra, rb))
    parts = [("seq", _nat_rx(ia, ia), frac(ra, unit - 1))]
    if ib is None or ib - ia > 1:
        parts.append(("seq", _nat_rx(ia + 1, None if ib is None else ib - 1), frac(0, unit - 1)))
    if ib is not None:
        parts.append(("seq", _nat_rx(ib, ib), frac(0, rb)))
    return ("alt", *parts)


def _fixed_rx(lo: int | None, hi: int | None, digits: int) -> tuple:
    """JSON fixed-point numbers with value in [lo, hi] / 10**digits (None: unbounded); never '-0', never exponents."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(_ufixed_rx(max(lo, 0) if lo is not None else 0, hi, digits))
    if lo is None or lo < 0:
        parts.append(
            ("seq", _bs("-"), _ufixed_rx(1 if hi is None else max(1, -hi), None if lo is None else -lo, digits))
        )
    return ("alt", *parts)


def _date_rx() -> tuple:
    """RFC 3339 full-date with a real calendar day: 29 February only in leap years (years 0001-9999)."""
    by4 = ("alt", *(_lit(f"{v:02d}") for v in range(4, 100, 4)))  # two-digit non-zero multiples of 4
    leap = ("alt", ("seq", _DIGIT, _DIGIT, by4), ("seq", by4, _lit("00")))  # 0004, ..., 1996, 2000; not 1900
    months = [("alt", *map(_lit, ms)) for ms in (["01", "03", "05", "07", "08", "10", "12"], ["04", "06", "09", "11"])]
    normal = (
        "alt",
        ("seq", months[0], _bs("-"), _span("01", "31")),
        ("seq", months[1], _bs("-"), _span("01", "30")),
        ("seq", _lit("02-"), _span("01", "28")),
    )
    return ("alt", ("seq", _span("0001", "9999"), _bs("-"), normal), ("seq", leap, _lit("-02-29")))


def _dotted(part: int) -> tuple:
    """part+ ("." part+)*: an email's dot-atom local part or its domain labels."""
    return ("seq", _rep(part, 1, None), ("star", ("seq", _bs("."), _rep(part, 1, None))))


def _format_rx(name: str) -> tuple:
    """The characters of a string in `format` (ASCII, nothing to escape), as strict as the format checkers."""
    alnum = _bs(lo=0x30, hi=0x39) | _bs(lo=0x41, hi=0x5A) | _bs(lo=0x61, hi=0x7A)
    hh, mm = _span("00", "23"), _span("00", "59")
    if name == "date":
        return _date_rx()
    if name == "date-time":  # RFC 3339 section 5.6, minus leap seconds (the checker refuses second 60)
        frac = ("opt", ("seq", _bs("."), _rep(_DIGIT, 1, 6)))
        offset = ("alt", _bs("Z"), ("seq", _bs("+-"), hh, _bs(":"), mm))
        return ("seq", _date_rx(), _bs("T"), hh, _bs(":"), mm, _bs(":"), mm, frac, offset)
    if name == "email":
        return ("seq", _dotted(alnum | _bs("_%+-")), _bs("@"), _dotted(alnum | _bs("-")))
    if name == "ipv4":  # ipaddress refuses leading zeros
        octet = ("alt", _span("0", "9"), _span("10", "99"), _span("100", "255"))
        return ("seq", octet, *[("seq", _bs("."), octet)] * 3)
    assert name == "uuid"
    return ("seq", *(("seq", _bs("-") if i else ("seq",), _rep(_HEX, n, n)) for i, n in enumerate((8, 4, 4, 4, 12))))


_FORMAT_LENGTHS = {"date": (10, 10), "date-time": (20, 32), "email": (3, None), "ipv4": (7, 15), "uuid": (36, 36)}


def _padded(rx) -> tuple:
    return ("seq", ("star", _WS), rx, ("star", _WS))


def _flat_object_rx() -> tuple:
    """{"key": scalar, ...} with string keys and string/number/true/false/null values (json_object mode)."""
    ws = ("star", _WS)
    scalar = ("alt", _STRING, _NUMBER, _lit("true"), _lit("false"), _lit("null"))
    member = ("seq", _STRING, ws, _bs(":"), ws, scalar, ws)
    members = ("seq", member, ("star", ("seq", _bs(","), ws, member)))
    return _padded(("seq", _bs("{"), ws, ("opt", members), _bs("}")))


class _Nfa:
    """Thompson construction: per state a list of epsilon targets and of (byte set, target) edges."""

    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int]]] = []

    def state(self) -> int:
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, rx) -> tuple[int, int]:
        if isinstance(rx, _ByteDfa):  # an automaton built elsewhere (a product) joins as its own states
            ids = [self.state() for _ in rx.accept]
            end = self.state()
            for s, row in enumerate(rx.table):
                for t in np.unique(row[row >= 0]):
                    self.edges[ids[s]].append((sum(1 << int(b) for b in np.flatnonzero(row == t)), ids[t]))
                if rx.accept[s]:
                    self.eps[ids[s]].append(end)
            return ids[rx.start], end
        if isinstance(rx, int):
            s, e = self.state(), self.state()
            self.edges[s].append((rx, e))
            return s, e
        op, *parts = rx
        if op == "seq":
            s = e = self.state()
            for part in parts:
                ps, pe = self.build(part)
                self.eps[e].append(ps)
                e = pe
            return s, e
        s, e = self.state(), self.state()
        if op == "alt":
            for part in parts:
                ps, pe = self.build(part)
                self.eps[s].append(ps)
                self.eps[pe].append(e)
            return s, e
        ps, pe = self.build(parts[0])  # star / opt
        self.eps[s] += [ps, e]
        self.eps[pe].append(e)
        if op == "star":
            self.eps[pe].append(ps)
        return s, e

    def closure(self, states) -> frozenset[int]:
        seen, todo = set(states), list(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)


def _byte_classes(masks) -> list[int]:
    """The coarsest partition of the 256 bytes that every mask is a union of (determinize per class, not byte)."""
    classes = [(1 << 256) - 1]
    for m in masks:
        classes = [part for c in classes for part in (c & m, c & ~m) if part]
    return classes


@dataclasses.dataclass
class _ByteDfa:
    table: np.ndarray  # [S, 256] int32 next state, -1 = dead
    start: int
    accept: np.ndarray  # [S] bool


def _compile_rx(rx) -> _ByteDfa:
    """Subset construction over byte classes, then Moore minimization."""
    nfa = _Nfa()
    s0, final = nfa.build(rx)
    classes = _byte_classes({m for edges in nfa.edges for m, _ in edges})
    reps = [(c & -c).bit_length() - 1 for c in classes]
    index, order, rows = {nfa.closure([s0]): 0}, [nfa.closure([s0])], []
    while len(rows) < len(order):
        current = order[len(rows)]
        row = []
        for b in reps:
            nxt = nfa.closure([t for s in current for m, t in nfa.edges[s] if m >> b & 1])
            if nxt and nxt not in index:
                index[nxt] = len(order)
                order.append(nxt)
            row.append(index[nxt] if nxt else -1)
        rows.append(row)
    by_class = np.array(rows, dtype=np.int32)  # [S, classes]
    table = np.full((len(order), 256), -1, dtype=np.int32)
    for ci, c in enumerate(classes):
        table[:, [b for b in range(256) if c >> b & 1]] = by_class[:, ci : ci + 1]
    return _minimize(_ByteDfa(table, 0, np.array([final in st for st in order])))


def _minimize(dfa: _ByteDfa) -> _ByteDfa:
    """Moore's partition refinement; every state of our DFAs can reach acceptance, so no pruning is needed."""
    part = dfa.accept.astype(np.int64)
    while True:
        targets = np.where(dfa.table >= 0, part[dfa.table], -1)  # [S, 256]
        _, new = np.unique(np.concatenate([part[:, None], targets], 1), axis=0, return_inverse=True)
        new = new.reshape(-1)
        if new.max() == part.max():
            break
        part = new
    n = int(part.max()) + 1
    rep = np.zeros(n, dtype=np.int64)
    rep[part] = np.arange(len(part))
    rows = dfa.table[rep]
    table = np.where(rows >= 0, part[rows], -1).astype(np.int32)
    return _ByteDfa(table, int(part[dfa.start]), dfa.accept[rep])


def _intersect(a: _ByteDfa, b: _ByteDfa, limit: int) -> _ByteDfa | None:
    """The product automaton of the reachable state pairs, pruned to pairs that can still accept; None past limit."""
    index, order, rows = {(a.start, b.start): 0}, [(a.start, b.start)], []
    while len(rows) < len(order):
        s, t = order[len(rows)]
        row = np.full(256, -1, dtype=np.int32)
        for byte in np.flatnonzero((a.table[s] >= 0) & (b.table[t] >= 0)):
            key = (int(a.table[s, byte]), int(b.table[t, byte]))
            if key not in index:
                index[key] = len(order)
                order.append(key)
            row[byte] = index[key]
        rows.append(row)
        if len(order) > limit:
            return None
    table = np.stack(rows)
    live = np.array([a.accept[s] and b.accept[t] for s, t in order])
    while True:  # co-reachability, so that _minimize's assumption (every state can accept) holds again
        grown = live | (np.where(table >= 0, live[table], False)).any(1)
        if (grown == live).all():
            break
        live = grown
    table = np.where((table >= 0) & live[np.maximum(table, 0)], table, -1).astype(np.int32)
    return _minimize(_ByteDfa(table, 0, np.array([a.accept[s] and b.accept[t] for s, t in order])))


def _remainder_dfa(m: int) -> _ByteDfa:
    """Decimal text (an optional '-' then digits) whose digits spell a multiple of m: states are remainders."""
    table = np.full((m, 256), -1, dtype=np.int32)
    for d in range(10):
        table[:, 0x30 + d] = (np.arange(m) * 10 + d) % m
    table[:, ord("-")] = np.arange(m)
    return _ByteDfa(table, 0, np.arange(m) == 0)


# --- tokenizer bytes ----------------------------------------------------------------------------------------------


def _gpt2_byte_chars() -> dict[str, int]:
    """Inverse of the GPT-2 ByteLevel map: printable bytes stand for themselves, the rest shift to U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in set(printable)]
    chars.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return chars


def _types_in(node) -> set[str]:
    """Every component "type" of a tokenizer.json decoder / pre-tokenizer, through Sequences."""
    if not isinstance(node, dict):
        return set()
    found = {node.get("type")}
    for child in node.get("decoders", None) or node.get("pretokenizers", None) or []:
        found |= _types_in(child)
    return found


def _piece_decoder(spec: dict):
    """piece string -> raw bytes, for byte-level BPE or SentencePiece-style (metaspace + byte fallback) models."""
    decoders = _types_in(spec.get("decoder"))
    if "ByteLevel" in decoders:
        chars = _gpt2_byte_chars()
        return lambda piece: bytes(chars[c] for c in piece) if all(c in chars for c in piece) else None
    model = spec.get("model") or {}
    if decoders & {"Replace", "Metaspace", "ByteFallback"}:
        fallback = re.compile(r"<0x([0-9A-Fa-f]{2})>") if model.get("byte_fallback") else None

        def piece_bytes(piece: str) -> bytes:
            m = fallback.fullmatch(piece) if fallback else None
            return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()

        return piece_bytes
    raise ValueError(f"structured output needs a byte-level or SentencePiece-style tokenizer, not decoder {decoders}")


class _Vocab:
    """Per-tokenizer token bytes, laid out for the column-at-a-time DFA walk; built once and cached."""

    def __init__(self, tokenizer):
        spec = json.loads(tokenizer.tok.to_str())
        decode = _piece_decoder(spec)
        self.size = tokenizer.vocab_size
        added = {t["id"] for t in spec.get("added_tokens") or []}  # special or not: never in a slot
        self.bytes: list[bytes | None] = [None] * self.size
        for piece, i in tokenizer.tok.get_vocab(with_added_tokens=False).items():
            if i < self.size and i not in added:
                self.bytes[i] = decode(piece) or None
        usable = [(b[0], i) for i, b in enumerate(self.bytes) if b is not None and len(b) <= MAX_TOKEN_BYTES]
        self.order = np.array([i for _, i in sorted(usable)], dtype=np.int64)  # token ids, sorted by first byte
        self.lens = np.array([len(self.bytes[i]) for i in self.order], dtype=np.int64)
        width = int(self.lens.max(initial=1))
        flat = b"".join(self.bytes[i].ljust(width, b"\0") for i in self.order)
        self.mat = np.frombuffer(flat, dtype=np.uint8).reshape(len(self.order), width)  # [N, L]
        self.first_off = np.searchsorted(self.mat[:, 0], np.arange(257)) if len(self.order) else np.zeros(257, int)
        self.ws_id = self._whitespace_token()
        self.dfas: collections.OrderedDict = collections.OrderedDict()  # spec key -> _TokenDfa (LRU)

    def _whitespace_token(self) -> int | None:
        """A token that is pure JSON whitespace, preferring a single space (used to pad before a slot)."""
        for want in (b" ", b"\n"):
            hits = [i for i, b in enumerate(self.bytes) if b == want]
            if hits:
                return hits[0]
        pure = [i for i, b in enumerate(self.bytes) if b and not b.strip(b" \t\n\r")]
        return min(pure, key=lambda i: len(self.bytes[i])) if pure else None


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_DFA_CACHE_SIZE = 64


def _vocab(tokenizer) -> _Vocab:
    with _LOCK:
        vocab = _VOCABS.get(tokenizer)
        if vocab is None:
            vocab = _VOCABS[tokenizer] = _Vocab(tokenizer)
        return vocab


def _token_transitions(dfa: _ByteDfa, vocab: _Vocab, weight: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(origin state, token id, final state, count, touched) for every pair whose whole token stays alive in the DFA.

    Pairs start from the first byte (tokens are sorted by it, so each live (state, byte) is one index range) and
    are filtered a byte column at a time; the work is proportional to the pairs still alive, not S x V x L.
    With a weight [S, 256] (1 where a byte completes a counted character, -1 on the bytes of a state outside the
    counted region), count sums the positive weights along the walk and touched says it entered the region.
    """
    weight = np.zeros(dfa.table.shape, dtype=np.int8) if weight is None else weight
    s_idx, b_idx = np.nonzero(dfa.table >= 0)
    counts = vocab.first_off[b_idx + 1] - vocab.first_off[b_idx]
    origin = np.repeat(s_idx, counts)
    cur = np.repeat(dfa.table[s_idx, b_idx], counts).astype(np.int64)
    tok = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts - vocab.first_off[b_idx], counts)
    w = np.repeat(weight[s_idx, b_idx], counts)
    cnt, touched = np.maximum(w, 0).astype(np.int64), w >= 0
    done = []
    for j in range(1, vocab.mat.shape[1] + 1):
        fin = vocab.lens[tok] == j
        done.append((origin[fin], tok[fin], cur[fin], cnt[fin], touched[fin]))
        keep = ~fin
        origin, tok, cur, cnt, touched = origin[keep], tok[keep], cur[keep], cnt[keep], touched[keep]
        if not len(tok):
            break
        byte = vocab.mat[tok, j]
        w = weight[cur, byte]
        cur = dfa.table[cur, byte].astype(np.int64)
        alive = cur >= 0
        cnt, touched = cnt + np.maximum(w, 0), touched | (w >= 0)
        origin, tok, cur, cnt, touched = origin[alive], tok[alive], cur[alive], cnt[alive], touched[alive]
    origin, tok, cur, cnt, touched = (np.concatenate(parts) for parts in zip(*done))
    return origin, vocab.order[tok], cur, cnt, touched


@dataclasses.dataclass(eq=False)
class _Counter:
    """minLength/maxLength on a string slot: characters counted while inside the string (`inside` states).

    delta [S, K] is how many characters a class completes from a state; touched [S, K] whether its walk reaches a
    counted state (a class leaving the string, or holding a whole one, must bring the count into [lo, hi]).
    """

    inside: np.ndarray  # [S] bool
    delta: np.ndarray  # [S, K] int64
    touched: np.ndarray  # [S, K] bool
    lo: int
    hi: int | None  # None: no upper bound (the count then saturates at lo)
    graph: dict = dataclasses.field(default_factory=dict)  # the (state, count) graph, built once

    @property
    def n(self) -> int:
        return (self.lo if self.hi is None else self.hi) + 1


@dataclasses.dataclass(eq=False)
class _TokenDfa:
    """A DFA over tokens: tokens with identical transition columns share a class."""

    class_id: np.ndarray  # [V] int64
    trans: np.ndarray  # [S, K] int64 next state, -1 = dead
    start: int
    accept: np.ndarray  # [S] bool
    counter: _Counter | None = None
    plans: dict = dataclasses.field(default_factory=dict)  # slot length -> class masks [k, K] | None
    device_ids: dict = dataclasses.field(default_factory=dict)  # device -> class_id as a torch tensor

    def ids_on(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self.device_ids:
            self.device_ids[key] = torch.from_numpy(self.class_id).to(device)
        return self.device_ids[key]


def _lift(dfa: _ByteDfa, vocab: _Vocab, count: tuple[int, int | None] | None = None) -> _TokenDfa:
    """The token-level DFA; classes come from a random 64-bit hash of each token's column, checked exactly.

    A column entry packs (final state, characters counted, touched); without `count` the last two are always 0.
    """
    inside, weight = _string_region(dfa) if count is not None else (None, None)
    origin, tok, final, cnt, touched = _token_transitions(dfa, vocab, weight)
    assert cnt.max(initial=0) < 128
    code = ((final + 1) * 128 + cnt) * 2 + (touched if count is not None else 0)  # > 0 for a live pair
    S = dfa.table.shape[0]
    for seed in range(4):
        weights = np.random.default_rng(seed).integers(1, 2**63, size=S, dtype=np.uint64) | np.uint64(1)
        h = np.zeros(vocab.size, dtype=np.uint64)
        np.add.at(h, tok, code.astype(np.uint64) * weights[origin])  # wraps mod 2**64
        _, first, class_id = np.unique(h, return_index=True, return_inverse=True)
        class_id = class_id.reshape(-1)
        table = np.zeros((S, len(first)), dtype=np.int64)
        table[origin, class_id[tok]] = code
        # Exact check: every pair agrees with its class, and every token has as many live pairs as its class.
        per_token = np.bincount(tok, minlength=vocab.size)
        if (table[origin, class_id[tok]] == code).all() and (per_token == (table > 0).sum(0)[class_id]).all():
            counter = None
            if count is not None:
                counter = _Counter(inside, table // 2 % 128, table % 2 == 1, *count)
            return _TokenDfa(class_id, table // 256 - 1, dfa.start, dfa.accept, counter)
    raise AssertionError("token class hashing collided repeatedly")


def _string_region(dfa: _ByteDfa) -> tuple[np.ndarray, np.ndarray]:
    """The states inside the one JSON string the DFA can hold, and byte weights for _token_transitions.

    Inside = reachable from the state after the opening quote (the character boundary) without its closing-quote
    edge; a byte completes a character when it returns to the boundary. The callers make sure no other branch of
    the slot starts with a quote, so this string is the only way into (and its closing quote the only way out of)
    the region.
    """
    boundary = int(dfa.table[dfa.start, ord('"')])
    assert boundary >= 0
    inside, todo = np.zeros(len(dfa.accept), dtype=bool), [boundary]
    inside[boundary] = True
    while todo:
        q = todo.pop()
        row = dfa.table[q].copy()
        if q == boundary:
            row[ord('"')] = -1
        for t in np.unique(row[row >= 0]):
            if not inside[t]:
                inside[t] = True
                todo.append(int(t))
    assert not inside[dfa.start] and not inside[dfa.table[boundary, ord('"')]]
    entries = (dfa.table >= 0) & ~inside[:, None] & inside[np.maximum(dfa.table, 0)]
    assert entries.sum() == 1 and entries[dfa.start, ord('"')], "the counted string must be the only quoted branch"
    weight = np.where(inside[:, None], (dfa.table == boundary).astype(np.int8), np.int8(-1))
    return inside, weight.astype(np.int8)


# --- value specs and slots ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Scalar:
    """A slot's language: JSON values of the given kinds, or one of the literal encodings.

    A kind is "string", "integer" or "number" (unconstrained) or a tuple: ("int", lo, hi, multiple), ("fixed", lo,
    hi) in units of 10**-NUMBER_FRACTION_DIGITS, ("strlen", lo, hi) or ("format", name); None bounds are open.
    """

    kinds: frozenset = frozenset()
    literals: frozenset = frozenset()

    def union(self, other: _Scalar) -> _Scalar:
        kinds = self.kinds | other.kinds
        subsumed = {"number": ("integer", "int", "fixed"), "integer": ("int",), "string": ("strlen", "format")}
        for general, tags in subsumed.items():  # e.g. every integer text is a number text
            if general in kinds:
                kinds = {k for k in kinds if k == general or _tag(k) not in tags}
        return _Scalar(frozenset(kinds), self.literals | other.literals)

    def count(self) -> tuple[int, int | None] | None:
        """The (minLength, maxLength) of the slot's one length-limited string branch, if it has one."""
        counted = [k[1:] for k in self.kinds if _tag(k) == "strlen"]
        return counted[0] if counted else None

    def rx(self):
        branches = [_kind_rx(k) for k in sorted(self.kinds, key=repr)] + [_lit(x) for x in sorted(self.literals)]
        return _padded(("alt", *branches))


def _tag(kind) -> str:
    return kind if isinstance(kind, str) else kind[0]


def _kind_rx(kind):
    tag = _tag(kind)
    if tag in _KIND_RX:
        return _KIND_RX[tag]
    if tag == "int":
        return _int_rx(kind[1], kind[2]) if kind[3] == 1 else _multiple_dfa(*kind[1:])
    if tag == "fixed":
        return _fixed_rx(kind[1], kind[2], NUMBER_FRACTION_DIGITS)
    if tag == "strlen":
        return _STRING
    return ("seq", _bs('"'), _format_rx(kind[1]), _bs('"'))


@functools.lru_cache(maxsize=64)
def _multiple_dfa(lo: int | None, hi: int | None, m: int) -> _ByteDfa | None:
    """Integers in [lo, hi] divisible by m (range DFA x remainder DFA); None when that needs too many states."""
    return _intersect(_compile_rx(_int_rx(lo, hi)), _remainder_dfa(m), MAX_PRODUCT_STATES)


def _kind_tokens(kind) -> int:
    """Slot length for a kind: the default, or enough single-character tokens for its longest value."""
    tag = _tag(kind)
    if tag in _KIND_TOKENS:
        return _KIND_TOKENS[tag]
    if tag == "int":
        lo, hi = kind[1:3]
        widths = [len(str(b)) for b in (lo, hi) if b is not None]
        return max(widths) if len(widths) == 2 else max([INTEGER_TOKENS, *widths])
    if tag == "fixed":
        unit = 10**NUMBER_FRACTION_DIGITS
        widths = [len(str(abs(b) // unit)) + (b < 0) + 3 for b in kind[1:] if b is not None]
        return max([NUMBER_TOKENS, *widths])
    if tag == "strlen":
        lo, hi = kind[1:]
        return max(lo + 2, min(STRING_TOKENS, STRING_TOKENS if hi is None else hi + 2))
    return _FORMAT_LENGTHS[kind[1]][1] + 2 if kind[1] != "email" else STRING_TOKENS


_BOOL = _Scalar(literals=frozenset({b"true", b"false"}))
_NULL = _Scalar(literals=frozenset({b"null"}))
_ANY = _Scalar(frozenset({"string", "number"})).union(_BOOL).union(_NULL)
_TYPE_SPECS = {
    "string": _Scalar(frozenset({"string"})),
    "integer": _Scalar(frozenset({"integer"})),
    "number": _Scalar(frozenset({"number"})),
    "boolean": _BOOL,
    "null": _NULL,
}
_KIND_TOKENS = {"string": STRING_TOKENS, "integer": INTEGER_TOKENS, "number": NUMBER_TOKENS}


def _token_dfa(vocab: _Vocab, key, rx, count: tuple[int, int | None] | None = None) -> _TokenDfa:
    with _LOCK:
        if key in vocab.dfas:
            vocab.dfas.move_to_end(key)
            return vocab.dfas[key]
    tdfa = _lift(_compile_rx(rx), vocab, count)
    with _LOCK:
        vocab.dfas[key] = tdfa
        while len(vocab.dfas) > _DFA_CACHE_SIZE:
            vocab.dfas.popitem(last=False)
    return tdfa


def _slot_plan(tdfa: _TokenDfa, k: int) -> np.ndarray | None:
    """Class masks [k, K] for a slot of exactly k tokens, or None when no accepted path has that length.

    Forward sets R_i (reachable from the start in i tokens) and backward sets B_i (accepting within k - i tokens);
    a class may sit at position i iff it leads some state of R_i & B_i into B_{i+1}.
    """
    if k in tdfa.plans:
        return tdfa.plans[k]
    if tdfa.counter is not None:
        tdfa.plans[k] = _counted_plan(tdfa, k)
        return tdfa.plans[k]
    S = len(tdfa.accept)
    live = tdfa.trans >= 0
    adj = np.zeros((S, S), dtype=bool)
    rows, cols = np.nonzero(live)
    adj[rows, tdfa.trans[rows, cols]] = True
    fwd = [np.arange(S) == tdfa.start]
    for _ in range(k):
        fwd.append(adj[fwd[-1]].any(0))
    back = [tdfa.accept]
    for _ in range(k):
        back.append((adj & back[-1][None, :]).any(1))
    back.reverse()
    plan = None
    if (fwd[k] & back[k]).any():
        safe = np.where(live, tdfa.trans, 0)
        plan = np.stack([(live & back[i + 1][safe])[fwd[i] & back[i]].any(0) for i in range(k)])
    tdfa.plans[k] = plan
    return plan


def _counted_graph(tdfa: _TokenDfa) -> dict:
    """The (state, count) graph of a counted DFA, product state q * N + n, with classes grouped into moves.

    A move is one (state, next state, characters, gate) combination shared by many classes; edges are the moves
    expanded over the counts they are valid at, so the DP touches moves x counts, not classes x counts.
    """
    c = tdfa.counter
    if c.graph:
        return c.graph
    N = c.n
    pair_q, pair_k = np.nonzero(tdfa.trans >= 0)
    q2 = tdfa.trans[pair_q, pair_k]
    gate = c.touched[pair_q, pair_k] & ~c.inside[q2]  # leaves the string (or holds all of it): check the count
    key = np.stack([pair_q, q2, c.delta[pair_q, pair_k], gate.astype(np.int64)], 1)
    moves, pair_move = np.unique(key, axis=0, return_inverse=True)
    mq, mq2, md, mgate = moves.T  # [M] each
    n = np.arange(N)[None, :]  # [1, N]
    total = n + md[:, None]  # [M, N]
    valid = (c.inside[mq][:, None] | (n == 0)) & ((mgate[:, None] == 0) | (total >= c.lo))
    if c.hi is not None:
        valid &= total <= c.hi
    dst_n = np.where(c.inside[mq2][:, None], np.minimum(total, N - 1), 0)
    m_idx, n_idx = np.nonzero(valid)
    size, dst = len(tdfa.accept) * N, mq2[m_idx] * N + dst_n[m_idx, n_idx]
    c.graph = {
        "pair_k": pair_k,
        "pair_move": pair_move.reshape(-1),
        "moves": len(moves),
        "src": mq[m_idx] * N + n_idx,
        "dst": dst,
        "move": m_idx,
        "start": tdfa.start * N,
        "accept": np.repeat(tdfa.accept & ~c.inside, N) & (np.arange(size) % N == 0),
        "by_dst": _segments(dst, size),  # for the Viterbi reductions
        "by_move": _segments(pair_move.reshape(-1), len(moves)),
    }
    return c.graph


def _counted_plan(tdfa: _TokenDfa, k: int) -> np.ndarray | None:
    """_slot_plan on the (state, count) graph: a class may sit at i iff one of its moves is on an accepted path."""
    g = _counted_graph(tdfa)
    src, dst, size = g["src"], g["dst"], len(g["accept"])
    fwd = [np.arange(size) == g["start"]]
    for _ in range(k):
        nxt = np.zeros(size, dtype=bool)
        nxt[dst[fwd[-1][src]]] = True
        fwd.append(nxt)
    back = [g["accept"]]
    for _ in range(k):
        prev = np.zeros(size, dtype=bool)
        prev[src[back[-1][dst]]] = True
        back.append(prev)
    back.reverse()
    if not (fwd[k] & back[k]).any():
        return None
    plan = np.zeros((k, tdfa.trans.shape[1]), dtype=bool)
    for i in range(k):
        ok = np.zeros(g["moves"], dtype=bool)
        ok[g["move"][fwd[i][src] & back[i + 1][dst]]] = True
        plan[i, g["pair_k"][ok[g["pair_move"]]]] = True
    return plan


def _segments(index: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """Sort order, segment starts and bucket ids for repeated per-bucket reductions over a fixed index."""
    order = np.argsort(index, kind="stable")
    ids, starts = np.unique(index[order], return_index=True)
    return order, starts, ids, np.diff(np.append(starts, len(index))), size


def _argmax_into(values: np.ndarray, seg: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per bucket: the max of values and the first position holding it (len(values) where none is finite)."""
    order, starts, ids, lengths, size = seg
    v = values[order]
    top = np.maximum.reduceat(v, starts) if len(v) else np.zeros(0)
    pos = np.where((v == np.repeat(top, lengths)) & np.isfinite(v), order, len(values))
    best, arg = np.full(size, -math.inf), np.full(size, len(values))
    if len(v):
        best[ids], arg[ids] = top, np.minimum.reduceat(pos, starts)
    return best, arg


def _counted_viterbi(tdfa: _TokenDfa, plan: np.ndarray, best: np.ndarray) -> list[int]:
    """_viterbi on the (state, count) graph: per position the best class of each move, then the DP over edges."""
    g = _counted_graph(tdfa)
    src, move, pair_k = g["src"], g["move"], g["pair_k"]
    score = np.full(len(g["accept"]), -math.inf)
    score[g["start"]] = 0.0
    trail = []
    for i in range(len(plan)):
        move_best, move_pair = _argmax_into(np.where(plan[i], best[i], -math.inf)[pair_k], g["by_move"])
        score, edge = _argmax_into(score[src] + move_best[move], g["by_dst"])
        trail.append((edge, move_pair))
    final = np.where(g["accept"], score, -math.inf)
    s = int(final.argmax())
    assert np.isfinite(final[s]), "no accepted path although the slot plan had one"
    path = []
    for edge, move_pair in reversed(trail):
        e = int(edge[s])
        path.append(int(pair_k[move_pair[move[e]]]))
        s = int(src[e])
    return path[::-1]


def _expand_counter(tdfa: _TokenDfa) -> _TokenDfa:
    """Slow twin of the counted graph: the explicit (state, count) x class DFA, one entry at a time."""
    c, N = tdfa.counter, tdfa.counter.n
    S, K = tdfa.trans.shape
    trans = np.full((S * N, K), -1, dtype=np.int64)
    for q in range(S):
        for n in range(N) if c.inside[q] else [0]:
            for k in range(K):
                q2, total = int(tdfa.trans[q, k]), n + int(c.delta[q, k])
                leaves = bool(c.touched[q, k]) and q2 >= 0 and not c.inside[q2]
                if q2 < 0 or (c.hi is not None and total > c.hi) or (leaves and total < c.lo):
                    continue
                trans[q * N + n, k] = q2 * N + (min(total, N - 1) if c.inside[q2] else 0)
    accept = np.zeros(S * N, dtype=bool)
    accept[::N] = tdfa.accept & ~c.inside
    return _TokenDfa(tdfa.class_id, trans, tdfa.start * N, accept)


@dataclasses.dataclass
class _Slot:
    start: int  # first output position
    tdfa: _TokenDfa
    plan: np.ndarray  # [k, K] bool class masks


def _class_best(lp: torch.Tensor, tdfa: _TokenDfa) -> tuple[np.ndarray, np.ndarray]:
    """Per position and class: the best log-prob [P, K] (float64) and the token holding it [P, K]."""
    P, V = lp.shape
    K = tdfa.trans.shape[1]
    ids = tdfa.ids_on(lp.device)
    vals, toks = [], []
    step = max(1, (1 << 22) // V)  # rows per chunk: bounds the [rows, V] int64 temporaries
    for lo in range(0, P, step):
        x = torch.nan_to_num(lp[lo : lo + step].float(), nan=_FLOOR, posinf=0.0, neginf=_FLOOR).clamp_min(_FLOOR)
        idx = ids.expand(x.shape[0], V)
        best = torch.full((x.shape[0], K), -math.inf, device=x.device).scatter_reduce(1, idx, x, "amax")
        hit = x == best.gather(1, idx)
        where = torch.where(hit, torch.arange(V, device=x.device).expand_as(idx), V)
        tok = torch.full((x.shape[0], K), V, device=x.device, dtype=torch.long).scatter_reduce(1, idx, where, "amin")
        vals.append(best.double().cpu())
        toks.append(tok.cpu())
    return torch.cat(vals).numpy(), torch.cat(toks).numpy()


def _viterbi(tdfa: _TokenDfa, plan: np.ndarray, best: np.ndarray) -> list[int]:
    """Best accepted path of classes: returns the class index per position. best: [k, K] class log-probs."""
    S = tdfa.trans.shape[0]
    score = np.full(S, -math.inf)
    score[tdfa.start] = 0.0
    back = []
    for i in range(len(plan)):
        rows, cols = np.flatnonzero(np.isfinite(score)), np.flatnonzero(plan[i])
        sub = tdfa.trans[np.ix_(rows, cols)]  # [r, c]
        cand = torch.from_numpy((score[rows, None] + best[i, cols][None, :]).reshape(-1))
        tgt = torch.from_numpy(np.where(sub >= 0, sub, S).reshape(-1))
        cand = torch.where(tgt < S, cand, -math.inf)
        new = torch.full((S + 1,), -math.inf, dtype=torch.float64).scatter_reduce(0, tgt, cand, "amax")
        hit = (cand == new[tgt]) & torch.isfinite(cand)
        where = torch.where(hit, torch.arange(len(cand)), len(cand))
        arg = torch.full((S + 1,), len(cand), dtype=torch.long).scatter_reduce(0, tgt, where, "amin")[:S].numpy()
        ok = arg < len(cand)
        prev, cls = np.full(S, -1), np.full(S, -1)
        prev[ok], cls[ok] = rows[arg[ok] // len(cols)], cols[arg[ok] % len(cols)]
        back.append((prev, cls))
        score = new[:S].numpy()
    final = np.where(tdfa.accept, score, -math.inf)
    s = int(final.argmax())
    assert np.isfinite(final[s]), "no accepted path although the slot plan had one"
    path = []
    for prev, cls in reversed(back):
        path.append(int(cls[s]))
        s = int(prev[s])
    return path[::-1]


# --- the template -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class JsonTemplate:
    """Pinned skeleton + masked value slots over output positions [0, length); position length - 1 is the EOS."""

    length: int
    fixed: dict[int, int]
    masks: torch.Tensor  # [M, V] bool
    mask_at: dict[int, int]
    _slots: list[_Slot] = dataclasses.field(default_factory=list, repr=False)

    def finalize(self, start: int, logprobs: torch.Tensor) -> dict[int, int]:
        """Tokens of every slot inside the canvas [start, start + C): per slot, the most probable accepted path.

        logprobs [C, V] may put mass outside the masks (it is ignored) or be -inf/NaN (treated as a very low but
        finite score, so a valid path always exists).
        """
        C = logprobs.shape[0]
        chosen: dict[int, int] = {}
        for slot in (s for s in self._slots if start <= s.start < start + C):
            k = len(slot.plan)
            best, toks = _class_best(logprobs[slot.start - start : slot.start - start + k], slot.tdfa)
            best = np.where(slot.plan, best, -math.inf)
            viterbi = _viterbi if slot.tdfa.counter is None else _counted_viterbi
            for i, cls in enumerate(viterbi(slot.tdfa, slot.plan, best)):
                chosen[slot.start + i] = int(toks[i, cls])
        return chosen


class _Builder:
    """Walks a schema into a list of pinned token runs and slots, then lays them out on canvases."""

    def __init__(self, root, tokenizer, vocab: _Vocab, canvas_length: int):
        self.root, self.tokenizer, self.vocab, self.C = root, tokenizer, vocab, canvas_length
        self.items: list = []  # list[int] (pinned ids) | (tdfa, size, path)
        self.budget = 0

    def _spend(self, n: int, path: str) -> None:
        self.budget += n
        if self.budget > MAX_POSITIONS:
            raise _refuse(f"the output template would exceed {MAX_POSITIONS} tokens", path)

    def pin(self, text: str, path: str) -> None:
        ids = self.tokenizer.encode(text, parse_special=False)
        got = b"".join(self.vocab.bytes[i] or b"\xff" for i in ids)
        if got.strip(b" ") != text.encode().strip(b" "):
            raise ValueError(f"the tokenizer does not spell {text!r} with plain tokens (got {got!r})")
        self._spend(len(ids), path)
        self.items.append(ids)

    def slot(self, spec: _Scalar, path: str) -> None:
        if not spec.kinds and len(spec.literals) == 1:  # a const is skeleton, not a choice (and may span canvases)
            return self.pin(next(iter(spec.literals)).decode(), path)
        quoted = [k for k in spec.kinds if _tag(k) in ("string", "strlen", "format")] + [
            x for x in spec.literals if x.startswith(b'"')
        ]
        if spec.count() is not None and len(quoted) > 1:  # the character counter needs the only quoted branch
            raise _refuse("a length-limited string in one slot with other string values is not supported", path)
        tdfa = _token_dfa(self.vocab, spec, spec.rx(), spec.count())
        spelled = {x: len(self.tokenizer.encode(x.decode(), parse_special=False)) for x in spec.literals}
        longest = max(spelled, key=spelled.get, default=None)
        if longest is not None and spelled[longest] > self.C:  # it could never be chosen: say so, don't drop it
            raise _refuse(f"the value {longest.decode()} needs more than {self.C} tokens (one canvas)", path)
        sizes = [_kind_tokens(k) for k in spec.kinds] + [n + 1 for n in spelled.values()]
        size = min(max(sizes), self.C)
        self._spend(size, path)
        self.items.append((tdfa, size, path))

    def pin_ids(self, ids: list[int], path: str) -> None:
        self._spend(len(ids), path)
        self.items.append(list(ids))

    def pin_marker(self, marker: str, path: str) -> None:
        """A protocol marker: its control token when the tokenizer has one, else its text."""
        i = self.tokenizer.id_of(marker)
        if i is not None and i in self.tokenizer.special_ids:
            return self.pin_ids([i], path)
        self.pin(marker, path)

    def free_object(self) -> None:
        tdfa = _token_dfa(self.vocab, "json_object", _flat_object_rx())
        self.items.append((tdfa, max(1, min(JSON_OBJECT_TOKENS, self.C - 1)), "$"))

    def layout(self, eos_id: int) -> JsonTemplate:
        fixed, slots, p = {}, [], 0
        for item in self.items:
            if isinstance(item, list):
                fixed.update({p + i: t for i, t in enumerate(item)})
                p += len(item)
                continue
            tdfa, size, path = item
            size, plan = self._fit(tdfa, size, path)
            if p % self.C + size > self.C:  # a slot never straddles canvases: pad with whitespace up to the next
                if self.vocab.ws_id is None:
                    raise ValueError("the tokenizer has no whitespace token to pad the template with")
                fixed.update(dict.fromkeys(range(p, p + self.C - p % self.C), self.vocab.ws_id))
                p += self.C - p % self.C
            slots.append(_Slot(p, tdfa, plan))
            p += size
        fixed[p] = eos_id
        if p + 1 > MAX_POSITIONS:
            raise _refuse(f"the output template would exceed {MAX_POSITIONS} tokens", "$")
        return _assemble(p + 1, fixed, slots, self.vocab)

    def _fit(self, tdfa: _TokenDfa, size: int, path: str) -> tuple[int, np.ndarray]:
        """The largest slot length <= size that has an accepted path with this tokenizer, else the shortest up to C.

        (A minLength, say, may need more tokens than characters when some characters have no token of their own.)
        """
        for k in [*range(size, 0, -1), *range(size + 1, self.C + 1)]:
            plan = _slot_plan(tdfa, k)
            if plan is not None:
                return k, plan
        raise _refuse(f"this value needs more than {self.C} tokens, and a slot must fit one canvas", path)


def _assemble(length: int, fixed: dict[int, int], slots: list[_Slot], vocab: _Vocab) -> JsonTemplate:
    """Expand class masks to vocabulary rows, deduplicated."""
    rows, row_of, mask_at = [], {}, {}
    for slot in slots:
        for i, classes in enumerate(slot.plan):
            row = classes[slot.tdfa.class_id]
            key = np.packbits(row).tobytes()
            if key not in row_of:
                row_of[key] = len(rows)
                rows.append(torch.from_numpy(row))
            mask_at[slot.start + i] = row_of[key]
    masks = torch.stack(rows) if rows else torch.zeros((0, vocab.size), dtype=torch.bool)
    return JsonTemplate(length, fixed, masks, mask_at, slots)


# --- schema walk --------------------------------------------------------------------------------------------------

_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
    | {"$schema", "$anchor", "$defs", "definitions"}
)
_OBJECT_KEYS = frozenset(
    {"properties", "required", "additionalProperties", "unevaluatedProperties", "minProperties", "maxProperties"}
)
_ARRAY_KEYS = frozenset({"items", "minItems", "maxItems", "uniqueItems"})
_NUMBER_KEYS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_STRING_KEYS = frozenset({"minLength", "maxLength", "format"})
_SUPPORTED = (
    _OBJECT_KEYS
    | _ARRAY_KEYS
    | _NUMBER_KEYS
    | _STRING_KEYS
    | {"type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf"}
)
_REFUSED = frozenset(
    {"pattern", "contentEncoding", "contentMediaType", "contentSchema"}
    | {"patternProperties", "propertyNames", "dependentRequired", "dependentSchemas", "dependencies"}
    | {"prefixItems", "additionalItems", "unevaluatedItems", "contains", "minContains", "maxContains"}
    | {"not", "if", "then", "else", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor"}
    | {"$vocabulary"}
)
_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}


def _live_keys(node: dict, path: str) -> set[str]:
    """The node's validation keywords after refusing what we cannot honour; annotations drop out."""
    live = set()
    for key in node:
        if key in _REFUSED:
            raise _refuse(f"{key!r} is not supported", path)
        if key == "$id" and path != "$":
            raise _refuse("'$id' below the root is not supported", path)
        if key in _SUPPORTED:
            live.add(key)
        elif key not in _ANNOTATIONS and key != "$id" and not key.startswith("x-"):
            raise _refuse(f"unknown keyword {key!r} is not supported", path)
    return live


def _pointer_path(ref: str) -> str:
    return "$" + "".join(f".{seg}" for seg in ref[2:].split("/")) if ref != "#" else "$"


def _lookup(root, ref, path: str):
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise _refuse(f"'$ref' {ref!r} is not supported (only local '#/...' pointers)", path)
    node = root
    for seg in ref[2:].split("/") if ref != "#" else []:  # RFC 6901 unescaping after URI-fragment decoding
        seg = urllib.parse.unquote(seg).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and seg in node:
            node = node[seg]
        elif isinstance(node, list) and seg.isdigit() and int(seg) < len(node):
            node = node[int(seg)]
        else:
            raise _malformed(f"'$ref' {ref!r} does not resolve", path)
    return node


def _resolve(node, path: str, root, refs: frozenset) -> tuple[dict, str, frozenset]:
    """Follow $ref and single-branch anyOf/oneOf/allOf down to a schema with real keywords."""
    while True:
        if node is True:
            return {}, path, refs
        if node is False:
            raise _refuse("the schema false (no value is valid) is not supported", path)
        if not isinstance(node, dict):
            raise _malformed("a schema must be an object or a boolean", path)
        live = _live_keys(node, path)
        if "$ref" in node:
            if live != {"$ref"}:
                raise _refuse("'$ref' alongside other keywords is not supported", path)
            ref = node["$ref"]
            if ref in refs:
                raise _refuse(f"recursive '$ref' {ref!r} is not supported", path)
            node, path, refs = _lookup(root, ref, path), _pointer_path(ref), refs | {ref}
            continue
        single = [kw for kw in ("anyOf", "oneOf", "allOf") if kw in live and _branches(node, kw, path) == 1]
        if not single:
            return node, path, refs
        if live != {single[0]}:
            raise _refuse(f"{single[0]!r} alongside other keywords is not supported", path)
        node, path = node[single[0]][0], f"{path}.{single[0]}[0]"


def _branches(node: dict, kw: str, path: str) -> int:
    if not isinstance(node[kw], list) or not node[kw]:
        raise _malformed(f"{kw!r} must be a non-empty list", path)
    return len(node[kw])


def _type_list(schema: dict, path: str) -> list[str] | None:
    types = schema.get("type")
    if types is None:
        return None
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or not types or any(t not in _TYPES for t in types):
        raise _malformed(f"'type' must be one of {sorted(_TYPES)} or a list of them", path)
    return list(dict.fromkeys(types))


def _type_ok(value, types: list[str] | None) -> bool:
    """JSON Schema's type test (an integer-valued float counts as an integer)."""
    if types is None:
        return True
    kind = {bool: "boolean", str: "string", dict: "object", list: "array", type(None): "null"}.get(type(value))
    if kind is None and isinstance(value, (int, float)):
        whole = isinstance(value, int) or value.is_integer()
        return "number" in types or ("integer" in types and whole)
    return kind in types


def _encode_literal(value, path: str) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: its \u escape is still valid JSON
        return json.dumps(value, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        raise _malformed(f"enum/const value {value!r} is not JSON", path) from None


def _literal_spec(schema: dict, types: list[str] | None, path: str) -> _Scalar:
    values = schema["enum"] if "enum" in schema else [schema["const"]]
    if not isinstance(values, list) or not values:
        raise _malformed("'enum' must be a non-empty list", path)
    if len(values) > MAX_ENUM_VALUES:
        raise _refuse(f"'enum' with more than {MAX_ENUM_VALUES} values is not supported", path)
    encoded = {_encode_literal(v, path) for v in values if _type_ok(v, types)}
    if "enum" in schema and "const" in schema:
        encoded &= {_encode_literal(schema["const"], path)}
    if not encoded:
        raise _refuse("no 'enum'/'const' value satisfies the rest of the schema", path)
    if sum(map(len, encoded)) > MAX_ENUM_BYTES:
        raise _refuse(f"'enum' values longer than {MAX_ENUM_BYTES} bytes in all are not supported", path)
    return _Scalar(literals=frozenset(encoded))


def _scalar_spec(schema: dict, path: str, root) -> _Scalar | None:
    """The slot language of a scalar-valued schema, or None for an object/array schema."""
    types = _type_list(schema, path)
    constrained = sorted(schema.keys() & (_NUMBER_KEYS | _STRING_KEYS))
    if "enum" in schema or "const" in schema:
        if constrained:
            raise _refuse(f"'enum'/'const' alongside {constrained[0]!r} is not supported", path)
        return _literal_spec(schema, types, path)
    if types is None:
        if schema.keys() & _OBJECT_KEYS or schema.keys() & _ARRAY_KEYS:
            return None
        if not constrained:
            return _ANY
        types = ["string", "number", "boolean", "null"]
    if "object" in types or "array" in types:
        if len(types) > 1:
            raise _refuse(f"a type list {types} mixing object/array with other types is not supported", path)
        return None
    if "format" in schema and "string" not in types:
        raise _refuse(f"'format' {schema['format']!r} on a non-string type is not supported", path)
    spec = _Scalar()
    for t in types:
        if t == "string":
            spec = spec.union(_string_spec(schema, path))
        elif t in ("integer", "number"):
            spec = spec.union(_number_spec(t, schema, path, _draft4(root)))
        else:
            spec = spec.union(_TYPE_SPECS[t])
    return spec


def _draft4(root) -> bool:
    """Draft 4 (and 3) read exclusiveMinimum/exclusiveMaximum as booleans modifying minimum/maximum."""
    uri = root.get("$schema", "") if isinstance(root, dict) else ""
    return isinstance(uri, str) and ("draft-04" in uri or "draft-03" in uri)


def _string_spec(schema: dict, path: str) -> _Scalar:
    """Lengths become a character counter, a format its exact grammar; a format must fit the lengths whole."""
    lo = _int_keyword(schema, "minLength", path, 0)
    hi = _int_keyword(schema, "maxLength", path, None)
    if hi is not None and lo > hi:
        raise _refuse(f"no string satisfies 'minLength' {lo} > 'maxLength' {hi}", path)
    fmt = schema.get("format")
    if fmt is not None:
        if fmt not in FORMATS:
            raise _refuse(f"'format' {fmt!r} is not supported (only {', '.join(FORMATS)})", path)
        flo, fhi = _FORMAT_LENGTHS[fmt]
        if (hi is not None and hi < flo) or (fhi is not None and fhi < lo):
            raise _refuse(f"no {fmt!r} value satisfies 'minLength'/'maxLength' {lo}..{hi}", path)
        if lo > flo or (hi is not None and (fhi is None or fhi > hi)):
            raise _refuse(f"'format' {fmt!r} with 'minLength'/'maxLength' that cut into its lengths", path)
        return _Scalar(frozenset({("format", fmt)}))
    if lo > MAX_MIN_LENGTH:
        raise _refuse(f"'minLength' above {MAX_MIN_LENGTH} is not supported", path)
    if lo == 0 and hi is None:
        return _TYPE_SPECS["string"]
    return _Scalar(frozenset({("strlen", lo, None if hi is None else min(hi, MAX_LENGTH))}))


def _number_keyword(schema: dict, key: str, path: str) -> fractions.Fraction | None:
    if key not in schema:
        return None
    value = schema[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _malformed(f"{key!r} must be a finite number", path)
    return fractions.Fraction(value)


def _bounds(schema: dict, path: str, draft4: bool) -> tuple[list, list]:
    """Lower and upper bounds as (exact value, strict) pairs, in either draft's spelling."""
    lows, highs = [], []
    for side, plain, exclusive in ((lows, "minimum", "exclusiveMinimum"), (highs, "maximum", "exclusiveMaximum")):
        flag = schema.get(exclusive)
        if isinstance(flag, bool):
            if not draft4:
                raise _refuse(f"boolean {exclusive!r} (the draft-4 form) needs a draft-04 '$schema'", path)
            if plain not in schema:
                raise _malformed(f"boolean {exclusive!r} needs {plain!r}", path)
        elif exclusive in schema:
            side.append((_number_keyword(schema, exclusive, path), True))
        if plain in schema:  # draft 4 makes minimum strict for any truthy exclusiveMinimum
            side.append((_number_keyword(schema, plain, path), bool(flag) if draft4 else False))
    return lows, highs


def _number_spec(kind: str, schema: dict, path: str, draft4: bool) -> _Scalar:
    """Bounds and multipleOf: integer ranges (with remainders) or fixed-point decimals strictly inside."""
    if not schema.keys() & _NUMBER_KEYS:
        return _TYPE_SPECS[kind]
    lows, highs = _bounds(schema, path, draft4)
    multiple = _number_keyword(schema, "multipleOf", path)
    if multiple is not None and (multiple <= 0 or multiple.denominator != 1):
        raise _refuse(f"'multipleOf' {schema['multipleOf']!r} is not supported (only positive integers)", path)
    if kind == "integer" or multiple is not None:
        m = 1 if multiple is None else int(multiple)
        return _integer_spec(lows, highs, m, isinstance(schema.get("multipleOf"), float), path)
    return _fixed_spec(lows, highs, path)


def _integer_spec(lows: list, highs: list, m: int, float_multiple: bool, path: str) -> _Scalar:
    """Integers in the bounds (exact: an integer text parses to an int, compared exactly with any bound)."""
    limit = 10**MAX_INT_DIGITS - 1
    lo = max((math.floor(q) + 1 if strict else math.ceil(q) for q, strict in lows), default=None)
    hi = min((math.ceil(q) - 1 if strict else math.floor(q) for q, strict in highs), default=None)
    if (lo is not None and lo > limit) or (hi is not None and hi < -limit):
        raise _refuse(f"integer bounds beyond {limit + 1:.0e} are not supported", path)
    if float_multiple:  # validators divide by a float multipleOf: keep the values where doubles are exact
        limit = 10**MAX_NUMBER_DIGITS - 1
        lo, hi = -limit if lo is None else lo, limit if hi is None else hi
    lo = None if lo is None else max(lo, -limit)  # a narrower range is still valid
    hi = None if hi is None else min(hi, limit)
    if lo is not None and hi is not None and lo > hi:
        raise _refuse(f"no integer satisfies the bounds (minimum {lo} > maximum {hi})", path)
    if m > MAX_PRODUCT_STATES:  # the remainder automaton alone has m states: refuse before building anything
        raise _refuse(f"'multipleOf' above {MAX_PRODUCT_STATES} is not supported", path)
    if m > 1:
        dfa = _multiple_dfa(lo, hi, m)
        if dfa is None:
            raise _refuse(f"'multipleOf' {m} with these bounds needs more than {MAX_PRODUCT_STATES} states", path)
        if not dfa.accept.any():
            raise _refuse(f"no multiple of {m} lies in [{lo}, {hi}] ('multipleOf')", path)
    return _Scalar(frozenset({("int", lo, hi, m)}))


def _double_past(q: fractions.Fraction, strict: bool, up: bool) -> fractions.Fraction:
    """The double nearest q on the inside (at or past q; past it when strict), as an exact fraction.

    `json.loads` rounds a decimal to the nearest double, monotonically: a decimal at or past this double parses to a
    float that is too, so it stays valid even when the text itself sits closer to the bound than one ulp.
    """
    sign = 1 if up else -1
    d = float(q)
    while sign * (fractions.Fraction(d) - q) < 0 or (strict and fractions.Fraction(d) == q):
        d = math.nextafter(d, sign * math.inf)
    while True:
        back = math.nextafter(d, -sign * math.inf)
        if sign * (fractions.Fraction(back) - q) < 0 or (strict and fractions.Fraction(back) == q):
            return fractions.Fraction(d)
        d = back


def _fixed_spec(lows: list, highs: list, path: str) -> _Scalar:
    """Fixed-point decimals inside the bounds, in units of 10**-NUMBER_FRACTION_DIGITS."""
    unit, limit = 10**NUMBER_FRACTION_DIGITS, fractions.Fraction(10**MAX_NUMBER_DIGITS)
    if any(q >= limit for q, _ in lows) or any(q <= -limit for q, _ in highs):
        raise _refuse(f"number bounds beyond {float(limit):.0e} are not supported", path)
    lo = max((math.ceil(_double_past(max(q, -limit), s, True) * unit) for q, s in lows), default=None)
    hi = min((math.floor(_double_past(min(q, limit), s, False) * unit) for q, s in highs), default=None)
    if lo is not None and hi is not None and lo > hi:
        raise _refuse(f"no number with at most {NUMBER_FRACTION_DIGITS} fraction digits satisfies the bounds", path)
    return _Scalar(frozenset({("fixed", lo, hi)}))


def _emit(b: _Builder, node, path: str, refs: frozenset, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _refuse(f"schemas nested deeper than {MAX_DEPTH} levels are not supported", path)
    schema, path, refs = _resolve(node, path, b.root, refs)
    for kw in ("oneOf", "allOf"):
        if kw in schema:
            raise _refuse(f"{kw!r} with several branches is not supported", path)
    if "anyOf" in schema:
        return _emit_any_of(b, schema, path, refs, depth)
    spec = _scalar_spec(schema, path, b.root)
    if spec is not None:
        return b.slot(spec, path)
    is_object = _type_list(schema, path) == ["object"] or (schema.get("type") is None and schema.keys() & _OBJECT_KEYS)
    (_emit_object if is_object else _emit_array)(b, schema, path, refs, depth)


def _emit_any_of(b: _Builder, schema: dict, path: str, refs: frozenset, depth: int) -> None:
    """Scalar branches merge into one slot; otherwise the first object/array branch is emitted (it validates)."""
    if _live_keys(schema, path) != {"anyOf"}:
        raise _refuse("'anyOf' alongside other keywords is not supported", path)
    union, structured = _Scalar(), None
    for i, branch in enumerate(schema["anyOf"]):
        sub, sub_path, _ = _resolve(branch, f"{path}.anyOf[{i}]", b.root, refs)
        spec = None if {"anyOf", "oneOf", "allOf"} & sub.keys() else _scalar_spec(sub, sub_path, b.root)
        if spec is None:
            structured = structured or (branch, f"{path}.anyOf[{i}]")
        else:
            union = union.union(spec)
    if structured is not None:
        return _emit(b, structured[0], structured[1], refs, depth + 1)
    b.slot(union, path)


def _int_keyword(schema: dict, key: str, path: str, default):
    value = schema.get(key, default)
    if value is not default and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise _malformed(f"{key!r} must be a non-negative integer", path)
    return value


def _chosen_properties(schema: dict, path: str) -> list[str]:
    """Required properties plus optional ones in schema order, as many as maxProperties allows."""
    props = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(props, dict) or not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _malformed("'properties' must be an object and 'required' a list of names", path)
    missing = [r for r in required if r not in props]
    if missing:
        raise _refuse(f"required properties {missing} are not declared in 'properties'", path)
    lo = _int_keyword(schema, "minProperties", path, 0)
    hi = _int_keyword(schema, "maxProperties", path, math.inf)
    if len(set(required)) > hi:
        raise _refuse("'maxProperties' is smaller than the number of required properties", path)
    room = hi - len(set(required))
    chosen = []
    for name in props:
        if name in required or room > 0:
            room -= name not in required
            chosen.append(name)
    if len(chosen) < lo:
        raise _refuse(f"'minProperties' {lo} is more than the {len(chosen)} declared properties", path)
    return chosen


def _emit_object(b: _Builder, schema: dict, path: str, refs: frozenset, depth: int) -> None:
    names = _chosen_properties(schema, path)
    b.pin("{", path)
    for i, name in enumerate(names):
        # ensure_ascii: a key is pinned text, so \u escapes keep it to tokens every tokenizer can spell.
        b.pin(("," if i else "") + json.dumps(name) + ":", path)
        _emit(b, schema["properties"][name], f"{path}.properties.{name}", refs, depth + 1)
    b.pin("}", path)


def _item_count(schema: dict, path: str) -> int:
    """clamp(2, minItems, maxItems); at most 1 under uniqueItems (two free values could be equal)."""
    lo = _int_keyword(schema, "minItems", path, 0)
    hi = _int_keyword(schema, "maxItems", path, math.inf)
    if hi < lo:
        raise _refuse("'maxItems' is smaller than 'minItems'", path)
    unique = schema.get("uniqueItems", False)
    if unique is True and lo > 1:
        raise _refuse("'uniqueItems' with 2 or more items is not supported", path)
    return int(max(lo, min(1 if unique is True else 2, hi)))


def _emit_array(b: _Builder, schema: dict, path: str, refs: frozenset, depth: int) -> None:
    items = schema.get("items", True)
    if isinstance(items, list):
        raise _refuse("'items' as a list (tuple validation) is not supported", path)
    n = _item_count(schema, path)
    b.pin("[", path)
    for i in range(n):
        if i:
            b.pin(",", path)
        _emit(b, items, f"{path}.items", refs, depth + 1)
    b.pin("]", path)


# --- entry point --------------------------------------------------------------------------------------------------


def compile_response_format(response_format: dict, tokenizer, canvas_length: int, eos_id: int) -> JsonTemplate | None:
    """None for {"type": "text"}; a template for "json_object" and "json_schema" (OpenAI's request shape).

    Raises UnsupportedSchema for schema features it cannot guarantee and ValueError for a malformed request.
    """
    schema = _schema_of(response_format)
    if schema is None:
        return None
    if tokenizer is None:
        raise ValueError("structured output needs the checkpoint's tokenizer.json")
    if not isinstance(canvas_length, int) or canvas_length < 1 or not isinstance(eos_id, int):
        raise ValueError(f"canvas_length must be a positive int and eos_id an int, not {canvas_length!r}, {eos_id!r}")
    b = _Builder(schema, tokenizer, _vocab(tokenizer), canvas_length)
    if schema == "json_object":
        b.free_object()
    else:
        _emit(b, schema, "$", frozenset({"#"}), 0)
    return b.layout(eos_id)


def compile_tool_call(tools: list[dict], name: str | None, tokenizer, canvas_length: int, eos_id: int) -> JsonTemplate:
    """A forced Gemma 4 tool call, `<|tool_call>call:NAME{...}<tool_call|>` then EOS, with JSON arguments (which
    `chat.parse_arguments` reads as well as Gemma's own syntax). `name` given: that function, its arguments
    compiled from its `parameters` schema like a response_format; None ("required"): the name is a slot limited
    to the declared names and the arguments a free flat JSON object."""
    from .chat import CALL_CLOSE, CALL_OPEN

    if tokenizer is None:
        raise ValueError("tool calls need the checkpoint's tokenizer.json")
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    b = _Builder(None, tokenizer, _vocab(tokenizer), canvas_length)
    b.pin_marker(CALL_OPEN, "$")
    b.pin("call:", "$")
    if name is not None:
        schema = by_name[name].get("parameters") or {"type": "object", "properties": {}}
        _check_against_metaschema(schema)
        b.root = schema
        b.pin(name, "$")
        _emit(b, schema, "$", frozenset({"#"}), 0)
    else:
        b.slot(_Scalar(literals=frozenset(n.encode() for n in by_name)), "$.name")
        b.free_object()
    b.pin_marker(CALL_CLOSE, "$")
    return b.layout(eos_id)


def _schema_of(response_format):
    """The schema to compile, "json_object", or None for text."""
    if not isinstance(response_format, dict) or response_format.get("type") not in (
        "text",
        "json_object",
        "json_schema",
    ):
        raise _malformed("an object with type 'text', 'json_object' or 'json_schema' is expected", "response_format")
    kind = response_format["type"]
    if kind != "json_schema":
        return None if kind == "text" else "json_object"
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
        raise _malformed("json_schema must be an object whose 'schema' is a JSON Schema object", "json_schema")
    if not isinstance(spec.get("name", ""), str) or not isinstance(spec.get("strict", False), (bool, type(None))):
        raise _malformed("json_schema 'name' must be a string and 'strict' a boolean", "json_schema")
    _check_against_metaschema(spec["schema"])
    return spec["schema"]


def _check_size(schema) -> None:
    """Refuse a schema of more than MAX_SCHEMA_NODES JSON values before any validator or compiler walks it (a
    38,000-property schema took over 10 s to compile only to exceed MAX_POSITIONS): one bounded iterative walk."""
    stack, seen = [schema], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_SCHEMA_NODES:
            raise _refuse(f"schemas of more than {MAX_SCHEMA_NODES} JSON values are not supported", "$")
        if isinstance(node, dict):
            stack.extend(node.values())
            seen += len(node)  # the keys
        elif isinstance(node, list):
            stack.extend(node)


def _check_against_metaschema(schema) -> None:
    """A schema its own validator calls invalid (`"minimum": null`, `"additionalProperties": 5`, ...) is a malformed
    request, caught here before any keyword is read. The draft is the one `$schema` names; without one, a schema
    valid in 2020-12, draft 7 or draft 4 passes (so older spellings reach the compiler, which names what it refuses)."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import Draft4Validator, Draft7Validator, Draft202012Validator, validator_for

    _check_size(schema)
    named = isinstance(schema, dict) and "$schema" in schema
    drafts = [validator_for(schema)] if named else [Draft202012Validator, Draft7Validator, Draft4Validator]
    first = None
    for draft in drafts:
        try:
            draft.check_schema(schema)
            return
        except SchemaError as e:
            first = first or e
        except RecursionError:
            raise _refuse(f"schemas nested deeper than {MAX_DEPTH} levels are not supported", "$") from None
    where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in first.path)
    raise _malformed(f"the schema is not valid JSON Schema: {first.message}", where)


def structured_layout(
    response_format: dict | None, tokenizer, canvas_length: int, vocab_size: int, settings: GenerationSettings
) -> tuple[Layout, int] | None:
    """(layout, exact token budget) for an OpenAI `response_format` (None: plain text). The JSON skeleton is pinned,
    value positions are limited to grammar-viable tokens, and the commit takes each value's best grammar-valid path
    (`structured.JsonTemplate.finalize`), so the output always parses and validates. Raises
    `UnsupportedSchema` (naming the keyword) or ConfigError."""
    if response_format is None or response_format == {"type": "text"}:
        return None
    if not settings.eos_token_ids:
        raise ConfigError("structured output needs an EOS token id (generation_config.json eos_token_id)")
    template = compile_response_format(response_format, tokenizer, canvas_length, settings.eos_token_ids[0])
    if template is None:
        return None
    return _as_layout(template, vocab_size)


def tool_call_layout(
    tools: list[dict], name: str | None, tokenizer, canvas_length: int, vocab_size: int, settings: GenerationSettings
) -> tuple[Layout, int]:
    """(layout, exact token budget) of a forced tool call (`compile_tool_call`): OpenAI's tool_choice "required"
    (name None) or a named function. The call always parses."""
    if not settings.eos_token_ids:
        raise ConfigError("tool calls need an EOS token id (generation_config.json eos_token_id)")
    return _as_layout(compile_tool_call(tools, name, tokenizer, canvas_length, settings.eos_token_ids[0]), vocab_size)


def _as_layout(template: JsonTemplate, vocab_size: int) -> tuple[Layout, int]:
    masks = template.masks  # [M, tokenizer vocab]: ids the tokenizer does not know are never allowed
    known = masks.shape[1]
    masks = torch.cat([masks, masks.new_zeros(masks.shape[0], vocab_size - known)], dim=1)

    def finalize(start: int, logprobs: torch.Tensor) -> dict[int, int]:
        return template.finalize(start, logprobs[:, :known])

    return Layout(template.fixed, masks, template.mask_at, finalize), template.length
