"""`dgemma chat`: an interactive terminal chat over `Pipeline.stream_generate`.

Each turn re-renders the whole history with the checkpoint's own chat template (system, user and assistant
messages; `enable_thinking` with --think) and streams the reply as settled text, split by `chat.ChatParser` into
the answer, dimmed reasoning and tool calls. A `PrefixCache` with block = canvas length carries the encoder KV of
earlier prompts, so turn 2 re-encodes only what turn 1 did not already see. Ctrl-C during a reply sets a flag that
the event loop checks after every denoising step (so it never interrupts torch mid-update); `/reset`, `/exit`,
`/quit` and `/help` are the commands (see HELP).

What it deliberately does not do: declare tools (a call the model writes anyway is printed and kept in the
history), read multi-line input, or save transcripts. Torch loads only when the command runs, so importing this
module (from `dgemma --help`) stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable

from .cli import (
    EXIT_CHECKPOINT,
    CanvasView,
    CliError,
    add_knob_arguments,
    add_model_arguments,
    knobs_from,
    load_pipeline,
    printable,
    seed_of,
)

PROMPT = "you> "
CACHE_BYTES = 1 << 30  # the prefix cache's bound, as `dgemma serve --prefix-cache-mb 1024`
EMPTY_REDRAWS = 2  # the empty-reply guard's default here (as dgemma serve); --empty-redraws overrides it
HELP = """\
commands:
  /reset         start a new conversation (--system stays; the prompt cache stays warm)
  /exit, /quit   leave (so do Ctrl-D, and Ctrl-C twice in a row at the prompt)
  /help          this list
  //text         send a message that starts with "/"
keys:
  Ctrl-C during a reply   stops it; the text shown so far stays in the history as the model's turn
                          (nothing shown yet: the whole turn is dropped)
  Ctrl-C at the prompt    clears the line; a second Ctrl-C in a row quits
  Up/Down, Ctrl-R         this session's input history (readline)"""
DIM, RESET = "\x1b[2m", "\x1b[0m"


# --- pure parts: commands, replies, history ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Command:
    kind: str  # say | reset | exit | help | empty | unknown
    text: str = ""  # the message for "say", the command word for "unknown"


def parse_line(line: str) -> Command:
    """One input line -> what to do. A line starting with "//" is a message starting with "/"."""
    text = line.strip()
    if not text:
        return Command("empty")
    if text.startswith("//"):
        return Command("say", text[1:])
    if not text.startswith("/"):
        return Command("say", text)
    word = text.split()[0].lower()
    kind = {"/reset": "reset", "/exit": "exit", "/quit": "exit", "/help": "help", "/?": "help"}.get(word)
    return Command(kind, "") if kind else Command("unknown", word)


@dataclasses.dataclass
class Reply:
    """What one reply produced: its answer, reasoning and tool calls, and how it ended."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list = dataclasses.field(default_factory=list)  # chat.ToolCall
    interrupted: bool = False
    result: object = None  # the GenerationResult (None when interrupted)

    def add(self, delta) -> None:
        self.content += delta.content
        self.reasoning += delta.reasoning
        self.tool_calls += delta.tool_calls

    def message(self) -> dict | None:
        """The assistant turn for the history (its thinking left out, as the template shows past turns), or None
        when there is nothing to keep."""
        if not self.content and not self.tool_calls:
            return None
        msg: dict = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [
                {"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return msg


@dataclasses.dataclass
class Conversation:
    """The history the template re-renders every turn: an optional system message, then user/assistant turns."""

    system: str | None = None
    turns: list[dict] = dataclasses.field(default_factory=list)

    def messages(self, user: str | None = None) -> list[dict]:
        """The messages for the next prompt (with `user`, the message being answered)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + ([{"role": "user", "content": user}] if user is not None else [])

    def add(self, user: str, reply: Reply) -> bool:
        """Keep a finished (or stopped) exchange; a reply with nothing to keep drops the whole turn."""
        msg = reply.message()
        if msg is None:
            return False
        self.turns += [{"role": "user", "content": user}, msg]
        return True

    def reset(self) -> None:
        self.turns.clear()


