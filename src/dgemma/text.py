"""The one detokenizer: output token ids in, append-only user text out (used by `stream_generate`, the CLI and the
server alike).

`TextStream` decodes incrementally (only the tokens since the last stable point are re-decoded, so a long answer
costs O(n), and a multi-byte character split across tokens is held back until it completes), enforces an exact
token budget (never more new tokens than asked, finish_reason "length") and EOS, and cuts at stop strings (a tail
that could still become a stop string is held back until it resolves, so sent text is never retracted).

Special tokens: without a parser they are decoded away (users never see `<eos>`). With a parser
(`chat.ChatParser`), the special tokens whose text is one of `parser.markers` are kept in the raw text (every other
special token is still dropped) and `OutputParser.feed` splits it into a `chat.Delta`: content, reasoning, tool
calls. Stop strings and the held-back tail apply to the content only. This module knows no torch, no model and no
HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from .chat import Delta


class OutputParser(Protocol):
    """Turns raw decoded text (its `markers` included) into content, reasoning and tool calls, incrementally."""

    markers: tuple[str, ...]  # special-token texts the parser must see in the raw text

    def feed(self, raw: str) -> Delta:
        """Consume the next raw text; return what can no longer change (may hold some back)."""

    def finish(self) -> Delta:
        """The end of the output: return whatever was held back."""


class TextStream:
    """One output's text. `push(ids)` appends tokens and returns the newly visible content (`push_delta`: the whole
    `Delta`, with reasoning and tool calls when a parser is set); `finish_reason` is set once the output ended:
    "stop" (EOS or a stop string) or "length" (budget), or whatever `push(final=reason)` gave."""

    def __init__(
        self,
        tokenizer,
        stop: Iterable[str] = (),
        max_tokens: int | None = None,
        eos_ids: Iterable[int] = (),
        parser: OutputParser | None = None,
    ):
        self.tokenizer, self.stop, self.max_tokens = tokenizer, [s for s in stop if s], max_tokens
        self.eos, self.parser = set(eos_ids), parser
        self.ids: list[int] = []
        self.text = ""  # visible content sent so far
        self.reasoning = ""  # reasoning sent so far (with a parser)
        self.tool_calls: list = []  # tool calls parsed so far (with a parser)
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None  # the stop string that ended the output, if one did
        self._prefix = self._read = 0  # decode window: ids[_prefix:_read] is already turned into text
        self._held = ""  # visible text withheld: it may be the start of a stop string
        self._drop: frozenset[int] = frozenset()  # special ids decoded away even with a parser
        if parser is not None and tokenizer is not None:
            keep = {tokenizer.id_of(m) for m in parser.markers}
            self._drop = frozenset(tokenizer.special_ids - keep)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, ids: Iterable[int], final: str | None = None) -> str:
        """Append output tokens; `final`: the generation ended with this reason. Returns the new visible content."""
        return self.push_delta(ids, final).content

    def push_delta(self, ids: Iterable[int], final: str | None = None) -> Delta:
        """`push`, returning content, reasoning and tool calls."""
        if self.finished:
            return Delta()
        ids = list(ids)
        if (cut := next((i + 1 for i, t in enumerate(ids) if t in self.eos), None)) is not None:
            ids, final = ids[:cut], "stop"
        if self.max_tokens is not None and len(self.ids) + len(ids) >= self.max_tokens:
            ids = ids[: self.max_tokens - len(self.ids)]
            final = final or "length"
        self.ids += ids
        raw = self._decode(final is not None)
        if self.parser is None:
            pieces = [("content", raw)]
        else:
            parsed = self.parser.feed(raw)
            if final is not None:
                parsed += self.parser.finish()
            pieces = parsed.pieces
        out = Delta()
        for kind, value in pieces:  # in the order written: a stop string in the content cuts all that follows
            if kind == "content":
                out.content += self._emit(self._held + value, None)
                if self.stop_sequence is not None:
                    break
            elif kind == "reasoning":
                out.reasoning += value
            else:
                out.tool_calls.append(value)
        if self.stop_sequence is None:
            out.content += self._emit(self._held, final)
        self.reasoning += out.reasoning
        self.tool_calls += out.tool_calls
        return Delta(out.content, out.reasoning, out.tool_calls)

    def _decode(self, final: bool) -> str:
        """Text of the tokens since the last stable point (vLLM-style prefix/read offsets: decoders that strip a
        leading space or merge bytes see the same context both times)."""
        if self.tokenizer is None or self._read == len(self.ids):
            return ""
        skip = self.parser is None
        window = self.ids[self._prefix :] if skip else [t for t in self.ids[self._prefix :] if t not in self._drop]
        stable = self._read - self._prefix
        if not skip:
            stable = sum(t not in self._drop for t in self.ids[self._prefix : self._read])
        before = self.tokenizer.decode(window[:stable], skip_special=skip)
        after = self.tokenizer.decode(window, skip_special=skip)
        if not final and after.endswith("\ufffd"):
            return ""  # a multi-byte character continues in the next tokens
        self._prefix, self._read = self._read, len(self.ids)
        return after.removeprefix(before)

    def _emit(self, pending: str, final: str | None) -> str:
        """Send what of `pending` (held-back text first) can no longer become a stop string; cut at one."""
        self._held = ""
        hits = [(i, k) for k, i in enumerate(pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            cut, k = min(hits)
            pending, final, self.stop_sequence = pending[:cut], "stop", self.stop[k]
        held = 0 if final is not None else self._held_back(pending)
        out, self._held = pending[: len(pending) - held], pending[len(pending) - held :]
        self.text += out
        self.finish_reason = final
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
