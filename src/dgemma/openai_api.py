"""OpenAI wire format: request models, their translation to `frontend.Params`, and response shaping (JSON and SSE).

Endpoints served through it: `/v1/completions` (with `suffix`: infill), `/v1/chat/completions`, and dgemma's
`/v1/edits` (rewrite a span of a text in place). `response_format` (`json_object`, `json_schema`) works on chat and
completions. Fields OpenAI defines but dgemma cannot honour get a 400 naming the field.

Extensions (all optional): the diffusion knobs as body fields (`steps`, `entropy_bound`, `t_min`, `t_max`,
`confidence_threshold`, `stability_threshold`); a `dgemma` object on every choice; `stream_options.include_draft`
(`event: draft` SSE events with the whole canvas every step); `stream_options.settle_steps` / `settle_entropy`.
"""

from __future__ import annotations

import collections
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from .asgi import JSONBody, answer
from .chat import NAME, ToolCall
from .config import ConfigError, GenerationSettings
from .frontend import APIError, Frontend, Inbox, Params, Plan, bad, check_text, dumps
from .generate import StepEvent
from .infill import line_span, move_space, parse_range

KNOBS = tuple(f.name for f in GenerationSettings.knobs(per_request=True))  # each is a GenerationFields field


# --- request models ---------------------------------------------------------------------------------------------
# Checks done in the handlers, also written into the schema (JSON Schema applies minLength to strings only and
# minItems to arrays only, so one dict covers a string-or-list field).
NON_EMPTY = {"minLength": 1, "minItems": 1}
ROLES = ("system", "developer", "user", "assistant", "tool")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False
    include_draft: bool = False
    settle_steps: int | None = Field(None, ge=0, le=1024)
    settle_entropy: float | None = Field(None, gt=0, le=1e9)


