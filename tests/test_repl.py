"""`dgemma chat`: the pure parts (commands, history, printing, the prompt loop) in process, replies from a tiny and a
scripted model in process, and the real program driven through a pseudo-terminal (typed lines, Ctrl-C as \\x03
through the line discipline, Ctrl-D)."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
from gemma4 import gemma4_checkpoint, scripted_pipeline

from dgemma.chat import ToolCall
from dgemma.cli import build_parser
from dgemma.generate import Pipeline
from dgemma.repl import DIM, PROMPT, ChatSession, Command, Conversation, Printer, Reply, parse_line, repl, stat_line

LONG = "Tell me about the weather in Paris and London today, with numbers, and what the city is like in the spring."
STAT = re.compile(r"\[(\d+) tokens · [\d.]+ tok/s · [\d.]+ s · prompt (\d+) tokens, (\d+) cached · seed (\d+)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return gemma4_checkpoint(tmp_path_factory.mktemp("chat"))


# --- pure parts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line, command",
    [
        ("hello", Command("say", "hello")),
        ("  hello there \n", Command("say", "hello there")),
        ("", Command("empty")),
        ("   ", Command("empty")),
        ("/reset", Command("reset")),
        (" /RESET now", Command("reset")),
        ("/exit", Command("exit")),
        ("/quit", Command("exit")),
        ("/help", Command("help")),
        ("/?", Command("help")),
        ("/frobnicate x", Command("unknown", "/frobnicate")),
        ("//etc/hosts is a file", Command("say", "/etc/hosts is a file")),
    ],
)
def test_parse_line(line, command):
    assert parse_line(line) == command


def test_conversation_keeps_turns_and_reset_keeps_the_system_message():
    conv = Conversation("be brief")
    assert conv.messages("hi") == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert conv.add("hi", Reply(content="hello", reasoning="they greet me"))
    assert conv.messages("again")[1:] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},  # no thinking in the history
        {"role": "user", "content": "again"},
    ]
    assert not conv.add("nothing", Reply(reasoning="only thoughts", interrupted=True))  # nothing to keep: dropped
    assert len(conv.turns) == 2
    conv.reset()
    assert conv.turns == [] and conv.messages() == [{"role": "system", "content": "be brief"}]
    assert Conversation().messages("x") == [{"role": "user", "content": "x"}]


def test_reply_with_a_tool_call_renders_with_the_template(checkpoint):
    call = ToolCall("get_weather", {"city": "Paris", "days": [1, 2]}, id="call_1")
    msg = Reply(content="Let me look.", tool_calls=[call]).message()
    assert msg["tool_calls"] == [
        {"type": "function", "id": "call_1", "function": {"name": "get_weather", "arguments": call.arguments}}
    ]
    conv = Conversation()
    conv.add("weather?", Reply(content="Let me look.", tool_calls=[call]))
    pipe = Pipeline.load(checkpoint, device="cpu")
    text = pipe.tokenizer.decode(pipe.prompt_ids(messages=conv.messages("thanks")), skip_special=False)
    assert '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:[1,2]}<tool_call|>' in text
    assert text.endswith("<|turn>user\nthanks<turn|>\n<|turn>model\n")


def test_printer_marks_reasoning_and_tool_calls():
    out = io.StringIO()
    p = Printer(out, color=False)
    p.delta(Reply(reasoning="hmm"))
    p.delta(Reply(reasoning=" ok", content="The answer"))
    p.delta(Reply(content=" is 42.\x1b[2J", tool_calls=[ToolCall("f", {"a": 1})]))
    p.end("[stopped]")
    assert out.getvalue() == 'thinking: hmm ok\nThe answer is 42.·[2J\ntool call: f {"a": 1}\n[stopped]\n'
    colored = io.StringIO()
    p = Printer(colored, color=True)
    p.delta(Reply(reasoning="hmm", content="yes"))
    p.end()
    assert colored.getvalue() == f"{DIM}thinking: \x1b[0m{DIM}hmm\x1b[0m\nyes\n"


def test_stat_line():
    class R:
        token_ids, prompt_ids, tokens_per_s, total_s = [1] * 7, [2] * 40, 12.34, 0.5678
        cached_tokens, seed, empty_redraws, finish_reason = 32, 5, 1, "length"

    line = stat_line(R())
    assert STAT.match(line).groups() == ("7", "40", "32", "5")
    assert "1 empty re-draw(s)" in line and "token budget" in line
    assert "no cache" in stat_line(R(), cache=False)


class FakeSession:
    """Records what `repl` asks of a session."""

    def __init__(self):
        self.out, self.notes, self.said = io.StringIO(), [], []
        self.conversation = Conversation()

    def note(self, text):
        self.notes.append(text)

    def reply(self, text):
        self.said.append(text)
        self.conversation.add(text, Reply(content="ok"))


def lines(*items):
    """A `read` for repl: each item is returned, or raised when it is an exception class."""
    items = list(items)

    def read(prompt):
        assert prompt == PROMPT
        item = items.pop(0)
        if isinstance(item, type):
            raise item()
        return item

    return read


def test_repl_commands_and_keys():
    s = FakeSession()
    assert repl(s, lines("hi", "", "/help", "/bogus", "/reset", "//x", "/exit", "never read")) == 0
    assert s.said == ["hi", "/x"] and len(s.conversation.turns) == 2  # /reset cleared "hi"; "//x" said after
    assert "/reset" in s.notes[0] and "unknown command /bogus" in s.notes[1] and s.notes[2] == "(new conversation)"
    s = FakeSession()
    assert repl(s, lines(KeyboardInterrupt, "hi", KeyboardInterrupt, KeyboardInterrupt, "never read")) == 0
    assert s.said == ["hi"] and sum("Ctrl-C again" in n for n in s.notes) == 2  # two presses in a row quit
    s = FakeSession()
    assert repl(s, lines("hi", EOFError), echo=True) == 0
    assert s.out.getvalue() == "hi\n\n"


# --- replies in process ----------------------------------------------------------------------------------------------
def chat_args(*argv: str):
    return build_parser().parse_args(["chat", *argv])


class Writes(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def test_replies_stream_and_turn_two_reuses_the_cache(checkpoint):
    pipe = Pipeline.load(checkpoint, device="cpu", dtype="float32")
    outputs = {}
    for cache in (True, False):
        out, err = Writes(), io.StringIO()
        session = ChatSession(pipe, chat_args("-n", "48", "-s", "1", *([] if cache else ["--no-cache"])), out, err)
        first, second = session.reply(LONG), session.reply("And tomorrow?")
        assert first.result.token_ids and second.result.token_ids
        stats = [STAT.match(line) for line in err.getvalue().splitlines()] if cache else []
        outputs[cache] = (first.result.token_ids, second.result.token_ids, out.getvalue())
        if cache:
            assert [int(m.group(3)) for m in stats] == [0, second.result.cached_tokens]
            assert second.result.cached_tokens > 0 and second.result.cached_tokens % pipe.canvas_length == 0
            assert len([w for w in out.writes if w.strip()]) >= 2  # one write per committed canvas at least
            assert [m["role"] for m in session.conversation.turns] == ["user", "assistant"] * 2
            assert session.conversation.turns[1]["content"] == first.content
    assert outputs[True] == outputs[False]  # seeded replies do not depend on the cache


def test_think_shows_reasoning_apart_and_keeps_it_out_of_the_history(tmp_path):
    answer = (
        '<|channel>thought\nLet me think.<channel|>The answer is 42.<|tool_call>call:f{x:<|"|>a b<|"|>}<tool_call|>'
    )
    pipe = scripted_pipeline(tmp_path, lambda context: answer)
    out, err = Writes(), io.StringIO()
    session = ChatSession(pipe, chat_args("--think", "-n", "64", "-s", "2", "-q"), out, err)
    reply = session.reply("What is six times seven?")
    assert out.getvalue() == 'thinking: Let me think.\nThe answer is 42.\ntool call: f {"x": "a b"}\n'
    assert reply.reasoning == "Let me think." and reply.result.finish_reason == "stop"
    assert session.conversation.turns[1]["content"] == "The answer is 42."
    assert err.getvalue() == ""  # -q: no stat line
    prompt = pipe.tokenizer.decode(pipe.prompt_ids(messages=session.conversation.messages("ok")), skip_special=False)
    assert "<|think|>" not in prompt and "Let me think" not in prompt  # the history is rendered without thinking


# --- the program through a pseudo-terminal ---------------------------------------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


# run in the child's new session (start_new_session): the pty on stdin becomes its controlling terminal, so \x03
# typed there is SIGINT, as in a real terminal; then it becomes `dgemma chat`
CTTY = "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.executable, sys.argv[1:])"


class Terminal:
    """`dgemma chat` on a pty: `send` types, `expect` waits for a pattern in the (ANSI-stripped) output."""

    def __init__(self, *args: str):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        env = {**os.environ, "TERM": "xterm", "DGEMMA_DEBUG": ""}
        env.pop("NO_COLOR", None)
        cmd = [sys.executable, "-c", CTTY, sys.executable, "-m", "dgemma", "chat", *args]
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.fd, self.seen, self.pos = master, "", 0

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the program closed the terminal
            return False
        self.seen += data.decode("utf-8", "replace")
        return bool(data)

    @property
    def text(self) -> str:
        return ANSI.sub("", self.seen)

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline or not self._read(min(1.0, max(deadline - time.monotonic(), 0.01))):
                raise AssertionError(f"{pattern!r} not seen; output after the last match:\n{self.text[self.pos :]}")

    def send(self, text: str) -> None:
        if text in ("\x03", "\x04"):
            # readline sets the terminal up with TCSAFLUSH, which drops input that arrived just before: a control
            # key typed the instant the prompt appears can be lost, so give the prompt a moment
            time.sleep(0.3)
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened = []

    def start(*args):
        opened.append(Terminal(*args))
        return opened[-1]

    yield start
    for t in opened:
        t.close()


def test_chat_in_a_terminal(checkpoint, terminal):
    t = terminal("--model", str(checkpoint), "-n", "32", "-s", "1", "--system", "You are terse.")
    t.expect(r"/help for commands")
    t.expect(re.escape(PROMPT))
    t.send(LONG + "\r")
    first = t.expect(STAT.pattern)
    assert first.group(3) == "0" and int(first.group(1)) > 0
    t.expect(re.escape(PROMPT))
    t.send("And tomorrow?\r")
    second = t.expect(r"(?s)And tomorrow\?\n(.+?)\n" + STAT.pattern)
    assert second.group(1).strip() and int(second.group(4)) > 0  # the reply streamed, the cache was used
    t.send("/reset\r")
    t.expect(r"\(new conversation\)")
    t.send(LONG + "\r")
    assert int(t.expect(STAT.pattern).group(3)) > 0  # /reset keeps the cache: the same first prompt hits it
    t.send("/help\r")
    t.expect(r"Ctrl-C during a reply")
    t.send("/exit\r")
    assert t.wait() == 0


def test_ctrl_c_stops_a_long_reply_and_the_chat_goes_on(checkpoint, terminal):
    # 40 canvases of 100 steps (~30 s on one core), and an EOS id the model cannot write: the reply is long
    t = terminal("--model", str(checkpoint), "-n", "640", "--steps", "100", "--eos-ids", "99999", "-s", "1")
    t.expect(re.escape(PROMPT))
    t.send(LONG + "\r")
    t.expect(re.escape(LONG) + r"\n")
    time.sleep(2.0)
    started = time.monotonic()
    t.send("\x03")
    t.expect(r"\[stopped\]\n", timeout=20)
    assert time.monotonic() - started < 15
    t.expect(re.escape(PROMPT))
    assert not STAT.search(t.text)  # a stopped reply has no stat line
    t.send("/help\r")
    t.expect(r"/reset")
    t.expect(re.escape(PROMPT))
    t.send("\x03")  # at the prompt: clears the line
    t.expect(r"Ctrl-C again")
    t.send("\x04")  # Ctrl-D: EOF
    assert t.wait() == 0


def test_canvas_view_and_double_ctrl_c(checkpoint, terminal):
    t = terminal("--model", str(checkpoint), "-n", "32", "-s", "1", "--canvas", "--think")
    t.expect(re.escape(PROMPT))
    t.send("hello\r")
    t.expect(STAT.pattern)
    assert "canvas 1 · step" in t.text  # the live canvas was drawn
    t.expect(re.escape(PROMPT))
    t.send("\x03")
    t.expect(r"Ctrl-C again")
    t.send("\x03")
    assert t.wait() == 0
