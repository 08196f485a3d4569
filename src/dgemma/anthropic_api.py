"""Anthropic Messages API wire format: `POST /v1/messages` (streamed or not) and `/v1/messages/count_tokens`.

Requests become the same template messages and `frontend.Params` as OpenAI's chat completions (`openai_api` owns
tool validation and `tool_choice`); answers are Anthropic's message object, or its SSE events (`message_start`,
`content_block_start` / `_delta` / `_stop` per block in order, `message_delta`, `message_stop`). Errors on these
routes use Anthropic's shape (`error_body`). Content blocks: text, tool_use and tool_result in, thinking / text /
tool_use out; images, documents and server tools get a 400. `thinking.budget_tokens` is accepted, not enforced
(thinking counts against `max_tokens`); signatures are empty. Extensions: `seed` and the diffusion knobs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from . import openai_api as oa
from .asgi import JSONBody, answer
from .chat import ToolCall
from .frontend import APIError, Frontend, Inbox, Params, Plan, bad, check_text, dumps

PATH = "/v1/messages"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # Anthropic's -> OpenAI's
EMPTY_BLOCKS = {"text": {"type": "text", "text": ""}, "thinking": {"type": "thinking", "thinking": "", "signature": ""}}


# --- request models ---------------------------------------------------------------------------------------------
STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
_EXTENSIONS = ("seed", *(k for k in oa.KNOBS if k != "temperature"))  # temperature: Anthropic's range, below
Extensions = create_model(
    "Extensions",
    __config__=STRICT,
    **{k: (oa.GenerationFields.model_fields[k].annotation, oa.GenerationFields.model_fields[k]) for k in _EXTENSIONS},
)


class TextPart(BaseModel):
    model_config = STRICT
    type: str
    text: str | None = None


class Block(BaseModel):
    """Any content block; `messages` checks which fields its type needs."""

    model_config = STRICT
    type: str = Field(json_schema_extra={"enum": ["text", "tool_use", "tool_result", "thinking", "redacted_thinking"]})
    text: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None  # tool_result
    content: str | list[TextPart] | None = None
    is_error: bool = False


class MessageIn(BaseModel):
    model_config = STRICT
    role: str = Field(json_schema_extra={"enum": ["user", "assistant"]})
    content: str | list[Block]


class ToolIn(BaseModel):
    model_config = STRICT
    name: str
    description: str = ""
    input_schema: dict[str, Any]
    type: str | None = None  # "custom"; server tools (web_search_..., bash_...) are refused


class ToolChoiceIn(BaseModel):
    model_config = STRICT
    type: str
    name: str | None = None
    disable_parallel_tool_use: bool | None = None  # dgemma's forced calls are single anyway


class ThinkingIn(BaseModel):
    model_config = STRICT
    type: str
    budget_tokens: int | None = Field(None, ge=1, le=2**31)


class CountTokensRequest(Extensions):
    model: str
    messages: list[MessageIn] = Field(json_schema_extra=oa.NON_EMPTY)
    system: str | list[TextPart] | None = None
    tools: list[ToolIn] | None = Field(None, max_length=128)
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=2**31)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None  # refused: the sampler has no top-k
    metadata: dict[str, Any] | None = None  # ignored


# --- requests -> Params -----------------------------------------------------------------------------------------
def params(fe: Frontend, body: MessagesRequest) -> Params:
    if body.top_k is not None:
        raise bad("'top_k' is not supported: use top_p or temperature", "top_k")
    prompt, chat = chat_prompt(fe, body)
    knobs = {k: getattr(body, k) for k in oa.KNOBS}
    return Params(prompt, body.max_tokens, body.stop_sequences or [], body.seed, 1, knobs, body.stream, **chat)


def chat_prompt(fe: Frontend, body: CountTokensRequest) -> tuple:
    """The prompt's tokenizer thunk and the chat fields of Params, as `openai_api.chat_prompt` gives them."""
    if body.model != fe.model_id:
        raise APIError(404, "The model is not served; GET /v1/models lists it.", "model", "model_not_found")
    messages = template_messages(body)
    tools = oa.check_tools([_function(t, k) for k, t in enumerate(body.tools)]) if body.tools else None
    choice = _tool_choice(body.tool_choice)
    force, name = oa.tool_choice(choice, tools)
    if choice == "none":  # as in openai_api: the model is not told about the tools
        tools = None
    kwargs = {}
    if body.thinking is not None:
        if body.thinking.type not in ("enabled", "disabled"):
            raise bad('thinking.type must be "enabled" or "disabled"', "thinking")
        kwargs["enable_thinking"] = body.thinking.type == "enabled"

    return fe.chat(messages, tools, kwargs, force, name)