class GenerationFields(BaseModel):
    """Fields shared by every endpoint: OpenAI's, the diffusion knobs, and known-but-unsupported ones (checked)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    model: str
    max_tokens: int | None = Field(None, ge=1, le=2**31)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    n: int = Field(1, ge=1)  # the cap (--max-n) is checked in Frontend.plan, so its message names it
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # scales the sampler's schedule (GenerationSettings)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    steps: int | None = Field(None, ge=1, le=1024)
    entropy_bound: float | None = Field(None, gt=0, le=1e9)
    t_min: float | None = Field(None, ge=0, le=1e3)
    t_max: float | None = Field(None, gt=0, le=1e3)
    confidence_threshold: float | None = Field(None, gt=0, le=1e9)
    stability_threshold: int | None = Field(None, ge=0, le=1024)
    empty_redraws: int | None = Field(None, ge=0, le=8)
    sc_top_k: int | None = Field(None, ge=0, le=2**20)
    sparse_sampling: int | None = Field(None, ge=0, le=1)
    chat_template: Any = None
    chat_template_kwargs: Any = None
    top_k: Any = None  # other servers' knobs that dgemma cannot honour: refused rather than silently ignored
    block_length: Any = None
    remasking: Any = None
    cfg_scale: Any = None


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] = Field(json_schema_extra=NON_EMPTY)
    suffix: str | None = None
    fill_lengths: list[int] | None = Field(None, min_length=1, max_length=16)  # dgemma: infill candidates
    response_format: dict[str, Any] | None = None
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"required": ["type", "text"]})
    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string


class ToolCallIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = None
    type: str = "function"
    function: FunctionCall


# What chat_prompt checks, in the schema: a message has content, or is an assistant turn that calls tools; only an
# assistant turn carries tool_calls.
MESSAGE_RULES = {
    "allOf": [
        {
            "anyOf": [
                {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                {
                    "required": ["role", "tool_calls"],
                    "properties": {"role": {"enum": ["assistant"]}, "tool_calls": {"type": "array", "minItems": 1}},
                },
            ]
        },
        {
            "anyOf": [
                {"not": {"required": ["tool_calls"]}},
                {"properties": {"tool_calls": {"anyOf": [{"type": "null"}, {"maxItems": 0}]}}},
                {"required": ["role"], "properties": {"role": {"enum": ["assistant"]}}},
            ]
        },
    ]
}


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=MESSAGE_RULES)
    role: str = Field(json_schema_extra={"enum": list(ROLES)})
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # a past turn's thinking: dropped (history is shown without it)


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(json_schema_extra=NON_EMPTY)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None


class EditRequest(GenerationFields):
    """dgemma's inline edit: rewrite `text[start:end]` (characters) or `lines` ("A-B", 1-based, inclusive), with
    everything else fixed. `context`: text before `text` that conditions the rewrite (e.g. the prompt that
    produced it). `fill_lengths`: candidate lengths in tokens (default: around the old span's length)."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["start", "end"]}, {"required": ["lines"]}]})

    text: str
    start: int | None = Field(None, ge=0)
    end: int | None = Field(None, ge=0)
    lines: str | None = None
    context: str = ""
    fill_lengths: list[int] | None = Field(None, min_length=1, max_length=16)


def _unsupported(body: GenerationFields) -> None:
    """400 naming the first field whose value would change semantics dgemma cannot honour."""
    fields = body.model_fields_set
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("presence_penalty", lambda v: v in (None, 0), "penalties are not supported"),
        ("frequency_penalty", lambda v: v in (None, 0), "penalties are not supported"),
        ("logit_bias", lambda v: not v, "logit_bias is not supported"),
        ("chat_template", lambda v: False, "the checkpoint's own chat template is always used"),
        ("chat_template_kwargs", lambda v: isinstance(body, ChatRequest), "it applies to chat completions only"),
        ("echo", lambda v: not v, "echo is not supported"),
        ("best_of", lambda v: v in (None, 1), "best_of is not supported"),
        ("logprobs", lambda v: v in (None, False), "logprobs are not supported"),
        ("top_logprobs", lambda v: v is None, "logprobs are not supported"),
        ("functions", lambda v: not v, "the legacy functions field is not supported; use tools"),
        ("function_call", lambda v: v in (None, "none"), "the legacy function_call field is not supported; use tools"),
        ("parallel_tool_calls", lambda v: True, ""),
        ("audio", lambda v: v is None, "audio output is not supported"),
        ("modalities", lambda v: v in (None, ["text"]), "only text output is supported"),
        ("prediction", lambda v: v is None, "predicted outputs are not supported"),
        ("top_k", lambda v: v in (None, 0), "the sampler has no top-k; use top_p or temperature"),
        ("remasking", lambda v: v is None, "the remasking rule is the checkpoint's sampler (omit the field)"),
        ("cfg_scale", lambda v: v in (None, 0, 1), "classifier-free guidance is not supported (0 or 1: off)"),
    ]
    for name, ok, why in checks:
        if name in fields and not ok(getattr(body, name, None)):
            raise APIError(400, f"'{name}' is not supported: {why}", param=name, code="unsupported_parameter")


def params(
    fe: Frontend, body: GenerationFields, prompt: Callable[[], list[int]], max_tokens: int | None, **more
) -> Params:
    """The protocol-neutral Params of a validated body."""
    if body.model != fe.model_id:
        raise APIError(
            404, "The model does not exist; GET /v1/models lists the served model.", "model", "model_not_found"
        )
    _unsupported(body)
    if body.block_length not in (None, fe.canvas):
        raise bad(f"block_length is the model's canvas, {fe.canvas} (omit the field)", "block_length")
    opts = body.stream_options or StreamOptions()
    return Params(
        prompt,
        max_tokens,
        body.stop,
        body.seed,
        body.n,
        {k: getattr(body, k) for k in KNOBS},
        body.stream,
        opts.include_usage,
        opts.include_draft,
        opts.settle_steps,
        opts.settle_entropy,
        response_format=getattr(body, "response_format", None),
        **more,
    )


