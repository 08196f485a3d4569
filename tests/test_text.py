"""The one text layer (`text.TextStream`): stop strings held back until they resolve, the exact token budget,
EOS, UTF-8 characters split across tokens, O(n) incremental decoding, and the parser hook that sees special
markers while users do not."""

from __future__ import annotations

import pytest

from dgemma.chat import Delta
from dgemma.generate import Pipeline
from dgemma.text import TextStream


class CharTokenizer:
    """One character per token id (id = code point); ids below 32 are 'special' and skipped unless asked."""

    def __init__(self):
        self.calls = 0

    special_ids = frozenset(range(32))

    def decode(self, ids, skip_special=True):
        self.calls += len(ids)
        return "".join(chr(i) if i >= 32 else ("" if skip_special else f"<{i}>") for i in ids)

    def id_of(self, token):
        return int(token[1:-1]) if token.startswith("<") and token[1:-1].isdigit() else None


@pytest.mark.parametrize(
    "text, stop, expect",
    [
        ("abcdef", ["cd"], ["a", "b", "", "", "", "", ""]),  # "c" waits (it may start "cd"), then the stop hits
        ("abcxef", ["cd"], ["a", "b", "", "cx", "e", "f", ""]),  # held back, then released
        ("xyz", ["yz1"], ["x", "", "", "yz"]),  # a stop prefix left at the very end is flushed
    ],
)
def test_stop_holdback_is_append_only(text, stop, expect):
    ct = TextStream(CharTokenizer(), stop, max_tokens=100, eos_ids={0})
    deltas = [ct.push([ord(c)]) for c in text] + [ct.push([], "length")]
    assert deltas == expect


def test_max_tokens_truncates_and_utf8_is_never_split():
    ct = TextStream(CharTokenizer(), [], max_tokens=3, eos_ids={0})
    assert ct.push([ord("a"), ord("b")]) == "ab" and ct.push([ord("c"), ord("d")]) == "c"
    assert ct.finish_reason == "length" and ct.ids == [97, 98, 99]

    class Bytes:  # a tokenizer that can split a character across tokens
        def decode(self, ids, skip_special=True):
            return bytes(ids).decode("utf-8", errors="replace")

    ct = TextStream(Bytes(), [], max_tokens=10)
    euro = list("€".encode())
    assert ct.push(euro[:2]) == "" and ct.push(euro[2:]) == "€"


def test_eos_ends_the_text_and_is_hidden():
    ct = TextStream(CharTokenizer(), eos_ids={1})
    assert ct.push([ord("a"), 1, ord("b")]) == "a"
    assert ct.finish_reason == "stop" and ct.ids == [97, 1] and ct.push([ord("c")]) == ""


def test_stop_string_spanning_pushes_and_budget_finish():
    ct = TextStream(CharTokenizer(), ["END"], max_tokens=50)
    out = [ct.push([ord(c) for c in part]) for part in ["abE", "N", "Dxyz"]]
    assert out == ["ab", "", ""] and ct.text == "ab" and ct.finish_reason == "stop"
    ct = TextStream(CharTokenizer(), [], max_tokens=4)
    assert ct.push([ord(c) for c in "abcdefgh"]) == "abcd" and ct.finish_reason == "length"


def test_decoding_is_incremental():
    """Each push re-decodes only the tokens since the last stable point, not the whole output."""
    tok = CharTokenizer()
    ct = TextStream(tok)
    for _ in range(200):
        ct.push([ord("x")] * 8)
    assert ct.text == "x" * 1600 and tok.calls < 4 * 1600


class Recorder:
    """A parser that sees raw text (its marker <5> included, other specials not) and shows upper case."""

    markers = ("<5>",)

    def __init__(self):
        self.raw = ""

    def feed(self, raw):
        self.raw += raw
        return Delta(content=raw.replace("<5>", "").upper(), reasoning="r" * raw.count("<5>"))

    def finish(self):
        return Delta(content="!")


def test_parser_sees_its_markers_users_do_not():
    rec = Recorder()
    ct = TextStream(CharTokenizer(), parser=rec)
    d = ct.push_delta([ord("a"), 5, 6, ord("b")])
    assert d.content == "AB" and d.reasoning == "r"
    assert ct.push([], "stop") == "!" and rec.raw == "a<5>b" and ct.text == "AB!" and ct.reasoning == "r"
    plain = TextStream(CharTokenizer())
    assert plain.push([ord("a"), 5, ord("b")]) == "ab"  # without a parser, special tokens are decoded away


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_real_tokenizer_streams_the_same_text_in_any_chunking(chunk):
    tok = Pipeline.load(device="cpu").tokenizer
    text = "Grüße, 世界! In the beginning — “quoted” text\n\twith tabs ✓"
    ids = tok.encode(text)
    ct = TextStream(tok)
    got = "".join(ct.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)) + ct.push([], "stop")
    assert got == tok.decode(ids) == text
