"""Structured output without a model: every template, filled from random or hostile log-probs, is valid JSON.

Generation is simulated canvas by canvas (random log-probs, the template's masks and pins, `finalize` at commit)
on the bundled byte-level BPE tokenizer and on a Gemma-style SentencePiece tokenizer built here (metaspace, byte
fallback); the decoded text must `json.loads` and pass `jsonschema.validate`. Also: refusals name their keyword,
the Viterbi pass matches brute force, the vectorized token lift matches a per-token walk, and a 262,144-token
vocabulary compiles quickly once its tables are cached. Value constraints (integer/number bounds, multipleOf,
string lengths, formats) get the same treatment with `format_checker`, plus exhaustive checks of each byte grammar
against Python's own parsers and of the counted-string DP against its explicit (state, count) twin.
"""

from __future__ import annotations

import calendar
import datetime
import fractions
import ipaddress
import itertools
import json
import math
import pathlib
import random
import re
import time
import uuid

import jsonschema
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

import dgemma
from dgemma import structured
from dgemma.structured import UnsupportedSchema, compile_response_format
from dgemma.tokenizer import Tokenizer

BUNDLED = pathlib.Path(dgemma.__file__).parent / "bundled"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
LINES = [
    'The quick brown fox jumps over the lazy dog. {"name": "Ada", "age": 36, "tags": ["x", "y"]}',
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9 -- \u65e5\u672c\u8a9e \u0442\u0435\u043a\u0441\u0442 \U0001f600",
    'She said "hello" and then \\n wrote 3.14159, -42, 1e10, true, false, null.',
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; tabs\tand\nnewlines, [brackets] {braces} : colons",
]


def _obj(props: dict, required=None, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **extra}


def _rf(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "test", "schema": schema, "strict": True}}