def template_messages(body: CountTokensRequest) -> list[dict]:
    """Anthropic's system + messages as the chat template's messages (roles system/user/assistant/tool)."""
    if not body.messages:
        raise bad("messages must not be empty", "messages")
    out = []
    if body.system:
        system = body.system if isinstance(body.system, str) else _joined(body.system, "system")
        out.append({"role": "system", "content": check_text(system, "system")})
    names: dict[str, str] = {}  # tool_use id -> tool name, for the tool_result blocks after it
    for i, m in enumerate(body.messages):
        param = f"messages[{i}]"
        if m.role not in ("user", "assistant"):
            raise bad(f"{param}: role must be user or assistant (the system prompt goes in 'system')", param)
        blocks = [Block(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if not blocks:
            raise bad(f"{param}: content must not be empty", param)
        out += _assistant(blocks, param, names) if m.role == "assistant" else _user(blocks, param, names)
    if body.messages[-1].role != "user":
        raise bad("the last message must have role user (prefilling the assistant turn is not supported)", "messages")
    return out


def _user(blocks: list[Block], param: str, names: dict[str, str]) -> list[dict]:
    """A tool message per tool_result (in order), then the text blocks joined as one user message."""
    out, text = [], []
    for k, b in enumerate(blocks):
        where = f"{param}.content[{k}]"
        if b.type == "text":
            text.append(_text(b, where))
        elif b.type == "tool_result":
            name = names.get(b.tool_use_id)
            if name is None:
                raise bad(f"{where}: tool_use_id {b.tool_use_id!r} matches no earlier tool_use block", where)
            result = b.content if isinstance(b.content, str) else _joined(b.content or [], where)
            out.append({"role": "tool", "name": name, "content": ("Error: " if b.is_error else "") + result})
        else:
            raise bad(f"{where}: user messages take text and tool_result blocks, not {b.type!r}", where)
    if text:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _assistant(blocks: list[Block], param: str, names: dict[str, str]) -> list[dict]:
    text, calls = [], []
    for k, b in enumerate(blocks):
        where = f"{param}.content[{k}]"
        if b.type == "text":
            text.append(_text(b, where))
        elif b.type == "tool_use":
            if b.id is None or b.name is None or b.input is None:
                raise bad(f"{where}: a tool_use block needs id, name and input (an object)", where)
            check_text(json.dumps(b.input, ensure_ascii=False), where)
            names[b.id] = b.name
            calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}})
        elif b.type not in ("thinking", "redacted_thinking"):  # past thinking: the template drops it anyway
            raise bad(f"{where}: assistant messages take text, thinking and tool_use blocks, not {b.type!r}", where)
    msg = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    return [{**msg, "tool_calls": calls} if calls else msg]


def _text(b: Block | TextPart, where: str) -> str:
    if b.type != "text" or b.text is None:
        raise bad(f"{where}: only text blocks are supported here, with a 'text' string", where)
    return check_text(b.text, where)


def _joined(parts: list[TextPart], where: str) -> str:
    return "".join(_text(p, f"{where}[{k}]") for k, p in enumerate(parts))


def _function(tool: ToolIn, k: int) -> dict:
    if tool.type not in (None, "custom"):
        raise bad(f"tools[{k}]: server tools ({tool.type!r}) are not supported; give name and input_schema", "tools")
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.input_schema},
    }


def _tool_choice(choice: ToolChoiceIn | None) -> str | dict | None:
    """Anthropic's tool_choice in OpenAI's terms (validated there): any -> "required", tool -> named."""
    if choice is None:
        return None
    if choice.type == "tool":
        if choice.name is None:
            raise bad('tool_choice {"type": "tool"} needs a name', "tool_choice")
        return {"type": "function", "function": {"name": choice.name}}
    if choice.type not in TOOL_CHOICES:
        raise bad('tool_choice.type must be "auto", "any", "tool" or "none"', "tool_choice")
    return TOOL_CHOICES[choice.type]


async def count_tokens(fe: Frontend, body: CountTokensRequest) -> dict:
    prompt, _ = chat_prompt(fe, body)
    return {"input_tokens": len(await fe.offload(prompt))}