def completion_prompt(fe: Frontend, body: CompletionRequest) -> tuple[Callable[[], list[int]], bool]:
    """The prompt's tokenizer thunk, and whether a trailing space moved into an infill (`generate.move_space`)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise bad("only one prompt per request is supported", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if body.suffix is not None:
            check_text(body.suffix, "suffix")
        if not check_text(prompt, "prompt").strip() and body.suffix is None:
            raise bad("prompt must not be empty", "prompt")
        prompt, moved = move_space(prompt) if body.suffix is not None else (prompt, False)
        return (lambda: fe.no_mask(fe.encode(prompt, add_bos=True))), moved
    if not prompt:
        raise bad("prompt must not be empty", "prompt")
    if any(not 0 <= i < fe.vocab for i in prompt):
        raise bad(f"prompt token ids must be in [0, {fe.vocab})", "prompt")
    return (lambda: fe.no_mask(list(prompt))), False


# Set by dgemma, or parameters of the functions the flags pass through: a client may not set them.
RESERVED_TEMPLATE_ARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "prompt", "prompt_ids", "chat"}
)
THINKING_EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


def chat_prompt(fe: Frontend, body: ChatRequest) -> tuple[Callable[[], list[int]], dict]:
    """The prompt's tokenizer thunk and the chat fields of Params (parse, tools, forced call)."""
    if not body.messages:
        raise bad("messages must not be empty", "messages")
    tools = check_tools(body.tools) if body.tools else None
    force, name = tool_choice(body.tool_choice, tools)
    messages, names = [], {}
    for i, m in enumerate(body.messages):
        param = f"messages[{i}]"
        role = {"developer": "system"}.get(m.role, m.role)
        if m.role not in ROLES:
            raise bad(f"{param}: role must be system, developer, user, assistant or tool", param)
        content = m.content if isinstance(m.content, str) else None
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise bad(f"{param}: only text content parts are supported", param)
            content = "".join(p.text for p in m.content)
        msg = {"role": role, "content": None if content is None else check_text(content, param)}
        if m.tool_calls:
            if role != "assistant":
                raise bad(f"{param}: only assistant messages carry tool_calls", param)
            msg["tool_calls"] = [_call_in(c, f"{param}.tool_calls[{k}]") for k, c in enumerate(m.tool_calls)]
            names.update({c.id: c.function.name for c in m.tool_calls if c.id})
        if role == "tool":
            name = m.name or names.get(m.tool_call_id)
            if name is None:
                raise bad(f"{param}: a tool message needs a tool_call_id of an earlier call (or a name)", param)
            msg["name"] = name
        if msg["content"] is None and not msg.get("tool_calls"):
            raise bad(f"{param}: content must be a string", param)
        messages.append(msg)
    kwargs = template_kwargs(body)
    if body.tool_choice == "none":  # the model is not told about the tools, and a call would stay text
        tools = None

    return fe.chat(messages, tools, kwargs, force, name)


def check_tools(tools: list[dict]) -> list[dict]:
    """OpenAI's function tools, validated: unique names of letters, digits, _ - . : (Gemma's call syntax)."""
    out, seen = [], set()
    for k, t in enumerate(tools):
        param = f"tools[{k}]"
        fn = t.get("function")
        if t.get("type") != "function" or not isinstance(fn, dict):
            raise bad(f'{param}: only {{"type": "function", "function": {{...}}}} tools are supported', param)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > 128:
            raise bad(f"{param}: function.name must match {NAME.pattern} (at most 128 characters)", param)
        if name in seen:
            raise bad(f"{param}: duplicate function name {name!r}", param)
        seen.add(name)
        description, parameters = fn.get("description", ""), fn.get("parameters", {"type": "object"})
        if not isinstance(description, str) or not isinstance(parameters, dict):
            raise bad(f"{param}: description must be a string and parameters an object", param)
        check_text(description, param)
        out.append(
            {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}
        )
    return out