SCHEMAS = {
    "person": _obj(
        {
            "name": {"type": "string", "description": "ignored"},
            "age": {"type": "integer"},
            "height": {"type": "number"},
            "member": {"type": "boolean"},
            "nothing": {"type": "null"},
            "address": _obj({"city": {"type": "string"}, "zip": {"type": ["string", "null"]}}),
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        required=["name", "age"],
        additionalProperties=False,
    ),
    "defs": {
        "$defs": {"Item": _obj({"sku": {"type": "integer"}, "kind": {"$ref": "#/definitions/Kind"}})},
        "definitions": {"Kind": {"enum": ["a", 'b"c', "d\\e", "\u00e9t\u00e9", 7, None]}},
        **_obj({"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 3}}),
    },
    "scalars": {
        "type": "array",
        "items": {"anyOf": [{"type": "integer"}, {"type": "boolean"}, {"const": "x"}]},
        "minItems": 2,
        "maxItems": 2,
    },
    "nested_arrays": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
    "pydantic_optional": {
        "$defs": {
            "Sub": {
                "title": "Sub",
                "type": "object",
                "properties": {"v": {"title": "V", "type": "number"}},
                "required": ["v"],
            }
        },
        "properties": {
            "sub": {"anyOf": [{"$ref": "#/$defs/Sub"}, {"type": "null"}], "default": None},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "color": {"type": "string", "enum": ["red", "green", 3]},
            "one": {"oneOf": [{"type": "integer"}]},
        },
        "required": ["sub", "note", "color", "one"],
        "title": "Model",
        "type": "object",
    },
    "limits": _obj(
        {"a": {}, "b": {"const": {"k": [1, 2]}}, "c": {"type": "array", "maxItems": 0}, "d": True},
        required=["a"],
        maxProperties=2,
        minProperties=1,
    ),
    "root_string": {"type": "string"},
    "unique": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
}


@pytest.fixture(scope="module")
def bundled() -> Tokenizer:
    return Tokenizer.from_dir(BUNDLED)


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    """A Gemma-style tokenizer: BPE over "\u2581"-for-space text, <0xNN> byte-fallback pieces, no pre-tokenizer."""
    base = HFTokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Replace(" ", "\u2581")
    base.train_from_iterator(
        LINES * 4, trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False)
    )
    model = json.loads(base.to_str())["model"]
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if p not in SPECIALS]
    vocab = {p: i for i, p in enumerate([*SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *pieces])}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = HFTokenizer(models.BPE(vocab, merges, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIALS)
    return Tokenizer(tok, eos_token="<eos>")


@pytest.fixture(params=["bundled", "spm"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def _hostile_ids(tok: Tokenizer) -> list[int]:
    """Tokens a value slot must never end up holding unescaped: quotes, braces, commas, EOS."""
    ids = {tok.eos_id}
    for text in ['"', "}", "]", ",", "{", '":', "\\"]:
        ids.update(tok.encode(text, parse_special=False))
    return sorted(ids)


def simulate(tpl, tok: Tokenizer, C: int, seed: int, hostile: bool) -> str:
    """Fill the template canvas by canvas as the engine would and return the decoded text.

    Engine-like runs restrict each position's logits to its mask; hostile runs put extra mass on forbidden tokens,
    skip the masks, and blank whole rows to -inf (finalize must cope on its own).
    """
    g = torch.Generator().manual_seed(seed)
    V = tok.vocab_size
    bad = torch.tensor(_hostile_ids(tok))
    chosen = dict(tpl.fixed)
    for start in range(0, tpl.length, C):
        logits = torch.randn(C, V, generator=g) * 4
        if hostile:
            logits[:, bad] += 30.0
            logits[torch.rand(C, generator=g) < 0.25] = -math.inf
        else:
            for j in range(C):
                if start + j in tpl.mask_at:
                    logits[j, ~tpl.masks[tpl.mask_at[start + j]]] = -math.inf
        lp = torch.log_softmax(logits, -1)  # a blanked row becomes NaN here: also fair game
        picks = tpl.finalize(start, lp)
        assert set(picks) == {p for p in tpl.mask_at if start <= p < start + C}
        assert all(tpl.masks[tpl.mask_at[p], t] for p, t in picks.items())
        chosen.update(picks)
    assert sorted(chosen) == list(range(tpl.length))
    return tok.decode([chosen[p] for p in range(tpl.length)])


def check_invariants(tpl, C: int, eos_id: int) -> None:
    assert tpl.fixed[tpl.length - 1] == eos_id
    assert not set(tpl.fixed) & set(tpl.mask_at)
    assert set(tpl.fixed) | set(tpl.mask_at) == set(range(tpl.length))
    assert tpl.masks.dtype == torch.bool and tpl.masks.shape[0] == len(set(tpl.mask_at.values()))
    assert not tpl.masks[:, eos_id].any()
    for slot in tpl._slots:  # no slot straddles a canvas
        assert slot.start // C == (slot.start + len(slot.plan) - 1) // C


@pytest.mark.parametrize("C", [8, 32, 256])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_outputs_always_validate(tok, name, C):
    schema = SCHEMAS[name]
    tpl = compile_response_format(_rf(schema), tok, C, tok.eos_id)
    check_invariants(tpl, C, tok.eos_id)
    for seed in range(4):
        text = simulate(tpl, tok, C, seed, hostile=seed % 2 == 1)
        assert "\ufffd" not in text, text  # multi-byte characters are never split or malformed
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("C", [8, 32, 256])
def test_json_object_mode(tok, C):
    tpl = compile_response_format({"type": "json_object"}, tok, C, tok.eos_id)
    check_invariants(tpl, C, tok.eos_id)
    assert tpl.length == C
    for seed in range(4):
        value = json.loads(simulate(tpl, tok, C, seed, hostile=seed % 2 == 1))
        assert isinstance(value, dict)


def test_text_mode_has_no_template(bundled):
    assert compile_response_format({"type": "text"}, bundled, 32, 1) is None


def test_skeleton_is_pinned_in_order(bundled):
    tpl = compile_response_format(_rf(_obj({"a b": {"type": "boolean"}, "\u00e9": {"type": "null"}})), bundled, 32, 1)
    pinned = bundled.decode([tpl.fixed[p] for p in sorted(tpl.fixed)])  # null is a const: pinned too
    assert pinned.strip() == '{"a b":,"\\u00e9":null}'


def test_slots_are_pushed_to_the_next_canvas(bundled):
    """Eight string slots of 8 tokens on canvases of 8: every slot starts a canvas, padding before it is space."""
    schema = _obj({f"k{i}": {"type": "string"} for i in range(8)})
    tpl = compile_response_format(_rf(schema), bundled, 8, 1)
    assert [s.start % 8 for s in tpl._slots] == [0] * 8 and all(len(s.plan) == 8 for s in tpl._slots)
    space = bundled.encode(" ", parse_special=False)
    assert any(t == space[0] for t in tpl.fixed.values())


def test_a_value_longer_than_a_canvas_is_refused(bundled):
    schema = _obj({"pick": {"enum": ["a rather long enumerated value", "b"]}})
    with pytest.raises(UnsupportedSchema, match=r"needs more than 4 tokens.*\(at \$\.properties\.pick\)$"):
        compile_response_format(_rf(schema), bundled, 4, 1)


def test_true_schema_and_missing_tokenizer(bundled):
    tpl = compile_response_format(_rf(True), bundled, 32, 1)
    json.loads(simulate(tpl, bundled, 32, seed=0, hostile=True))
    with pytest.raises(ValueError, match="tokenizer"):
        compile_response_format(_rf({}), None, 32, 1)


REFUSALS = [
    (_obj({"code": {"type": "string", "pattern": "^[A-Z]+$"}}), "pattern", "$.properties.code"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties", "$"),
    ({"type": "array", "items": {}, "uniqueItems": True, "minItems": 2}, "uniqueItems", "$"),
    ({"type": "array", "prefixItems": [{}]}, "prefixItems", "$"),
    ({"type": "array", "items": [{}, {}]}, "items", "$"),
    ({"not": {"type": "string"}}, "not", "$"),
    ({"if": {"type": "string"}, "then": {}, "else": {}}, "if", "$"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf", "$"),
    ({"allOf": [{"type": "string"}, {"type": "string"}]}, "allOf", "$"),
    ({"anyOf": [{"type": "string"}, {"type": "null"}], "type": "string"}, "anyOf", "$"),
    (
        {"$defs": {"N": _obj({"next": {"$ref": "#/$defs/N"}})}, "$ref": "#/$defs/N"},
        "recursive",
        "$.$defs.N.properties.next",
    ),
    (_obj({"self": {"$ref": "#"}}), "recursive", "$.properties.self"),
    (_obj({"x": {"$ref": "https://example.com/s.json"}}), "$ref", "$.properties.x"),
    ({"type": ["object", "null"]}, "type list", "$"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems", "$"),
    (_obj({"a": {}}, required=["a", "b"]), "required", "$"),
    (_obj({"a": {}}, minProperties=2), "minProperties", "$"),
    ({"type": "object", "nullable": True}, "nullable", "$"),
    (_obj({"a": False}), "false", "$.properties.a"),
    ({"type": "string", "enum": [1, 2]}, "enum", "$"),
    ({"type": "array", "minItems": 5000, "items": {"type": "integer"}}, "exceed", "$.items"),
    (_obj({"n": {"type": "number", "multipleOf": 0.01}}), "multipleOf", "$.properties.n"),
    (
        _obj({"n": {"type": "integer", "multipleOf": 9973, "minimum": 0, "maximum": 10**12}}),
        "multipleOf",
        "$.properties.n",
    ),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer", "$"),
    ({"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 4}, "no integer", "$"),
    ({"type": "integer", "multipleOf": 10, "minimum": 1, "maximum": 9}, "multipleOf", "$"),
    ({"type": "integer", "minimum": 10**40}, "integer bounds", "$"),
    ({"type": "number", "minimum": 1e-8, "maximum": 2e-8}, "fraction digits", "$"),
    ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1e-7}, "fraction digits", "$"),
    ({"type": "number", "minimum": 1e16}, "number bounds", "$"),
    ({"type": "number", "minimum": 0, "exclusiveMinimum": True}, "exclusiveMinimum", "$"),
    ({"type": "string", "minLength": 65}, "minLength", "$"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength", "$"),
    (_obj({"code": {"type": "string", "pattern": "^[A-Z]+$"}}), "pattern", "$.properties.code"),
    ({"type": "string", "format": "hostname"}, "'hostname'", "$"),
    ({"type": "integer", "format": "int64"}, "format", "$"),
    ({"type": "string", "format": "date", "maxLength": 5}, "'date'", "$"),
    ({"type": "string", "format": "email", "maxLength": 20}, "'email'", "$"),
    ({"type": "integer", "enum": [1, 2], "minimum": 2}, "minimum", "$"),
    ({"anyOf": [{"type": "string", "maxLength": 3}, {"type": "string", "format": "date"}]}, "length-limited", "$"),
    ({"anyOf": [{"type": "string", "maxLength": 3}, {"const": "long"}, {"type": "null"}]}, "length-limited", "$"),
]


@pytest.mark.parametrize(("schema", "keyword", "path"), REFUSALS, ids=[r[1] for r in REFUSALS])
def test_refusals_name_keyword_and_place(bundled, schema, keyword, path):
    with pytest.raises(UnsupportedSchema) as info:
        compile_response_format(_rf(schema), bundled, 32, 1)
    message = str(info.value)
    assert keyword in message and f"(at {path})" in message, message


@pytest.mark.parametrize(
    "response_format",
    [
        "json",
        {},
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": []}},
        {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}},
        _rf({"type": "strng"}),
        _rf({"enum": []}),
        _rf({"type": "object", "properties": [], "required": []}),
        _rf({"type": "array", "minItems": -1}),
        _rf(_obj({"a": {"$ref": "#/$defs/Missing"}})),
        _rf({"type": "object", "properties": {"a": 3}}),
        _rf({"type": "integer", "minimum": None}),  # found by fuzzing: a null bound once reached math.ceil(None)
        _rf({"type": "number", "maximum": None}),
        _rf({"type": ["integer", "null"], "exclusiveMinimum": None}),
        _rf({"type": "object", "additionalProperties": 5}),
        _rf({"type": "string", "maxLength": None}),
    ],
)
def test_malformed_response_format_is_a_value_error(bundled, response_format):
    with pytest.raises(ValueError):
        compile_response_format(response_format, bundled, 32, 1)


def test_feature_lists_are_documented():
    assert structured.SUPPORTED_FEATURES and structured.REFUSED_FEATURES
    assert all(isinstance(line, str) for line in structured.SUPPORTED_FEATURES + structured.REFUSED_FEATURES)


# --- the DP and the token lift against slow twins ---------------------------------------------------------------

STRING_RE = re.compile(rb'[ \t\n\r]*"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt])*"[ \t\n\r]*')
INTEGER_RE = re.compile(rb"[ \t\n\r]*-?(?:0|[1-9][0-9]*)[ \t\n\r]*")


def _valid(pattern: re.Pattern, data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return pattern.fullmatch(data) is not None


@pytest.mark.parametrize(
    ("schema", "pattern", "texts"),
    [
        ({"type": "string"}, STRING_RE, ['"', "a", '"a', "\\", "n", " ", 'a"', "\u00e9"]),
        ({"type": "integer"}, INTEGER_RE, ["-", "0", "1", "12", " ", "a", "9"]),
    ],
)
def test_finalize_matches_brute_force(bundled, schema, pattern, texts):
    """Only a handful of tokens get finite scores; the best valid path is found by enumerating all sequences."""
    k = 4
    cands = sorted({i for text in texts for i in bundled.encode(text, parse_special=False)})
    tpl = compile_response_format(_rf(schema), bundled, k, 1)
    vocab = structured._vocab(bundled)
    assert [len(s.plan) for s in tpl._slots] == [k]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        lp = torch.full((k, bundled.vocab_size), -math.inf)
        lp[:, cands] = torch.randn(k, len(cands), generator=g)
        best = max(
            (sum(lp[i, t].item() for i, t in enumerate(seq)), seq)
            for seq in itertools.product(cands, repeat=k)
            if _valid(pattern, b"".join(vocab.bytes[t] for t in seq))
        )
        picks = tpl.finalize(0, lp)
        got = sum(lp[i, picks[i]].item() for i in range(k))
        assert got == pytest.approx(best[0], abs=1e-5)


def _walk(table: np.ndarray, state: int, data: bytes) -> int:
    for b in data:
        if state < 0:
            return -1
        state = int(table[state, b])
    return state


@pytest.mark.parametrize("key", ["string", "number", "json_object"])
def test_token_lift_matches_per_token_walk(bundled, key):
    """The vectorized (state, token) walk equals walking each token's bytes through the byte DFA."""
    rx = structured._flat_object_rx() if key == "json_object" else structured._padded(structured._KIND_RX[key])
    dfa = structured._compile_rx(rx)
    vocab = structured._vocab(bundled)
    tdfa = structured._lift(dfa, vocab)
    for t, data in enumerate(vocab.bytes):
        want = [_walk(dfa.table, s, data) if data else -1 for s in range(len(dfa.accept))]
        assert tdfa.trans[:, tdfa.class_id[t]].tolist() == want


def test_token_bytes_match_decode(tok):
    vocab = structured._vocab(tok)
    for t, data in enumerate(vocab.bytes):
        if data is not None and len(data) == len(data.decode("utf-8", "ignore").encode()):
            assert tok.decode([t]).encode() == data


# --- value constraints: bounds, multipleOf, lengths, formats ---------------------------------------------------

_DRAFT4 = "http://json-schema.org/draft-04/schema#"
CONSTRAINED = {
    "int_point": {"type": "integer", "minimum": 5, "maximum": 5},
    "int_zero": {"type": "integer", "minimum": 0, "maximum": 0},
    "int_negative_point": {"type": "integer", "minimum": -7, "maximum": -7},
    "int_negative": {"type": "integer", "minimum": -1000, "maximum": -3},
    "int_across_zero": {"type": "integer", "minimum": -12, "maximum": 345},
    "int_positive": {"type": "integer", "exclusiveMinimum": 0},
    "int_below_zero": {"type": "integer", "exclusiveMaximum": 0},
    "int_at_most_one": {"type": "integer", "maximum": 1},
    "int_float_bounds": {"type": "integer", "minimum": 1.5, "exclusiveMaximum": 10.0},
    "int_huge": {"type": "integer", "minimum": -(10**20), "maximum": 10**25},
    "int_huge_point": {"type": "integer", "minimum": 10**18 + 7, "maximum": 10**18 + 7},
    "int_draft4": {"$schema": _DRAFT4, "type": "integer", "minimum": 0, "exclusiveMinimum": True, "maximum": 9},
    "int_multiple": {"type": "integer", "multipleOf": 7, "minimum": -100, "maximum": 1000},
    "int_multiple_open": {"type": "integer", "multipleOf": 100},
    "int_multiple_float": {"type": "integer", "multipleOf": 5.0, "minimum": 1},
    "number_multiple_one": {"type": "number", "multipleOf": 1, "exclusiveMinimum": -0.5, "maximum": 3.7},
    "number_multiple": {"type": "number", "multipleOf": 3, "minimum": 0},
    "number_nonnegative": {"type": "number", "minimum": 0},
    "number_positive": {"type": "number", "exclusiveMinimum": 0},
    "number_unit": {"type": "number", "minimum": 0, "maximum": 1},
    "number_open_unit": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "number_near_one": {"type": "number", "minimum": 0.99, "exclusiveMaximum": 1},
    "number_negative": {"type": "number", "minimum": -2.5, "maximum": -0.5},
    "number_point": {"type": "number", "minimum": 0.25, "maximum": 0.25},
    "number_tenth": {"type": "number", "exclusiveMinimum": 0.1, "maximum": 0.3},
    "number_draft4": {"$schema": _DRAFT4, "type": "number", "maximum": 1, "exclusiveMaximum": True},
    "str_empty": {"type": "string", "maxLength": 0},
    "str_one": {"type": "string", "maxLength": 1},
    "str_exact": {"type": "string", "minLength": 3, "maxLength": 3},
    "str_nonempty": {"type": "string", "minLength": 1},
    "str_min_64": {"type": "string", "minLength": 64},
    "str_max_256": {"type": "string", "maxLength": 256},
    "str_max_clamped": {"type": "string", "minLength": 2, "maxLength": 5000},
    "str_or_null": {"type": ["string", "null"], "maxLength": 2},
    "date": {"type": "string", "format": "date"},
    "date_lengths": {"type": "string", "format": "date", "minLength": 10, "maxLength": 10},
    "date_time": {"type": "string", "format": "date-time"},
    "email": {"type": "string", "format": "email", "minLength": 3},
    "uuid": {"type": "string", "format": "uuid"},
    "ipv4": {"type": "string", "format": "ipv4"},
    "mixed_any_of": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 0, "maximum": 9}]},
    "untyped_bounds": {"minimum": 2, "maxLength": 1},
    "pydantic_like": _obj(
        {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
            "born": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
            "email": {"type": "string", "format": "email"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        },
        required=["id", "name", "age", "score", "born", "email", "tags"],
    ),
}
# rfc3339-validator (what jsonschema's FormatChecker uses for date-time when installed), verbatim, for when it isn't.
RFC3339 = re.compile(
    r"^(\d{4})-(0[1-9]|1[0-2])-(\d{2})T(?:[01]\d|2[0123]):(?:[0-5]\d):(?:[0-5]\d)(?:\.\d+)?"
    r"(?:Z|[+-](?:[01]\d|2[0123]):[0-5]\d)$",
    re.ASCII,
)


def _rfc3339(text: str) -> bool:
    try:
        from rfc3339_validator import validate_rfc3339
    except ImportError:
        m = RFC3339.match(text)
        return bool(m) and int(m[1]) > 0 and 1 <= int(m[3]) <= calendar.monthrange(int(m[1]), int(m[2]))[1]
    return validate_rfc3339(text)


def _check_value(value, schema) -> None:
    """jsonschema with its format checker, plus RFC 3339 for a top-level date-time (checked only when installed)."""
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    if schema.get("format") == "date-time":
        assert _rfc3339(value), value


@pytest.mark.parametrize("C", [8, 64])
@pytest.mark.parametrize("name", sorted(CONSTRAINED))
def test_constrained_outputs_always_validate(tok, name, C):
    schema = CONSTRAINED[name]
    try:
        tpl = compile_response_format(_rf(schema), tok, C, tok.eos_id)
    except UnsupportedSchema as e:  # only a value that cannot fit one small canvas may be refused
        assert C == 8 and "needs more than 8 tokens" in str(e), e
        return
    check_invariants(tpl, C, tok.eos_id)
    for seed in range(12):
        text = simulate(tpl, tok, C, seed, hostile=seed % 2 == 1)
        assert "\ufffd" not in text, text
        _check_value(json.loads(text), schema)


def test_slot_sizes_fit_the_longest_value(bundled):
    sizes = {}
    for name in ("int_point", "int_across_zero", "int_huge", "int_positive", "str_empty", "str_min_64", "date"):
        tpl = compile_response_format(_rf(CONSTRAINED[name]), bundled, 256, 1)
        sizes[name] = [len(s.plan) for s in tpl._slots]
    assert sizes == {
        "int_point": [1],
        "int_across_zero": [3],
        "int_huge": [26],
        "int_positive": [structured.INTEGER_TOKENS],
        "str_empty": [2],
        "str_min_64": [66],
        "date": [12],
    }


def test_hostile_logprobs_pick_the_boundaries(bundled):
    """Mass on a value just outside the range, or on a too-long string, still commits a valid one."""
    cases = [
        ({"type": "integer", "minimum": 0, "maximum": 99}, "100"),
        ({"type": "number", "exclusiveMaximum": 1}, "1.0"),
        ({"type": "number", "exclusiveMinimum": 0, "maximum": 5}, "0"),
        ({"type": "string", "maxLength": 2}, '"abc"'),
        ({"type": "string", "minLength": 4}, '"ab"'),
    ]
    for schema, wrong in cases:
        tpl = compile_response_format(_rf(schema), bundled, 16, 1)
        ids = bundled.encode(wrong, parse_special=False)
        lp = torch.full((16, bundled.vocab_size), -30.0)
        for i, t in enumerate(ids):
            lp[i, t] = 0.0
        picks = tpl.finalize(0, torch.log_softmax(lp, -1))
        text = bundled.decode([picks.get(p, tpl.fixed.get(p)) for p in range(tpl.length - 1)])
        jsonschema.validate(json.loads(text), schema)


def _accepts(dfa, text: str) -> bool:
    state = dfa.start
    for b in text.encode():
        state = int(dfa.table[state, b])
        if state < 0:
            return False
    return bool(dfa.accept[state])


@pytest.mark.parametrize(
    ("lo", "hi"), [(0, 0), (5, 5), (-5, -5), (-12, 345), (0, None), (None, 0), (None, -7), (7, 1000), (-999, -10)]
)
def test_integer_range_dfa_is_exact(lo, hi):
    dfa = structured._compile_rx(structured._int_rx(lo, hi))
    for v in range(-1300, 1300):
        assert _accepts(dfa, str(v)) == ((lo is None or v >= lo) and (hi is None or v <= hi)), v
    assert not any(_accepts(dfa, t) for t in ["-0", "01", "", "-", "1.0", "+1"])
    big = structured._compile_rx(structured._int_rx(-(10**20), 10**25))
    for v in [10**25, 10**25 + 1, -(10**20), -(10**20) - 1, 10**24 + 12345, 99999]:
        assert _accepts(big, str(v)) == (-(10**20) <= v <= 10**25)


def _decimal_texts(rng: random.Random) -> list[str]:
    texts = ["0", "-0", "1", "1.0", "1.5", "0.999999", "0.9999999", "2.", ".5", "1e3", "00.1", "-0.0", "0.000001"]
    for _ in range(2000):
        whole = str(rng.choice([0, 1, 2, 9, 10, 99, 100, rng.randint(0, 10**6)]))
        frac = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 8)))
        texts.append(rng.choice(["", "-"]) + whole + ("." + frac if frac else ""))
    return texts


@pytest.mark.parametrize(
    ("lo", "hi"), [(0, None), (1, None), (None, 0), (0, 10**6), (-(10**6), 10**6 - 1), (5, 7), (250000, 250000)]
)
def test_fixed_point_dfa_is_exact(lo, hi):
    digits = structured.NUMBER_FRACTION_DIGITS
    dfa = structured._compile_rx(structured._fixed_rx(lo, hi, digits))
    syntax = re.compile(rf"-?(0|[1-9][0-9]*)(\.[0-9]{{1,{digits}}})?")
    for text in _decimal_texts(random.Random(0)):
        ok = syntax.fullmatch(text) is not None and not re.fullmatch(r"-0(\.0*)?", text)
        if ok:
            v = fractions.Fraction(text) * 10**digits
            ok = (lo is None or v >= lo) and (hi is None or v <= hi)
        assert _accepts(dfa, text) == ok, text


def test_format_dfas_match_python():
    date = structured._compile_rx(structured._format_rx("date"))
    for year in [*range(1, 30), *range(1890, 2110, 3), 100, 400, 1600, 1700, 1900, 2000, 2400, 9999]:
        for month, day in itertools.product(range(14), range(33)):
            text = f"{year:04d}-{month:02d}-{day:02d}"
            try:
                want = bool(datetime.date(year, month, day))
            except ValueError:
                want = False
            assert _accepts(date, text) == want, text
    assert not _accepts(date, "0000-01-01")
    ipv4, rng = structured._compile_rx(structured._format_rx("ipv4")), random.Random(0)
    for _ in range(5000):
        parts = [
            rng.choice([str(rng.randint(0, 300)), f"0{rng.randint(0, 9)}", "00"])
            for _ in range(rng.choice([3, 4, 4, 5]))
        ]
        text = ".".join(parts)
        try:
            want = bool(ipaddress.IPv4Address(text))
        except ValueError:
            want = False
        assert _accepts(ipv4, text) == want, text
    ids = structured._compile_rx(structured._format_rx("uuid"))
    assert _accepts(ids, str(uuid.uuid4())) and _accepts(ids, str(uuid.uuid4()).upper())
    assert not _accepts(ids, uuid.uuid4().hex) and not _accepts(ids, "{" + str(uuid.uuid4()) + "}")
    email = structured._compile_rx(structured._format_rx("email"))
    assert _accepts(email, "a.b+c@x-y.org") and not any(_accepts(email, t) for t in ["a@", "@b", "a..b@c", "a b@c"])
    stamp = structured._compile_rx(structured._format_rx("date-time"))
    good = ["2024-02-29T23:59:59.123456+05:30", "2023-01-01T00:00:00Z", "0001-12-31T12:00:00-23:59"]
    bad = ["2023-02-29T00:00:00Z", "2023-01-01T24:00:00Z", "2023-01-01T00:00:60Z", "2023-01-01t00:00:00z"]
    assert all(_accepts(stamp, t) and _rfc3339(t) for t in good) and not any(_accepts(stamp, t) for t in bad)


@pytest.mark.parametrize("bounds", [(0, 0), (0, 1), (2, 2), (1, 4), (3, None), (0, 7)])
def test_counted_dp_matches_explicit_product(bounds):
    """The (state, count) graph's masks and Viterbi scores equal those of the explicitly expanded DFA."""
    tok = Tokenizer.from_dir(BUNDLED)
    lo, hi = bounds
    spec = structured._Scalar(frozenset({("strlen", lo, hi)}))
    fast = structured._lift(structured._compile_rx(spec.rx()), structured._vocab(tok), (lo, hi))
    slow = structured._expand_counter(fast)
    g = torch.Generator().manual_seed(lo * 10 + (hi or 9))
    for k in (1, 2, 3, 5, 8):
        plan = structured._slot_plan(fast, k)
        want = structured._slot_plan(slow, k)
        assert (plan is None) == (want is None) and (plan is None or (plan == want).all()), k
        if plan is None:
            continue
        for _ in range(3):
            best = np.where(plan, torch.randn(k, plan.shape[1], generator=g).double().numpy(), -math.inf)
            got = structured._counted_viterbi(fast, plan, best)
            ref = structured._viterbi(slow, want, best)
            assert sum(best[i, c] for i, c in enumerate(got)) == pytest.approx(
                sum(best[i, c] for i, c in enumerate(ref))
            )


def test_counted_finalize_matches_brute_force(bundled):
    k, schema = 4, {"type": "string", "minLength": 1, "maxLength": 2}
    cands = sorted(
        {i for text in ['"', "a", "ab", "\\", "n", " ", "\u00e9"] for i in bundled.encode(text, parse_special=False)}
    )
    tpl = compile_response_format(_rf(schema), bundled, k, 1)
    vocab = structured._vocab(bundled)

    def valid(data: bytes) -> bool:
        try:
            value = json.loads(data.decode("utf-8"))
        except ValueError:
            return False
        return isinstance(value, str) and 1 <= len(value) <= 2 and STRING_RE.fullmatch(data) is not None

    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        lp = torch.full((k, bundled.vocab_size), -math.inf)
        lp[:, cands] = torch.randn(k, len(cands), generator=g)
        best = max(
            sum(lp[i, t].item() for i, t in enumerate(seq))
            for seq in itertools.product(cands, repeat=k)
            if valid(b"".join(vocab.bytes[t] for t in seq))
        )
        picks = tpl.finalize(0, lp)
        assert sum(lp[i, picks[i]].item() for i in range(k)) == pytest.approx(best, abs=1e-5)


# --- scale ---------------------------------------------------------------------------------------------------------


def _big_byte_level_tokenizer(n: int = 262_144) -> Tokenizer:
    """A ByteLevel BPE tokenizer with n tokens: the 256 bytes plus random byte strings (no merges needed)."""
    chars = {b: c for c, b in structured._gpt2_byte_chars().items()}
    rng = random.Random(0)
    alphabet = bytes(range(32, 127)) * 3 + bytes(range(256))
    pieces = dict.fromkeys([*SPECIALS, *(chars[b] for b in range(256))])
    while len(pieces) < n:
        data = bytes(rng.choices(alphabet, k=rng.choice([2, 2, 3, 3, 4, 5, 6, 8, 12, 20])))
        pieces["".join(chars[b] for b in data)] = None
    tok = HFTokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return Tokenizer(tok, eos_token="<eos>")


def test_compile_speed_on_a_full_size_vocabulary():
    tok = _big_byte_level_tokenizer()
    assert tok.vocab_size == 262_144
    t0 = time.perf_counter()
    tpl = compile_response_format(_rf(SCHEMAS["person"]), tok, 256, tok.eos_id)
    first = time.perf_counter() - t0
    timings = []
    for name in ("person", "defs", "pydantic_optional"):
        t0 = time.perf_counter()
        compile_response_format(_rf(SCHEMAS[name]), tok, 256, tok.eos_id)
        timings.append(f"{name} {time.perf_counter() - t0:.3f}s")
    t0 = time.perf_counter()
    text = simulate(tpl, tok, 256, seed=0, hostile=True)
    fill = time.perf_counter() - t0
    jsonschema.validate(json.loads(text), SCHEMAS["person"])
    constrained = {"type": "array", "items": CONSTRAINED["pydantic_like"], "minItems": 2, "maxItems": 2}
    t0 = time.perf_counter()
    tpl = compile_response_format(_rf(constrained), tok, 256, tok.eos_id)  # bounds, lengths, formats: new DFAs
    fresh = time.perf_counter() - t0
    t0 = time.perf_counter()
    compile_response_format(_rf(constrained), tok, 256, tok.eos_id)
    cached = time.perf_counter() - t0
    assert cached < 0.5, cached
    _check_value(json.loads(simulate(tpl, tok, 256, seed=1, hostile=True)), constrained)
    print(
        f"\nV=262144: first compile {first:.2f}s (builds the tables); cached: {', '.join(timings)}; "
        f"simulated fill {fill:.2f}s; constrained schema {fresh:.2f}s fresh, {cached:.3f}s cached"
    )


def test_huge_multiple_of_is_refused_before_building(bundled):
    with pytest.raises(UnsupportedSchema, match="multipleOf"):
        compile_response_format(
            _rf({"type": "integer", "multipleOf": 999983, "minimum": 0, "maximum": 1e29}), bundled, 32, 1
        )


def test_huge_schema_is_refused_before_any_walk():
    """A schema with more JSON values than any template could hold is refused by a bounded count, before the
    metaschema check or the compiler (38,000 properties took over 10 s to compile only to be refused)."""
    from dgemma.structured import MAX_SCHEMA_NODES

    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(38_000)}}
    with pytest.raises(UnsupportedSchema, match=f"more than {MAX_SCHEMA_NODES} JSON values"):  # no tokenizer needed
        compile_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, None, 32, 1)
