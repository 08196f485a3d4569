"""Protocol-neutral serving front end: validated parameters -> `generate.Request`s -> engine -> text events.

`Frontend.plan` turns `Params` (what every HTTP protocol asks for, already parsed) into a `Plan`: per choice the
Requests to run (one, or the candidates of an infill or edit), with structured-output layouts compiled and context
limits checked. `Frontend.events` runs the one text layer (`text.TextStream`) over the engine's token events and
yields ("text" | "draft" | "done" | "error", choice, payload); for infills it waits for a choice's candidates and
keeps the one `choose_infill` picks. Errors are `APIError`s with an HTTP status; the protocol modules shape them.
Nothing here touches torch or knows a wire format.

The event loop never tokenizes, renders or compiles: that work runs on a small pool (`TEXT_WORKERS` threads, TGI's
default), each call bounded by `TEXT_TIMEOUT_S` (waiting included: a backlog gets a 503, not an ever-later answer).
A prompt that cannot fit the context whatever its tokens (more characters than `context * max_token_chars`) is
refused before it is tokenized, so a 2 MB single word costs microseconds, not seconds of a core.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from .chat import ChatParser
from .config import ConfigError
from .engine import EngineClosed, Failed, Finished, Job, QueueFull
from .generate import CanvasEvent, Request, Settle, SettleEvent, StepEvent
from .infill import InfillCandidate, choose_infill, drop_moved_space, infill_lengths
from .structured import structured_layout
from .text import TextStream

MAX_STOP, MAX_STOP_CHARS = 4, 256
MAX_SEED = 2**62
MAX_STEPS, STEPS_PER_TOKEN = 1024, 4  # denoising steps per canvas: more than 4 per token only costs forward passes
TEXT_WORKERS, TEXT_TIMEOUT_S = 2, 10.0


def dumps(obj) -> str:
    """Compact JSON for a response body or an SSE event. Never NaN or Infinity (invalid JSON that clients refuse): a
    non-finite number (a statistic of a degenerate distribution) is written as null."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class APIError(Exception):
    """An error for the client: HTTP status, message, the offending parameter, a machine-readable code."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_parameter") -> APIError:
    return APIError(400, message, param, code)


@dataclasses.dataclass
class Params:
    """One generation request as every protocol expresses it. `prompt` tokenizes (run in a worker thread)."""

    prompt: Callable[[], list[int]]
    max_tokens: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None
    n: int = 1
    knobs: dict = dataclasses.field(default_factory=dict)  # GenerationSettings overrides
    stream: bool = False
    include_usage: bool = False
    include_draft: bool = False
    settle_steps: int | None = None
    settle_entropy: float | None = None
    response_format: dict | None = None
    suffix: str | None = None  # infill: the text after the gap
    fill_lengths: list[int] | None = None  # infill candidates (default: spread up to max_tokens)
    fill_hint: int | None = None  # an edit's old span length in tokens
    fill_space: bool = False  # the prompt's trailing space was moved into the fill (generate.move_space)
    parse: bool = False  # chat: split the output into content, reasoning and tool calls (chat.ChatParser)
    tools: list[dict] | None = None  # declared tools (validated): their calls are parsed
    force_tool: bool = False  # tool_choice "required" or named: the output is a pinned call (always parses)
    force_name: str | None = None  # the named function (None with force_tool: any declared one)


@dataclasses.dataclass
class Plan:
    """A validated request, ready for the engine."""

    choices: list[list[Request]]  # per choice: one Request, or an infill's candidates
    fill_lengths: list[int] | None  # the candidates' gap lengths (infill), else None
    prompt_tokens: int
    max_tokens: int
    stop: tuple[str, ...]
    seeds: list[int]
    stream: bool
    include_usage: bool
    draft: bool
    preview: int = 0  # infill: the candidate whose drafts are streamed
    fill_space: bool = False
    parse: bool = False  # chat output parsing (content / reasoning / tool calls)
    tools: bool = False  # tool calls are parsed


class Inbox:
    """One request's events from the engine thread, consumed by its response on the event loop. Token events,
    Finished and Failed are all kept, in order; a draft (StepEvent) replaces the still-unread draft of its job when
    nothing else came after it. So a client that reads slowly gets the newest canvas, and what waits here is
    bounded by the request's tokens, not by its number of steps."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.open: dict[int, _DraftSlot] = {}  # job -> its draft slot still in the queue, nothing after it

    def deliver_to(self, i: int) -> Callable[[object], None]:
        def deliver(ev) -> None:  # runs on the engine thread
            try:
                self.loop.call_soon_threadsafe(self._put, i, ev)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        return deliver

    def _put(self, i: int, ev) -> None:
        if isinstance(ev, StepEvent):
            slot = self.open.get(i)
            if slot is not None and not slot.taken:
                slot.draft = ev
                return
            self.open[i] = slot = _DraftSlot(ev)
            ev = slot
        else:
            self.open.pop(i, None)
        self.queue.put_nowait((i, ev))

    def wake(self) -> None:
        self.queue.put_nowait((-1, None))

    def qsize(self) -> int:
        return self.queue.qsize()

    async def get(self) -> tuple[int, object]:
        i, ev = await self.queue.get()
        if isinstance(ev, _DraftSlot):
            ev.taken = True
            ev = ev.draft
        return i, ev


