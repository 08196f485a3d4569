"""Byte-level BPE tokenizer for the small bundled text-diffusion model.

Trains a GPT-2 style byte-level BPE with the Hugging Face ``tokenizers``
library and reads the plain-text corpus (one document per line, ``.txt`` or
``.txt.gz``). Special tokens come first, so their ids match Gemma's:
pad=0, eos=1, bos=2, unk=3, mask=4, then the chat markers ``<|turn>``=5 and
``<turn|>``=6. Byte-level means every string round-trips exactly and
``<unk>`` is never produced.

It does not add bos/eos, pad or truncate (the caller does), does not
normalize text, and is not compatible with Gemma's own SentencePiece
vocabulary; only the special-token ids are shared.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
CHAT_TOKENS = ["<|turn>", "<turn|>"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = range(len(SPECIAL_TOKENS))
TURN_START_ID, TURN_END_ID = range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + 2)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Train a deterministic byte-level BPE; ``vocab_size`` counts the specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_corpus_lines(path: str | Path) -> list[str]:
    """Non-empty lines (without newline) of a UTF-8 ``.txt`` or ``.txt.gz`` file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line]
