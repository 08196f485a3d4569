"""Tokenizer and chat template of a checkpoint directory (spec section e).

`tokenizer.json` through the `tokenizers` library; the chat template from `chat_template.jinja` or
`tokenizer_config.json`, rendered in jinja2's immutable sandbox under a time and output bound (`RENDER_SECONDS`,
`MAX_RENDER_CHARS`; arithmetic that would build huge values is refused), so a malicious template is a ConfigError,
never a pinned thread. Message *contents* are tokenized with special-token parsing switched off, so a user typing
`<turn|>` gets plain text, never a control id. Encoding goes through `encode_batch`, which releases the GIL (plain
`encode` holds it: a 1.9 MB word stalled every other thread for seconds). Nothing here runs code from the
checkpoint; nothing here touches torch.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import Tokenizer as HFTokenizer

from .config import ConfigError, read_file, read_json

MAX_TEMPLATE_CHARS = 200_000
RENDER_SECONDS, MAX_RENDER_CHARS = 2.0, 1 << 20  # message contents are placeholders here: real renders are small
MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.json (Gemma's: about 33 MB)
MAX_TOKENIZER_CONFIG_BYTES = 16 << 20  # tokenizer_config.json may carry thousands of added tokens
MAX_TEMPLATE_BYTES = 1 << 20  # chat_template.jinja (its text is capped at MAX_TEMPLATE_CHARS after decoding)
ROLES = ("system", "user", "assistant", "model")


class Tokenizer:
    """Encode/decode plus chat rendering; thread-safe."""

    def __init__(
        self,
        tok: HFTokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        self.tok, self.chat_template = tok, chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self._lock = threading.Lock()
        self._special: frozenset[int] | None = None
        self._max_chars: int | None = None
        self._template = None
        if chat_template is not None:
            if len(chat_template) > MAX_TEMPLATE_CHARS:
                raise ConfigError(f"chat template is larger than {MAX_TEMPLATE_CHARS} characters")
            env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            try:
                self._template = env.from_string(chat_template)
            except TemplateError as e:  # syntax errors surface here, at load, not at the first chat request
                raise ConfigError(f"chat template does not compile: {e}") from None
            except (RecursionError, MemoryError, ValueError, OverflowError) as e:
                raise ConfigError(f"chat template does not compile: {type(e).__name__}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer | None:
        """The directory's tokenizer, or None when it has no tokenizer.json (id-level use only)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not os.path.lexists(path):
            return None
        data = read_file(path, MAX_TOKENIZER_BYTES)  # regular, inside the directory, capped: or CheckpointError
        try:
            tok = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions for bad files
            raise ConfigError(f"{path} cannot be read: {str(e)[:200]}") from None
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = read_json(cfg_path, MAX_TOKENIZER_CONFIG_BYTES) if os.path.lexists(cfg_path) else {}
        template = _read_template(model_dir, cfg)
        return cls(tok, template, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        with self._lock:
            self.tok.encode_special_tokens = not parse_special
            try:
                ids = self.tok.encode_batch([text], add_special_tokens=False)[0].ids  # releases the GIL
            finally:
                self.tok.encode_special_tokens = False
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    @property
    def max_token_chars(self) -> int:
        """The most characters one token spells (an added token's content included): a text of N characters needs
        at least N / this many tokens, so a prompt that cannot fit is refused before it is tokenized."""
        if self._max_chars is None:
            added = [t.content for t in self.tok.get_added_tokens_decoder().values()]
            self._max_chars = max(map(len, [*self.tok.get_vocab(with_added_tokens=False), *added]), default=1)
        return self._max_chars

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special (control) tokens: never part of ordinary text."""
        if self._special is None:
            self._special = frozenset(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)
        return self._special

    def id_of(self, token: str) -> int | None:
        """The id of a token given by its text (special tokens included), or None."""
        return self.tok.token_to_id(token)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs,
    ) -> list[int]:
        """Render messages with the checkpoint's own template (Hugging Face's conventions: `tools` as
        [{"type": "function", "function": {...}}], assistant `tool_calls` with dict arguments, `tool` messages,
        template flags such as `enable_thinking` in kwargs). Message contents are encoded as plain text, so text
        that spells a control token (a user's, or a tool result's) never becomes one; past thinking is stripped."""
        if self._template is None:
            raise ConfigError("this checkpoint has no chat template; use a plain prompt")
        messages = check_messages(messages)
        if tools is not None:
            check_tools(tools)
        if reserved := sorted(kwargs.keys() & {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}):
            raise ConfigError(f"template arguments {reserved} are set by dgemma")
        mask = _Masker(self)
        masked = [mask.message(m) for m in messages]
        masked_tools = None if tools is None else [mask.tool(t) for t in tools]
        context = {"messages": masked, "tools": masked_tools, "add_generation_prompt": add_generation_prompt}
        context.update(bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        try:
            rendered = _render_bounded(self._template, context)
        except TemplateError as e:
            raise ConfigError(f"chat template failed: {str(e)[:200]}") from None
        except Exception as e:  # noqa: BLE001 - the template is the checkpoint's code: it can raise anything (1 / 0)
            raise ConfigError(f"chat template failed: {type(e).__name__}: {str(e)[:200]}") from None
        ids: list[int] = []
        for k, part in enumerate(mask.pattern.split(rendered)):  # text, index, text, index, ..., text
            if k % 2 == 0:
                ids += self.encode(part)
            else:
                ids += self.encode(mask.values[int(part)], parse_special=False)
        return ids


class _Masker:
    """Free text of a chat (message contents, tool and parameter descriptions, string values of tool-call
    arguments) is swapped for placeholders before rendering and encoded as plain text afterwards, so it never
    becomes a control token. The placeholder carries a per-call random nonce, so no input can forge one. Every
    other string the template may use as such (names, keys, schema words) must be valid text that spells no
    control token, or the request is refused."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.values = tokenizer, []
        self.nonce = secrets.token_hex(8)
        self.pattern = re.compile("\x00" + self.nonce + "(\\d+)\x00")

    def text(self, value: str, where: str) -> str:
        _check_utf8(value, where)
        self.values.append(value)
        return f"\x00{self.nonce}{len(self.values) - 1}\x00"

    def plain(self, value, where: str, depth: int = 0):
        """A structure whose strings the template may inspect: checked, not masked (descriptions are)."""
        if depth > 64:
            raise ConfigError(f"{where} is nested too deeply")
        if isinstance(value, dict):
            return {
                self._word(k, where): self.text(v, where)
                if k == "description" and isinstance(v, str)
                else self.plain(v, where, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self.plain(v, where, depth + 1) for v in value]
        return self._word(value, where) if isinstance(value, str) else value

    def _word(self, value: str, where: str) -> str:
        _check_utf8(value, where)
        if set(self.tokenizer.encode(value)) & self.tokenizer.special_ids:
            raise ConfigError(f"{where}: {value[:40]!r} spells a control token")
        return value

    def arguments(self, value, where: str, depth: int = 0):
        """Tool-call arguments: every string value is free text (masked); keys are checked."""
        if depth > 64:
            raise ConfigError(f"{where} is nested too deeply")
        if isinstance(value, dict):
            return {self._word(k, where): self.arguments(v, where, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.arguments(v, where, depth + 1) for v in value]
        return self.text(value, where) if isinstance(value, str) else value

    def message(self, m: dict) -> dict:
        out = dict(m)
        if m.get("content") is not None:
            out["content"] = self.text(m["content"], "message content")
        if "name" in m:
            out["name"] = self._word(m["name"], "tool message name")
        if m.get("tool_calls"):
            out["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "name": self._word(c["function"]["name"], "tool call name"),
                        "arguments": self.arguments(c["function"]["arguments"], "tool call arguments"),
                    },
                }
                for c in m["tool_calls"]
            ]
        return out

    def tool(self, t: dict) -> dict:
        return self.plain(t, f"tool {t['function']['name']!r}")