def tool_choice(choice, tools: list[dict] | None) -> tuple[bool, str | None]:
    """(forced, name) for OpenAI's tool_choice: "auto"/"none"/None -> not forced; "required" -> any tool; a named
    function -> that one."""
    if choice in (None, "none"):
        return False, None
    if not tools:
        raise bad("tool_choice is only allowed when tools are given", "tool_choice")
    if choice == "auto":
        return False, None
    if choice == "required":
        return True, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
            raise bad(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return True, name
    raise bad(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )


def _call_in(call: ToolCallIn, param: str) -> dict:
    args = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args, parse_constant=_no_constant) if args.strip() else {}
        except (ValueError, RecursionError):
            raise bad(f"{param}: function.arguments is not valid JSON", param) from None
    if not isinstance(args, dict):
        raise bad(f"{param}: function.arguments must be a JSON object", param)
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def template_kwargs(body: ChatRequest) -> dict:
    """Template flags: chat_template_kwargs (JSON values), with reasoning_effort turning thinking on or off."""
    kwargs = body.chat_template_kwargs
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise bad("chat_template_kwargs must be an object of named values", "chat_template_kwargs")
    reserved = {k for k in kwargs if k in RESERVED_TEMPLATE_ARGS or k.startswith("_")}
    if reserved:
        raise bad(f"chat_template_kwargs may not set {sorted(reserved)}", "chat_template_kwargs")
    kwargs = dict(kwargs)
    if body.reasoning_effort is not None:
        if body.reasoning_effort not in THINKING_EFFORTS:
            raise bad(f"reasoning_effort must be one of {sorted(THINKING_EFFORTS)}", "reasoning_effort")
        kwargs.setdefault("enable_thinking", THINKING_EFFORTS[body.reasoning_effort])
    return kwargs


def edit_params(fe: Frontend, body: EditRequest) -> tuple[Params, int, int]:
    """Params for an edit, and the span [start, end) in characters."""
    text = check_text(body.text, "text")
    check_text(body.context, "context")
    start, end = span(text, body.start, body.end, body.lines)
    before, moved = move_space(body.context + text[:start])
    hint = len(fe.tokenizer.encode(text[start:end], parse_special=False)) or None
    max_tokens = body.max_tokens or min(max(fe.canvas, 2 * (hint or 0)), fe.max_tokens_cap or math.inf)
    p = params(
        fe,
        body,
        lambda: fe.tokenizer.encode(before, add_bos=True),
        max_tokens,
        suffix=text[end:],
        fill_lengths=body.fill_lengths,
        fill_hint=hint,
        fill_space=moved,
    )
    if p.n != 1:
        raise bad("edits take n = 1", "n")
    return p, start, end


def span(text: str, start: int | None, end: int | None, lines: str | None) -> tuple[int, int]:
    """[start, end) in characters from offsets or a 1-based inclusive line range "A-B" (the last line's newline
    stays outside the span)."""
    if lines is not None:
        if start is not None or end is not None:
            raise bad("give either lines or start/end", "lines")
        try:
            return line_span(text, *parse_range(lines, "lines"))
        except ConfigError as e:
            raise bad(str(e), "lines") from None
    if start is None or end is None:
        raise bad("give start and end (characters) or lines", "start")
    if not start <= end <= len(text):
        raise bad(f"need 0 <= start <= end <= {len(text)} (the text's length), got {start}, {end}", "end")
    return start, end


# --- responses ----------------------------------------------------------------------------------------------------
async def respond(fe: Frontend, plan: Plan, request: Request, kind: str, edit: tuple | None = None) -> Response:
    """Run a plan and answer it; kind: "chat", "text" (completions) or "edit" (with edit = (text, start, end))."""
    jobs, inbox = fe.submit(plan)
    prefix = {"chat": "chatcmpl-", "text": "cmpl-", "edit": "edit-"}[kind]
    obj = {"chat": "chat.completion", "text": "text_completion", "edit": "edit"}[kind]
    head = {"id": prefix + uuid.uuid4().hex, "object": obj, "created": int(time.time()), "model": fe.model_id}
    stream = _sse(fe, plan, jobs, inbox, head, kind, edit) if plan.stream else None
    collect = None if plan.stream else _collect(fe, plan, jobs, inbox, head, kind, edit)
    return await answer(request, stream, collect, lambda: fe.cancel(jobs, inbox))


def _edit_fields(edit: tuple, replacement: str) -> dict:
    text, start, end = edit
    return {"text": text[:start] + replacement + text[end:], "replacement": replacement, "start": start, "end": end}


