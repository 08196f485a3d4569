"""Gemma 4's chat protocol on text: tool-call arguments, and the parser that splits an answer into content,
reasoning and tool calls (pure functions plus a streaming state machine for the text layer).

The model writes, in its own turn:
- thinking as `<|channel>thought\\n ... <channel|>` before the answer;
- a tool call as `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:42,flag:true,obj:{...},arr:[...]}<tool_call|>`.

`parse_arguments` reads that argument syntax (and JSON, which forced calls use: see
`structured.tool_call_layout`) into Python values; `format_value` writes it. `ChatParser` is a `text.OutputParser`:
it is fed the raw decoded text (the markers kept: the text layer drops every other special token) in arbitrary
pieces, and returns what is final as a `Delta`. A tail that could still become a marker is held back, so a marker
split across steps or canvases is never shown; a tool call is released whole once its closing marker arrived.
A call that does not parse falls back to content (with a logged warning), never an error. Nothing here knows
tokens, torch or HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import secrets
from typing import Self

log = logging.getLogger(__name__)

QUOTE = '<|"|>'
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
THINK = "<|think|>"
THOUGHT_LABEL = "thought\n"
# markers the parser must see as text (the text layer keeps these special tokens and drops the others)
MARKERS = (QUOTE, CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, CALL_CLOSE)
NAME = re.compile(r"[A-Za-z_][\w\-.:]*")  # function names, namespaced MCP names (a.b:c-d) included
MAX_DEPTH = 64


class ArgumentError(ValueError):
    """Tool-call arguments that are not in Gemma's syntax (or JSON)."""


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: dict  # parsed; `arguments_json` is what OpenAI's wire format carries
    id: str = dataclasses.field(default_factory=lambda: "call_" + secrets.token_hex(12))

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclasses.dataclass
class Delta:
    """What became final in one push: visible content, reasoning, and completed tool calls; `pieces` keeps them in
    the order the model wrote them ("content" | "reasoning" | "call", value), so the text layer can cut all that
    follows a stop string."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    pieces: list[tuple[str, object]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pieces:
            self.pieces = [("content", self.content)] if self.content else []
            self.pieces += [("reasoning", self.reasoning)] if self.reasoning else []
            self.pieces += [("call", c) for c in self.tool_calls]

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def __iadd__(self, other: Delta) -> Self:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls
        self.pieces += other.pieces
        return self


# --- arguments ------------------------------------------------------------------------------------------------------
def format_value(value) -> str:
    """A Python value in Gemma's argument syntax (strings between <|"|>, keys bare)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if value is True or value is False or value is None:
        return json.dumps(value)
    return json.dumps(value)


def parse_arguments(text: str) -> dict:
    """`{key:value,...}` in Gemma's syntax (or JSON) -> dict. Values: <|"|>strings<|"|> (raw: quotes and
    backslashes inside are plain characters), "JSON strings", numbers, true/false, null/none/nil, nested objects
    and arrays; a bare word is a string. Raises ArgumentError."""
    p = _Reader(text)
    p.ws()
    value = p.value(0)
    p.ws()
    if not isinstance(value, dict):
        raise ArgumentError("arguments must be an object {...}")
    if p.i != len(text):
        raise ArgumentError(f"unexpected text after the arguments at {p.i}: {text[p.i : p.i + 20]!r}")
    return value


class _Reader:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def fail(self, what: str):
        raise ArgumentError(f"{what} at {self.i}: {self.s[self.i : self.i + 20]!r}")

    def value(self, depth: int):
        if depth > MAX_DEPTH:
            self.fail("arguments nested too deeply")
        s, i = self.s, self.i
        if s.startswith(QUOTE, i):
            end = s.find(QUOTE, i + len(QUOTE))
            if end < 0:
                self.fail("unterminated string")
            self.i = end + len(QUOTE)
            return s[i + len(QUOTE) : end]
        if i < len(s) and s[i] == '"':
            try:
                value, self.i = json.JSONDecoder().raw_decode(s, i)
            except json.JSONDecodeError:
                self.fail("bad JSON string")
            return value
        if i < len(s) and s[i] == "{":
            return self.members(depth)
        if i < len(s) and s[i] == "[":
            return self.items(depth)
        return self.bare()

    def members(self, depth: int) -> dict:
        self.i += 1
        out: dict = {}
        self.ws()
        if self.s.startswith("}", self.i):
            self.i += 1
            return out
        while True:
            self.ws()
            key = self.key()
            self.ws()
            if not self.s.startswith(":", self.i):
                self.fail("expected ':'")
            self.i += 1
            self.ws()
            out[key] = self.value(depth + 1)
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
                continue
            if self.s.startswith("}", self.i):
                self.i += 1
                return out
            self.fail("expected ',' or '}'")

    def key(self) -> str:
        s, i = self.s, self.i
        if s.startswith(QUOTE, i) or s.startswith('"', i):
            key = self.value(0)
            if not isinstance(key, str):
                self.fail("bad key")
            return key
        j = i
        while j < len(s) and s[j] not in ':,{}[]"' and not s.startswith(QUOTE, j):
            j += 1
        key = s[i:j].strip()
        if not key:
            self.fail("expected a key")
        self.i = j
        return key

    def items(self, depth: int) -> list:
        self.i += 1
        out: list = []
        self.ws()
        if self.s.startswith("]", self.i):
            self.i += 1
            return out
        while True:
            self.ws()
            out.append(self.value(depth + 1))
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
                continue
            if self.s.startswith("]", self.i):
                self.i += 1
                return out
            self.fail("expected ',' or ']'")

    def bare(self):
        s, i = self.s, self.i
        j = i
        while j < len(s) and s[j] not in ",}]" and not s.startswith(QUOTE, j):
            j += 1
        word = s[i:j].strip()
        if not word:
            self.fail("expected a value")
        self.i = j
        low = word.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("null", "none", "nil"):
            return None
        try:
            number = json.loads(word)
            if isinstance(number, int) or (isinstance(number, float) and math.isfinite(number)):
                return number
        except ValueError:
            pass
        return word  # a bare word (or a number JSON cannot carry: 1e400, NaN): the model meant a string