def _check_utf8(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{where} is not valid Unicode (lone surrogate)") from None


ROLE_NAMES = {"developer": "system", "model": "assistant"}


def check_messages(messages) -> list[dict]:
    """Validated copies of chat messages in the template's shape: roles system/user/assistant/tool (developer and
    model accepted as aliases), string contents (None for an assistant turn that only calls tools), tool calls with
    dict arguments, tool results with the called function's `name`; assistant contents lose their thinking."""
    from .chat import strip_thinking

    if not isinstance(messages, list) or not messages:
        raise ConfigError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (*ROLES, "developer", "tool"):
            raise ConfigError(f"messages[{i}] needs a role in {(*ROLES, 'developer', 'tool')}")
        role = ROLE_NAMES.get(m["role"], m["role"])
        content, calls = m.get("content"), m.get("tool_calls")
        if content is None and not (role == "assistant" and calls):
            raise ConfigError(f"messages[{i}] needs string content")
        if content is not None and not isinstance(content, str):
            raise ConfigError(f"messages[{i}]: content must be a string")
        msg = {"role": role, "content": content}
        if role == "assistant":
            if content is not None:
                msg["content"] = strip_thinking(content)
            if calls:
                msg["tool_calls"] = _check_calls(calls, i)
        elif calls:
            raise ConfigError(f"messages[{i}]: only assistant messages carry tool_calls")
        if role == "tool":
            name = m.get("name")
            if not isinstance(name, str) or not name:
                raise ConfigError(f"messages[{i}]: a tool message needs the function's name")
            msg["name"] = name
            if isinstance(m.get("tool_call_id"), str):
                msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _check_calls(calls, i: int) -> list[dict]:
    if not isinstance(calls, list):
        raise ConfigError(f"messages[{i}].tool_calls must be a list")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), dict):
            raise ConfigError(f"messages[{i}].tool_calls: each needs function.name and function.arguments (an object)")
        out.append({"type": "function", "id": call.get("id"), "function": {"name": fn["name"], **fn}})
    return out