async def _collect(fe: Frontend, plan: Plan, jobs, inbox: Inbox, head: dict, kind: str, edit) -> JSONBody:
    done: dict[int, dict] = {}
    async for what, i, payload in fe.events(plan, jobs, inbox):
        if what == "error":
            raise APIError(500, f"Generation failed: {payload}", type="server_error")
        if what == "done":
            done[i] = payload
    cached = max((d["dgemma"]["cached_tokens"] for d in done.values()), default=0)
    usage = fe.usage(plan, sum(d["completion_tokens"] for d in done.values()), cached)
    if kind == "edit":
        d = done[0]
        body = {**head, **_edit_fields(edit, d["text"]), "finish_reason": d["finish_reason"], "dgemma": d["dgemma"]}
        return JSONBody({**body, "usage": usage})
    choices = []
    for i in sorted(done):
        d = done[i]
        out = {"message": chat_message(d)} if kind == "chat" else {"text": d["text"]}
        choices.append(
            {"index": i, **out, "logprobs": None, "finish_reason": d["finish_reason"], "dgemma": d["dgemma"]}
        )
    return JSONBody({**head, "choices": choices, "usage": usage})


def chat_message(d: dict) -> dict:
    """The assistant message of a finished chat choice: content, reasoning_content, tool_calls."""
    msg = {"role": "assistant", "content": d["text"] if d["text"] or not d["tool_calls"] else None}
    if d["reasoning"]:
        msg["reasoning_content"] = d["reasoning"]
    if d["tool_calls"]:
        msg["tool_calls"] = [_call_out(c) for c in d["tool_calls"]]
    return msg


def _call_out(call: ToolCall, index: int | None = None) -> dict:
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}
    return out if index is None else {"index": index, **out}


async def _sse(fe: Frontend, plan: Plan, jobs, inbox: Inbox, head: dict, kind: str, edit) -> AsyncIterator[str]:
    chat = kind == "chat"
    head = {**head, "object": {"chat": "chat.completion.chunk", "text": "text_completion", "edit": "edit.chunk"}[kind]}
    extra = {"usage": None} if plan.include_usage else {}

    def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False, delta=None, **more) -> str:
        if chat:
            if delta is None:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish, **more}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish, **more}
        return _data({**head, "choices": [choice], **extra})

    if chat:
        for i in range(len(plan.choices)):
            yield chunk(i, None, role=True)
    total, cached, replacement, calls = 0, 0, "", collections.Counter()
    async for what, i, payload in fe.events(plan, jobs, inbox):
        if what == "reasoning":
            yield chunk(i, None, delta={"reasoning_content": payload})
        elif what == "tool_call":
            yield chunk(i, None, delta={"tool_calls": [_call_out(payload, calls[i])]})
            calls[i] += 1
        elif what == "text":
            replacement += payload
            if kind != "edit":
                yield chunk(i, payload)
        elif what == "draft":
            yield _draft_event(fe, head, i, payload)
        elif what == "done":
            total += payload["completion_tokens"]
            cached = max(cached, payload["dgemma"]["cached_tokens"])
            if kind == "edit":
                body = {**head, **_edit_fields(edit, replacement), "finish_reason": payload["finish_reason"]}
                yield _data({**body, "dgemma": payload["dgemma"], **extra})
            else:
                yield chunk(i, None, payload["finish_reason"], dgemma=payload["dgemma"])
        else:
            yield _data(APIError(500, f"Generation failed: {payload}", type="server_error").body())
            break  # the error event, then [DONE]: clients that wait for it are not left hanging
    else:
        if plan.include_usage:
            yield _data({**head, "choices": [], "usage": fe.usage(plan, total, cached)})
    yield "data: [DONE]\n\n"


def _draft_event(fe: Frontend, head: dict, i: int, d: StepEvent) -> str:
    draft = {
        "index": i,
        "canvas": d.canvas_index,
        "step": d.step,
        "tokens": d.draft,
        "pieces": [fe.piece(t) for t in d.draft],
        "accepted": d.accepted,
        "entropy": [round(h, 4) + 0.0 for h in d.entropy],
        "settled": d.settled,
        "fixed": d.fixed,
    }
    return "event: draft\n" + _data({**head, "object": "dgemma.draft", "choices": [], "dgemma_draft": draft})


def _data(obj: dict) -> str:
    return f"data: {dumps(obj)}\n\n"
