"""Structured output without a model: every template, filled from random or hostile log-probs, is valid JSON.

Generation is simulated canvas by canvas (random log-probs, the template's masks and pins, `finalize` at commit)
on the bundled byte-level BPE tokenizer and on a Gemma-style SentencePiece tokenizer built here (metaspace, byte
fallback); the decoded text must `json.loads` and pass `jsonschema.validate`. Also: refusals name their keyword,
the Viterbi pass matches brute force, the vectorized token lift matches a per-token walk, and a 262,144-token
vocabulary compiles quickly once its tables are cached.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import random
import re
import time

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
    ({"type": "integer", "minimum": 0}, "minimum", "$"),
    (_obj({"n": {"type": "number", "exclusiveMaximum": 3}}), "exclusiveMaximum", "$.properties.n"),
    (_obj({"n": {"type": "integer", "multipleOf": 2}}), "multipleOf", "$.properties.n"),
    (_obj({"s": {"type": "string", "maxLength": 3}}), "maxLength", "$.properties.s"),
    (_obj({"s": {"type": "string", "minLength": 3}}), "minLength", "$.properties.s"),
    (_obj({"code": {"type": "string", "pattern": "^[A-Z]+$"}}), "pattern", "$.properties.code"),
    (_obj({"when": {"type": "string", "format": "date-time"}}), "format", "$.properties.when"),
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
    print(
        f"\nV=262144: first compile {first:.2f}s (builds the tables); cached: {', '.join(timings)}; "
        f"simulated fill {fill:.2f}s"
    )