def parse_call(body: str) -> ToolCall:
    """`call:NAME{...}` (the text between <|tool_call> and <tool_call|>) -> ToolCall; raises ArgumentError."""
    text = body.strip()
    if text.startswith("call:"):
        text = text[len("call:") :]
    elif text.startswith(":"):  # '<|tool_call>:name{' has been seen without "call"
        text = text[1:]
    m = NAME.match(text.lstrip())
    if m is None:
        raise ArgumentError(f"no function name in {body[:40]!r}")
    rest = text.lstrip()[m.end() :]
    args = parse_arguments(rest) if rest.strip() else {}
    return ToolCall(m.group(0), args)


# --- whole outputs --------------------------------------------------------------------------------------------------
def parse_output(text: str, tools: bool = True) -> Delta:
    """A finished answer's raw text -> content, reasoning and tool calls (the streaming parser in one go)."""
    parser = ChatParser(tools)
    out = parser.feed(text)
    out += parser.finish()
    return out


def strip_thinking(text: str) -> str:
    """A past model turn without its thought channel(s) (the template shows history without thinking)."""
    return re.sub(re.escape(CHANNEL_OPEN) + r".*?(" + re.escape(CHANNEL_CLOSE) + r"|$)", "", text, flags=re.DOTALL)


class ChatParser:
    """Streaming split of raw model text into content, reasoning and tool calls (a `text.OutputParser` whose
    `feed`/`finish` return `Delta`s). `tools`: parse tool calls (off: a call stays content)."""

    markers = MARKERS

    def __init__(self, tools: bool = True):
        self.tools = tools
        self.state = "content"  # content | label | reasoning | call
        self.buf = ""
        self.calls = 0

    def feed(self, raw: str) -> Delta:
        self.buf += raw
        out = Delta()
        while True:
            before = (self.state, len(self.buf))
            out += getattr(self, "_" + self.state)(final=False)
            if (self.state, len(self.buf)) == before:
                return out

    def finish(self) -> Delta:
        out = self.feed("")
        out += getattr(self, "_" + self.state)(final=True)
        self.state = "content"
        return out

    # --- states: each consumes what it can from buf, maybe switching state ----------------------------------------
    def _content(self, final: bool) -> Delta:
        opens = [CHANNEL_OPEN, CHANNEL_CLOSE] + ([CALL_OPEN] if self.tools else [])
        hits = [(self.buf.find(m), m) for m in opens]
        hits = [(i, m) for i, m in hits if i >= 0]
        if hits:
            i, m = min(hits)
            text, self.buf = self.buf[:i], self.buf[i + len(m) :]
            # a stray <channel|> (a thought channel a tool call interrupted) closes nothing and is dropped
            self.state = {CHANNEL_OPEN: "label", CHANNEL_CLOSE: "content", CALL_OPEN: "call"}[m]
            return Delta(content=text)
        keep = 0 if final else _partial_tail(self.buf, opens)
        text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return Delta(content=text)

    def _label(self, final: bool) -> Delta:
        """Right after <|channel>: drop the channel's role label ("thought\\n") once it is certain."""
        if self.buf.startswith(THOUGHT_LABEL):
            self.buf = self.buf[len(THOUGHT_LABEL) :]
        elif THOUGHT_LABEL.startswith(self.buf) and not final:
            return Delta()  # "thou...": wait
        self.state = "reasoning"
        return Delta()

    def _reasoning(self, final: bool) -> Delta:
        ends = [CHANNEL_CLOSE] + ([CALL_OPEN] if self.tools else [])
        hits = [(i, m) for i, m in ((self.buf.find(m), m) for m in ends) if i >= 0]
        if hits:  # whichever comes first: the channel's end, or a tool call straight out of the reasoning
            i, m = min(hits)
            text, self.buf = self.buf[:i], self.buf[i + len(m) :]
            self.state = "content" if m == CHANNEL_CLOSE else "call"
            return Delta(reasoning=text)
        keep = 0 if final else _partial_tail(self.buf, ends)
        text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return Delta(reasoning=text)

    def _call(self, final: bool) -> Delta:
        i = self.buf.find(CALL_CLOSE)
        if i < 0 and not final:
            return Delta()  # a call is released whole
        body = self.buf if i < 0 else self.buf[:i]
        self.buf = "" if i < 0 else self.buf[i + len(CALL_CLOSE) :]
        self.state = "content"
        try:
            call = parse_call(body)
        except ArgumentError as e:
            log.warning("tool call does not parse (%s); returned as content", e)
            return Delta(content=CALL_OPEN + body + (CALL_CLOSE if i >= 0 else ""))
        self.calls += 1
        return Delta(tool_calls=[call])


def _partial_tail(text: str, markers) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best