class _DraftSlot:
    __slots__ = ("draft", "taken")

    def __init__(self, draft: StepEvent):
        self.draft, self.taken = draft, False


class Frontend:
    """Request handling shared by every protocol: pipeline, engine, limits."""

    def __init__(self, pipeline, engine, model_id: str, max_n: int, max_tokens_cap: int | None, settle: Settle):
        if pipeline.tokenizer is None:
            raise ValueError(f"{pipeline.model_dir} has no tokenizer.json; the server needs one")
        self.pipeline, self.engine, self.model_id = pipeline, engine, model_id
        self.tokenizer = pipeline.tokenizer
        self.max_n, self.max_tokens_cap, self.settle = max_n, max_tokens_cap, settle
        self.canvas = pipeline.model.config.canvas_length
        self.context = pipeline.model.text.max_position_embeddings
        self.vocab = pipeline.model.text.vocab_size
        self.max_steps = min(MAX_STEPS, STEPS_PER_TOKEN * self.canvas)
        self.mask_id = self.tokenizer.id_of("<mask>")
        self.created = int(time.time())
        self._pieces: dict[int, str] = {}
        self._text_pool = ThreadPoolExecutor(TEXT_WORKERS, "dgemma-text")
        self._schema_pool = ThreadPoolExecutor(1, "dgemma-schema")  # slow compiles never starve tokenizing

    async def offload(self, fn: Callable, *args, schema: bool = False):
        """`fn(*args)` on the text pool (or the schema pool), off the event loop; 503 when it has not finished in
        `TEXT_TIMEOUT_S`."""
        pool = self._schema_pool if schema else self._text_pool
        try:
            return await asyncio.wait_for(asyncio.wrap_future(pool.submit(fn, *args)), TEXT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(
                503,
                "The server is busy preparing other requests; retry shortly.",
                None,
                "server_overloaded",
                "server_error",
                {"Retry-After": "1"},
            ) from None

    def check_fits(self, chars: int, param: str = "prompt") -> None:
        """400 before tokenizing when `chars` characters need more tokens than the context holds."""
        least = chars // self.tokenizer.max_token_chars
        if least > self.context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens; the {param} has {chars} characters, "
                f"so at least {least} tokens.",
                param,
                "context_length_exceeded",
            )

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """A prompt's ids (run it on the text pool), refused first when it cannot fit."""
        self.check_fits(len(text))
        return self.tokenizer.encode(text, add_bos=add_bos)

    def chat(
        self, messages: list[dict], tools: list[dict] | None, template: dict, force: bool, name: str | None
    ) -> tuple[Callable[[], list[int]], dict]:
        """A chat request's prompt thunk (the checkpoint's template; its errors are 400s) and the chat fields of
        Params, for every protocol."""

        def prompt() -> list[int]:
            self.check_fits(sum(len(str(m.get("content") or "")) for m in messages), "messages")
            try:  # the tokenizer's own call: template flags never reach Pipeline.prompt_ids' parameters
                return self.tokenizer.apply_chat_template(messages, tools=tools, **template)
            except ConfigError as e:
                raise bad(str(e), "messages") from None

        return prompt, {"parse": True, "tools": tools, "force_tool": force, "force_name": name}

    # --- validation ------------------------------------------------------------------------------------------
    def no_mask(self, ids: list[int]) -> list[int]:
        """A raw prompt (text with its special tokens parsed, or ids) may not hold the vocabulary's mask token."""
        if self.mask_id is not None and self.mask_id in ids:
            raise bad("the mask token is not allowed in the input", "prompt")
        return ids

    async def plan(self, p: Params) -> Plan:
        if p.n > self.max_n:
            raise bad(f"n must be at most {self.max_n}", "n")
        if (p.knobs.get("steps") or 0) > self.max_steps:
            raise bad(f"steps must be at most {self.max_steps} ({STEPS_PER_TOKEN} per canvas position)", "steps")
        stop = tuple(stop_list(p.stop))
        try:
            settings = self.pipeline.settings.override(**p.knobs)  # validates the combination (t_min < t_max)
            ids = await self.offload(p.prompt)
        except ConfigError as e:
            raise bad(str(e)) from None
        seed = p.seed if p.seed is not None else 0 if settings.temperature == 0 else secrets.randbelow(MAX_SEED)
        seeds = [seed + i for i in range(p.n)]
        structured = await self._structured(p, settings, len(ids))
        if p.suffix is not None:
            return await self._infill_plan(p, ids, seeds, stop)
        if structured is not None:
            layout, max_tokens = structured
        else:
            layout, max_tokens = None, self._check_length(len(ids), p.max_tokens, settings.max_new_tokens)
        settle = None
        if p.stream and p.settle_steps != 0:
            settle = Settle(p.settle_steps or self.settle.steps, p.settle_entropy or self.settle.entropy)
        draft = p.include_draft and p.stream
        base = settings.override(max_new_tokens=max_tokens)
        hidden = self.pipeline.invisible_ids()
        choices = [[Request(tuple(ids), base, s, stop, layout, settle, draft, hidden)] for s in seeds]
        tools = bool(p.tools) and p.parse
        return Plan(
            choices,
            None,
            len(ids),
            max_tokens,
            stop,
            seeds,
            p.stream,
            p.include_usage,
            draft,
            parse=p.parse,
            tools=tools,
        )

    async def _structured(self, p: Params, settings, prompt_len: int):
        """(layout, exact token budget) of the compiled response_format or forced tool call, or None for text."""
        from .structured import UnsupportedSchema, tool_call_layout

        if p.force_tool:
            if p.response_format not in (None, {"type": "text"}):
                raise bad("response_format cannot be combined with a forced tool call", "response_format")
            if p.stop:
                raise bad("stop strings cannot be combined with a forced tool call (they could cut it)", "stop")
            try:
                out = await self.offload(
                    tool_call_layout,
                    p.tools,
                    p.force_name,
                    self.tokenizer,
                    self.canvas,
                    self.vocab,
                    settings,
                    schema=True,
                )
            except UnsupportedSchema as e:
                raise APIError(400, f"tool parameters: {e}", "tools", "unsupported_schema") from None
            except ValueError as e:
                raise bad(f"tool parameters: {e}", "tools") from None
            return self._fits(p, out, prompt_len, "tool_choice")
        if p.response_format is None or p.response_format == {"type": "text"}:
            return None
        if p.suffix is not None:
            raise bad("response_format cannot be combined with suffix", "response_format")
        if p.stop:
            raise bad("stop strings cannot be combined with response_format (they could cut the JSON)", "stop")
        try:
            out = await self.offload(
                structured_layout, p.response_format, self.tokenizer, self.canvas, self.vocab, settings, schema=True
            )
        except UnsupportedSchema as e:
            raise APIError(400, str(e), "response_format", "unsupported_schema") from None
        except ValueError as e:  # ConfigError included
            raise bad(str(e), "response_format") from None
        if out is None:
            return None
        return self._fits(p, out, prompt_len, "response_format")

    def _fits(self, p: Params, out: tuple, prompt_len: int, what: str) -> tuple:
        if p.max_tokens is not None and p.max_tokens < out[1]:
            raise bad(f"max_tokens={p.max_tokens} is too small for this {what}: it needs {out[1]} tokens", "max_tokens")
        if self.max_tokens_cap is not None and out[1] > self.max_tokens_cap:
            raise bad(f"this {what} needs {out[1]} tokens; the server caps max_tokens at {self.max_tokens_cap}", what)
        self._check_context(prompt_len, out[1], what)
        return out

    async def _infill_plan(self, p: Params, ids: list[int], seeds: list[int], stop: tuple[str, ...]) -> Plan:
        self.check_fits(len(p.suffix), "suffix")
        suffix_ids = await self.offload(self.tokenizer.encode, p.suffix, False, False)
        max_fill = p.max_tokens or min(self.canvas, self.max_tokens_cap or self.canvas)
        if self.max_tokens_cap is not None and max_fill > self.max_tokens_cap:
            raise bad(f"max_tokens must be at most {self.max_tokens_cap}", "max_tokens")
        lengths = sorted(set(p.fill_lengths or infill_lengths(self.canvas, max_fill, p.fill_hint)))
        if not lengths or lengths[0] < 1 or lengths[-1] > max_fill:
            raise bad(f"fill lengths must be in [1, {max_fill}]", "fill_lengths")
        try:
            choices = [self.pipeline.infill_requests(ids, suffix_ids, lengths, s, **p.knobs) for s in seeds]
        except ConfigError as e:
            raise bad(str(e)) from None
        longest = max(r.max_tokens for r in choices[0])  # the fill (capped above) + the pinned suffix
        self._check_context(len(ids), longest)
        preview = min(range(len(lengths)), key=lambda k: abs(lengths[k] - (p.fill_hint or max_fill // 2)))
        draft = p.include_draft and p.stream
        if draft:
            choices = [[dataclasses.replace(r, draft=k == preview) for k, r in enumerate(c)] for c in choices]
        return Plan(
            choices, lengths, len(ids), max_fill, stop, seeds, p.stream, p.include_usage, draft, preview, p.fill_space
        )

    def _check_length(self, prompt_len: int, max_tokens: int | None, default: int) -> int:
        """max_tokens after the context check; canvases make the real budget ceil(max_tokens / C) * C."""
        c, room = self.canvas, self.context - prompt_len
        if max_tokens is None:
            max_tokens = min(default, room // c * c, self.max_tokens_cap or math.inf)
            if max_tokens < 1:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.context} tokens; the prompt has "
                    f"{prompt_len} tokens, leaving no room for one canvas of {c}.",
                    "prompt",
                    "context_length_exceeded",
                )
            return max_tokens
        if self.max_tokens_cap is not None and max_tokens > self.max_tokens_cap:
            raise bad(f"max_tokens must be at most {self.max_tokens_cap}", "max_tokens")
        self._check_context(prompt_len, max_tokens)
        return max_tokens

    def _check_context(self, prompt_len: int, tokens: int, param: str = "max_tokens") -> None:
        """400 when the prompt and the canvases `tokens` new tokens need do not fit the context."""
        needed = math.ceil(tokens / self.canvas) * self.canvas
        if prompt_len + needed > self.context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens; the prompt has "
                f"{prompt_len} tokens and {tokens} new tokens need {needed} (canvases of {self.canvas}).",
                param,
                "context_length_exceeded",
            )

    # --- running ---------------------------------------------------------------------------------------------
    def submit(self, plan: Plan) -> tuple[list[Job], Inbox]:
        inbox = Inbox(asyncio.get_running_loop())
        requests = [r for choice in plan.choices for r in choice]
        if len(requests) > self.engine.max_queue:  # checklist B5: the fan-out is bounded before any work
            raise bad(
                f"this request needs {len(requests)} generations (n x infill candidates), over the "
                f"{self.engine.max_queue} one request may queue (--max-queue); lower n or give fewer fill lengths",
                "n",
            )
        jobs = [Job(r, inbox.deliver_to(j)) for j, r in enumerate(requests)]
        try:
            self.engine.submit(jobs)
        except QueueFull:
            raise APIError(
                503,
                "The server is busy; retry shortly.",
                None,
                "server_overloaded",
                "server_error",
                {"Retry-After": "1"},
            ) from None
        except EngineClosed:
            raise APIError(503, "The engine is not running.", None, "engine_unavailable", "server_error") from None
        return jobs, inbox

    def cancel(self, jobs: list[Job], inbox: Inbox | None = None) -> None:
        for job in jobs:
            if not job.cancelled:
                self.engine.cancel(job)
        if inbox is not None:
            inbox.wake()  # a waiting consumer ends

    def _text(self, plan: Plan) -> TextStream:
        eos = plan.choices[0][0].settings.eos_token_ids
        parser = ChatParser(tools=plan.tools) if plan.parse else None
        return TextStream(self.tokenizer, plan.stop, plan.max_tokens, eos, parser)

    async def events(self, plan: Plan, jobs: list[Job], inbox: Inbox) -> AsyncIterator[tuple]:
        """(kind, choice, payload) until every choice has finished: ("text", i, content delta), ("reasoning", i,
        delta), ("tool_call", i, chat.ToolCall), ("draft", i, StepEvent), ("done", i, stats), or ("error", -1,
        message); stops early when the client went away."""
        width = len(plan.choices[0])
        texts = [self._text(plan) for _ in plan.choices]
        finished: dict[int, Finished] = {}
        pending = set(range(len(plan.choices)))
        while pending:
            j, ev = await inbox.get()
            if j == -1:
                return
            i = j // width
            if i not in pending:
                continue
            if isinstance(ev, Failed):
                self.cancel(jobs)
                yield "error", -1, ev.message
                return
            if isinstance(ev, StepEvent):
                yield "draft", i, ev
                continue
            if plan.fill_lengths is not None:  # infill: only the chosen candidate's fill becomes text
                if isinstance(ev, Finished):
                    finished[j] = ev
                if all(i * width + c in finished for c in range(width)):
                    pending.discard(i)
                    for item in self._fill(plan, i, [finished[i * width + c] for c in range(width)], texts[i]):
                        yield item
                continue
            text = texts[i]
            if isinstance(ev, SettleEvent):
                delta = text.push_delta(ev.token_ids)
            elif isinstance(ev, CanvasEvent):
                delta = text.push_delta(ev.new_ids)
            else:
                delta = text.push_delta([], ev.finish_reason)
            if delta.reasoning:
                yield "reasoning", i, delta.reasoning
            if delta.content:
                yield "text", i, delta.content
            for call in delta.tool_calls:
                yield "tool_call", i, call
            if text.finished:
                pending.discard(i)
                stats = self._stats(plan, i, text, jobs[j], ev if isinstance(ev, Finished) else None)  # read first:
                self.cancel([jobs[j]])  # stop string or token cap: drop remaining work (the engine then drops gen)
                yield "done", i, stats

    def _fill(self, plan: Plan, i: int, results: list[Finished], text: TextStream) -> list[tuple]:
        """The ("text", "done") items of an infill choice once all its candidates finished."""
        cands = InfillCandidate.of(plan.fill_lengths, results)
        best = choose_infill(cands)
        text.push(cands[best].fill, "stop")  # the whole fill at once: the delta is all of the text
        delta = text.text = drop_moved_space(text.text, plan.fill_space)
        chosen = results[best]
        infill = {"length": cands[best].length, "candidates": [{"length": c.length, "score": c.score} for c in cands]}
        stats = self._stats(plan, i, text, None, chosen, infill=infill)
        stats["dgemma"]["forward_passes"] = sum(f.forward_passes for f in results)
        return [("text", i, delta), ("done", i, stats)]

    def _stats(self, plan: Plan, i: int, text: TextStream, job: Job | None, fin: Finished | None, **extra) -> dict:
        gen = job.gen if job is not None else None
        steps = fin.steps_per_canvas if fin else list(gen.steps_per_canvas) if gen else []
        passes = fin.forward_passes if fin else gen.forward_passes if gen else 0
        if job is not None:
            first = job.first_token and job.first_token - job.submitted
            commit = job.first_commit and job.first_commit - job.submitted
        else:
            first, commit = fin.first_token_s, fin.first_commit_s
        cached = fin.cached_tokens if fin else gen.cached_tokens if gen else 0
        redraws = fin.empty_redraws if fin else gen.redraws if gen else 0
        reason = text.finish_reason
        if text.tool_calls and reason == "stop":
            reason = "tool_calls"
        return {
            "finish_reason": reason,
            "stop_sequence": text.stop_sequence,
            "completion_tokens": len(text.ids),
            "text": text.text,
            "reasoning": text.reasoning,
            "tool_calls": text.tool_calls,
            "dgemma": {
                "seed": plan.seeds[i],
                "steps_per_canvas": steps,
                "forward_passes": passes,
                "tokens_per_forward": round(len(text.ids) / max(passes, 1), 4),
                "first_token_s": first and round(first, 4),
                "first_commit_s": commit and round(commit, 4),
                "cached_tokens": cached,
                **({"empty_redraws": redraws} if redraws else {}),
                **extra,
            },
        }

    def piece(self, token_id: int) -> str:
        if (p := self._pieces.get(token_id)) is None:
            p = self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special=False)
        return p

    def usage(self, plan: Plan, completion_tokens: int, cached_tokens: int = 0) -> dict:
        p = plan.prompt_tokens
        return {
            "prompt_tokens": p,
            "completion_tokens": completion_tokens,
            "total_tokens": p + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        }


def stop_list(stop: str | list[str] | None) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP:
        raise bad(f"stop takes at most {MAX_STOP} strings", "stop")
    if any(not check_text(s, "stop") or len(s) > MAX_STOP_CHARS for s in stop):
        raise bad(f"each stop string needs 1 to {MAX_STOP_CHARS} characters", "stop")
    return stop


def check_text(text: str, param: str) -> str:
    """JSON may carry lone surrogates (\\ud800); they are not text and the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{param} is not valid Unicode (lone surrogate)", param) from None
    return text