def check_tools(tools) -> None:
    if not isinstance(tools, list):
        raise ConfigError("tools must be a list")
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ConfigError('each tool needs {"type": "function", "function": {"name": ...}}')
        if not isinstance(fn.get("description", ""), str) or not isinstance(fn.get("parameters", {}), dict):
            raise ConfigError(f"tool {fn['name']!r}: description must be a string and parameters an object")


def _read_template(model_dir: Path, cfg: dict) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if os.path.lexists(jinja):
        try:
            return read_file(jinja, MAX_TEMPLATE_BYTES).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{jinja} is not valid UTF-8") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict) and _hashable(t)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _hashable(entry: dict) -> bool:
    return isinstance(entry.get("name"), (str, type(None)))


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialisation
        value = value.get("content")
    if not isinstance(value, str):
        return None
    _check_utf8(value, "tokenizer_config.json bos_token/eos_token")
    return value


def _raise(message: str):
    raise TemplateError(message)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every value a template builds (operators `* ** + %` and `~`, calls, filters)
    capped at `MAX_RENDER_CHARS` items, and numbers that could only build a larger one (`"x" * 10**9`,
    `center(10**9)`, `9 ** 10**6`) refused before the call: each is a single C call no deadline could interrupt.
    So growth stops within one step of the cap. Intercepted operators are never constant-folded at compile time,
    so loading such a template cannot hang either."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options):
        super().__init__(**options)
        self.filters = {name: _bounded_filter(f) for name, f in self.filters.items()}

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and right > 64 and left not in (0, 1, -1):
            raise SecurityError("chat template: exponent too large")
        if operator == "*":
            _check_args((left, right))
        return _capped(super().call_binop(context, operator, left, right))

    def call(self, context, obj, /, *args, **kwargs):
        _check_args((*args, *kwargs.values()))
        if getattr(obj, "__name__", "") == "replace" and len(args) >= 2 and isinstance(obj.__self__, str):
            text, old, new = obj.__self__, str(args[0]), str(args[1])
            if len(text) + (text.count(old) + 1) * len(new) > MAX_RENDER_CHARS:
                raise SecurityError("chat template: replace result too large")
        return _capped(super().call(context, obj, *args, **kwargs))

    def from_string(self, source, *args, **kwargs):
        template = super().from_string(source, *args, **kwargs)
        names = template.root_render_func.__globals__  # the compiled module's: `~` calls its str_join/markup_join
        for name in ("str_join", "markup_join"):
            if name in names:
                names[name] = _capped_join(names[name])
        return template


def _check_args(args) -> None:
    if any(isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_RENDER_CHARS for a in args):
        raise SecurityError(f"chat template: a number above {MAX_RENDER_CHARS} builds too large a value")


def _capped(value):
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_RENDER_CHARS:
        raise SecurityError(f"chat template: a value grew past {MAX_RENDER_CHARS} items")
    return value


def _capped_join(join):
    return functools.wraps(join)(lambda seq: _capped(join(seq)))


def _bounded_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
    def bounded(*args, **kwargs):
        _check_args((*args[1:], *kwargs.values()))
        return _capped(f(*args, **kwargs))

    return bounded


class _RenderLimit(Exception):
    pass


def _render_bounded(template, context: dict, seconds: float = RENDER_SECONDS, max_chars: int = MAX_RENDER_CHARS) -> str:
    """`template.render(**context)` within `seconds` and `max_chars`. The deadline is checked on every line the
    compiled template runs (a line trace on its frames only, this thread only), so a template that loops forever
    raises instead of pinning a thread; output is streamed and counted, so an exploding one stops at the cap."""
    deadline = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _RenderLimit(f"rendering took longer than {seconds:g} s")
        return on_line

    def on_call(frame, event, arg):
        return on_line(frame, event, arg) if frame.f_code.co_filename == "<template>" else None

    previous, parts, size = sys.gettrace(), [], 0
    sys.settrace(on_call)
    try:
        for part in template.generate(**context):
            size += len(part)
            if size > max_chars:
                raise _RenderLimit(f"the rendered prompt exceeds {max_chars} characters")
            parts.append(part)
    finally:
        sys.settrace(previous)
    return "".join(parts)
