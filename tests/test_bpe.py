"""Fast checks of the byte-level BPE tokenizer (trains on a tiny sample)."""

import gzip
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dgemma.bpe import (
    CHAT_TOKENS,
    SPECIAL_TOKENS,
    load_corpus_lines,
    train_bpe,
)

SAMPLE = [
    "In the beginning, God created the heavens and the earth.",
    "The earth was formless and empty. Darkness was on the surface of the deep.",
    "God said, “Let there be light,” and there was light.",
    "There was evening and there was morning, the first day.",
] * 20
VOCAB = 400


@pytest.fixture(scope="module")
def tok():
    return train_bpe(SAMPLE, vocab_size=VOCAB)


def test_special_token_ids(tok):
    for i, t in enumerate(SPECIAL_TOKENS + CHAT_TOKENS):
        assert tok.token_to_id(t) == i
    assert [tok.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>")] == [0, 1, 2]
    assert tok.encode("<bos>hi<|turn><eos>").ids[0] == 2


@pytest.mark.parametrize(
    "text",
    [
        "In the beginning, God created the heavens and the earth.",
        "  leading spaces,\ttabs\nand newlines\r\n ",
        "Ünïcödé: 日本語テキスト, עברית, 😀👍🏽, e\u0301, \u200b, \x00\x7f",
        "",
    ],
)
def test_roundtrip_lossless(tok, text):
    ids = tok.encode(text).ids
    assert 3 not in ids  # byte-level: no <unk>
    assert tok.decode(ids) == text


def test_vocab_size_bound(tok):
    assert 256 + len(SPECIAL_TOKENS) + len(CHAT_TOKENS) < tok.get_vocab_size() <= VOCAB


def test_deterministic(tok):
    again = train_bpe(SAMPLE, vocab_size=VOCAB)
    assert again.get_vocab() == tok.get_vocab()
    assert again.to_str() == tok.to_str()


def test_load_corpus_lines(tmp_path):
    lines = ["first line", "second “line”"]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert load_corpus_lines(tmp_path / "a.txt") == lines
    assert load_corpus_lines(tmp_path / "a.txt.gz") == lines