def stat_line(result, cache: bool = True) -> str:
    """The one dim line after a reply: tokens, speed, prompt tokens reused from the cache, seed."""
    parts = [
        f"{len(result.token_ids)} tokens",
        f"{result.tokens_per_s:.1f} tok/s",
        f"{result.total_s:.2f} s",
        f"prompt {len(result.prompt_ids)} tokens, {result.cached_tokens} cached" if cache else "no cache",
        f"seed {result.seed}",
    ]
    if result.empty_redraws:
        parts.append(f"{result.empty_redraws} empty re-draw(s)")
    if result.finish_reason == "length":
        parts.append("cut at the token budget (-n)")
    return "[" + " · ".join(parts) + "]"


# --- the terminal ----------------------------------------------------------------------------------------------------
class Printer:
    """Writes a reply as it streams: reasoning dimmed after a "thinking:" mark, then the answer, tool calls on
    their own lines. Plain text (no escapes) when the stream is not a colour terminal."""

    def __init__(self, out, color: bool):
        self.out, self.color = out, color
        self.mode: str | None = None  # reasoning | content | None (nothing written yet, or after a tool call)
        self.last = "\n"

    def write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.last = text[-1]

    def dim(self, text: str) -> str:
        return f"{DIM}{text}{RESET}" if self.color else text

    def _switch(self, mode: str | None) -> None:
        if mode == self.mode:
            return
        if self.last != "\n":
            self.write("\n")
        if mode == "reasoning":
            self.write(self.dim("thinking: "))
        self.mode = mode

    def delta(self, delta) -> None:
        if delta.reasoning:
            self._switch("reasoning")
            self.write(self.dim(printable(delta.reasoning)))
        if delta.content:
            self._switch("content")
            self.write(printable(delta.content))
        for call in delta.tool_calls:
            self._switch(None)
            self.write(f"tool call: {call.name} {json.dumps(call.arguments, ensure_ascii=False)}\n")

    def end(self, note: str = "") -> None:
        if note:
            self.write(("" if self.last == "\n" else " ") + self.dim(note))
        if self.last != "\n":
            self.write("\n")
        self.mode, self.last = None, "\n"


@contextlib.contextmanager
def stop_on_interrupt():
    """While a reply is generated, the first Ctrl-C only sets the flag (checked between denoising steps); a second
    one raises KeyboardInterrupt at once. The previous handler is back afterwards."""
    stop: list[bool] = []

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatSession:
    """One conversation with a loaded pipeline: `reply(text)` streams one answer and keeps it in the history."""

    def __init__(self, pipe, args: argparse.Namespace, out=None, err=None):
        from .cache import PrefixCache

        self.pipe, self.args = pipe, args
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.conversation = Conversation(args.system)
        self.knobs = knobs_from(args)
        if self.knobs.get("empty_redraws") is None:
            self.knobs["empty_redraws"] = EMPTY_REDRAWS
        self.cache = PrefixCache(0 if args.no_cache else CACHE_BYTES, pipe.canvas_length)
        color = self.out.isatty() and "NO_COLOR" not in os.environ
        self.printer = Printer(self.out, color)
        self.err_color = self.err.isatty() and "NO_COLOR" not in os.environ

    def note(self, text: str) -> None:
        """A dim line on stderr (after the reply's stdout is flushed, so the two never interleave)."""
        self.out.flush()
        print(f"{DIM}{text}{RESET}" if self.err_color else text, file=self.err, flush=True)

    def reply(self, text: str) -> Reply:
        from .chat import ChatParser
        from .generate import Settle

        ids = self.pipe.prompt_ids(messages=self.conversation.messages(text), enable_thinking=self.args.think)
        # draft: a StepEvent every step, for the canvas view and so that a Ctrl-C is noticed after each step
        request = self.pipe.request(prompt_ids=ids, seed=seed_of(self.args), settle=Settle(), draft=True, **self.knobs)
        events = self.pipe.stream_generate(request=request, prefix_cache=self.cache, parser=ChatParser())
        reply = Reply()
        view = self._canvas_view(text)
        with stop_on_interrupt() as stop:
            try:
                with view or contextlib.nullcontext():
                    self._consume(events, reply, view, stop)
            except KeyboardInterrupt:  # a second Ctrl-C, inside a step
                reply.interrupted = True
            finally:
                events.close()
        if view is not None:  # the live canvas was transient: now the reply itself
            self.printer.delta(reply)
        self.printer.end("[stopped]" if reply.interrupted else "")
        self.conversation.add(text, reply)
        if reply.result is not None and not self.args.quiet:
            self.note(stat_line(reply.result, not self.args.no_cache))
        return reply

    def _consume(self, events, reply: Reply, view, stop: list) -> None:
        from .generate import CanvasEvent, GenerationResult, SettleEvent, StepEvent

        for event in events:
            if stop:
                reply.interrupted = True
                return
            if isinstance(event, GenerationResult):
                reply.result = event
                continue
            if view is not None and isinstance(event, (StepEvent, CanvasEvent)):
                view.update(event)
            if isinstance(event, (SettleEvent, CanvasEvent)) and event.delta:
                reply.add(event.delta)
                if view is None:
                    self.printer.delta(event.delta)

    def _canvas_view(self, text: str):
        if not self.args.canvas:
            return None
        return CanvasView(self.pipe.tokenizer, text + "\n")