# --- responses ----------------------------------------------------------------------------------------------------
def owns(path: str) -> bool:
    """Whether errors on this path take Anthropic's shape."""
    return path == PATH or path.startswith(PATH + "/")


def error_body(exc: APIError) -> dict:
    kind = ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


async def respond(fe: Frontend, plan: Plan, request: Request) -> Response:
    jobs, inbox = fe.submit(plan)
    head = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": fe.model_id}
    stream = _sse(fe, plan, jobs, inbox, head) if plan.stream else None
    collect = None if plan.stream else _collect(fe, plan, jobs, inbox, head)
    return await answer(request, stream, collect, lambda: fe.cancel(jobs, inbox))


async def _collect(fe: Frontend, plan: Plan, jobs, inbox: Inbox, head: dict) -> JSONBody:
    done = None
    async for what, _, payload in fe.events(plan, jobs, inbox):
        if what == "error":
            raise APIError(500, f"Generation failed: {payload}", type="api_error")
        if what == "done":
            done = payload
    content = [{"type": "thinking", "thinking": done["reasoning"], "signature": ""}] if done["reasoning"] else []
    content += [{"type": "text", "text": done["text"]}] if done["text"] else []
    content += [_tool_use(c) for c in done["tool_calls"]]
    body = {**head, "content": content, **_stop(done), "usage": _usage(plan, done)}
    return JSONBody({**body, "dgemma": done["dgemma"]})


def _stop(done: dict) -> dict:
    """stop_reason and stop_sequence (the text layer names the stop string that cut the output)."""
    if done["stop_sequence"] is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": done["stop_sequence"]}
    return {"stop_reason": STOP_REASONS[done["finish_reason"]], "stop_sequence": None}


def _usage(plan: Plan, done: dict | None) -> dict:
    """Anthropic's input_tokens leave out the cached ones (total input = input + cache read + cache creation)."""
    cached = done["dgemma"]["cached_tokens"] if done else 0
    return {
        "input_tokens": plan.prompt_tokens - cached,
        "output_tokens": done["completion_tokens"] if done else 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _tool_use(call: ToolCall) -> dict:
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),
        "name": call.name,
        "input": call.arguments,
    }


async def _sse(fe: Frontend, plan: Plan, jobs, inbox: Inbox, head: dict) -> AsyncIterator[str]:
    start = {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": _usage(plan, None)}
    yield _event("message_start", message=start)
    yield _event("ping")
    blocks = _Blocks()
    async for what, _, payload in fe.events(plan, jobs, inbox):
        if what == "reasoning":
            events = blocks.delta("thinking", {"type": "thinking_delta", "thinking": payload})
        elif what == "text":
            events = blocks.delta("text", {"type": "text_delta", "text": payload})
        elif what == "tool_call":
            events = blocks.start("tool_use", {**_tool_use(payload), "input": {}})
            events += blocks.delta("tool_use", {"type": "input_json_delta", "partial_json": payload.arguments_json})
            events += blocks.stop()
        elif what == "done":
            usage = _usage(plan, payload)
            events = blocks.stop() + [
                _event("message_delta", delta=_stop(payload), usage=usage, dgemma=payload["dgemma"]),
                _event("message_stop"),
            ]
        elif what == "error":
            events = [_event("error", error={"type": "api_error", "message": f"Generation failed: {payload}"})]
        else:
            continue  # drafts: not part of this protocol
        for event in events:
            yield event


class _Blocks:
    """The content blocks of a streamed message, in order, one open at a time."""

    def __init__(self):
        self.index, self.open = -1, None

    def start(self, kind: str, block: dict) -> list[str]:
        out = self.stop()
        self.index, self.open = self.index + 1, kind
        return out + [_event("content_block_start", index=self.index, content_block=block)]

    def delta(self, kind: str, delta: dict) -> list[str]:
        out = [] if self.open == kind else self.start(kind, EMPTY_BLOCKS[kind])
        return out + [_event("content_block_delta", index=self.index, delta=delta)]

    def stop(self) -> list[str]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":  # the API sends a thinking block's signature last; dgemma's are empty
            out.append(
                _event("content_block_delta", index=self.index, delta={"type": "signature_delta", "signature": ""})
            )
        self.open = None
        return out + [_event("content_block_stop", index=self.index)]


def _event(kind: str, **fields) -> str:
    data = dumps({"type": kind, **fields})
    return f"event: {kind}\ndata: {data}\n\n"