def repl(session: ChatSession, read: Callable[[str], str] = input, echo: bool = False) -> int:
    """Read lines until /exit, EOF or two Ctrl-C in a row; answer each message. Returns the exit code (0).
    `echo`: repeat each line read (input that is not a terminal is not echoed, so a transcript needs it)."""
    interrupted = False
    while True:
        try:
            line = read(PROMPT)
            if echo:
                session.out.write(line + "\n")
        except EOFError:
            session.out.write("\n")
            return 0
        except KeyboardInterrupt:
            if interrupted:
                session.out.write("\n")
                return 0
            interrupted = True
            session.out.write("\n")
            session.note("(line cleared; Ctrl-C again or /exit to quit)")
            continue
        interrupted = False
        try:
            _run_command(session, parse_line(line))
        except _Exit:
            return 0
        except KeyboardInterrupt:  # a Ctrl-C outside input() and outside a reply's own handler (e.g. mid-print)
            session.out.write("\n")


class _Exit(Exception):
    pass


def _run_command(session: ChatSession, cmd) -> None:
    from .config import ConfigError

    if cmd.kind == "exit":
        raise _Exit
    if cmd.kind == "help":
        session.note(HELP)
    elif cmd.kind == "reset":
        session.conversation.reset()
        session.note("(new conversation)")
    elif cmd.kind == "unknown":
        session.note(f"unknown command {cmd.text}; /help lists them (//text sends a message starting with /)")
    elif cmd.kind == "say":
        try:
            session.reply(cmd.text)
        except ConfigError as e:  # e.g. the history outgrew the model's positions: the turn is dropped
            session.note(f"error: {' '.join(str(e).split())} (/reset starts over)")


# --- the subcommand ----------------------------------------------------------------------------------------------------
def add_chat_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat in the terminal",
        description="An interactive chat. Replies stream as settled text; the history is re-rendered with the\n"
        "checkpoint's chat template every turn, and earlier prompts' encoder KV is reused.\n\n" + HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--system", metavar="TEXT", help="system message (kept by /reset)")
    p.add_argument("--think", action="store_true", help="turn thinking on (enable_thinking); reasoning shows dimmed")
    p.add_argument("--canvas", action="store_true", help="redraw the denoising canvas live, then print the reply")
    p.add_argument("--no-cache", action="store_true", help="re-encode the whole history every turn (same output)")
    add_knob_arguments(p, with_json=False)
    p.add_argument("-q", "--quiet", action="store_true", help="no banner and no stat line after each reply")
    p.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from .config import ConfigError

    pipe = load_pipeline(args)
    if pipe.tokenizer is None:
        raise CliError("this checkpoint has no tokenizer.json; chat needs text", EXIT_CHECKPOINT)
    try:
        pipe.prompt_ids(messages=[{"role": "user", "content": "hi"}], enable_thinking=args.think)
    except ConfigError as e:
        raise CliError(str(e), EXIT_CHECKPOINT) from None
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (input() gets line editing and history)
    session = ChatSession(pipe, args)
    if not args.quiet:
        device = pipe.model.device.type
        session.note(f"dgemma chat · {pipe.model_dir.name} on {device} · /help for commands, Ctrl-D to quit")
    return repl(session, echo=not sys.stdin.isatty())
