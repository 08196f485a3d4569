"""The server's OpenAPI document: response models, the status codes each route can return, and the served model's
limits written into the request schemas.

The request models live with their wire formats (`openai_api`, `anthropic_api`); this module adds what FastAPI
cannot infer: the success bodies the handlers build as plain dicts, every error status (400, never FastAPI's 422),
and per-server values (the model id as an enum, `max_tokens` / `n` / `steps` bounds, token id ranges), so a
schema-driven client or fuzzer (schemathesis) reaches generation and can check every answer against the document.
It deliberately validates nothing at request time: the bounds it writes are the ones `frontend` enforces.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

# --- error bodies -------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, on every route but Anthropic's."""

    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error shape, on /v1/messages and /v1/messages/count_tokens."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# --- success bodies -----------------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "tool_calls"]


class InfillCandidateOut(BaseModel):
    length: int
    score: float


class InfillOut(BaseModel):
    length: int
    candidates: list[InfillCandidateOut]


class ChoiceStats(BaseModel):
    """The `dgemma` object of every choice (`frontend.Frontend._stats`)."""

    seed: int
    steps_per_canvas: list[int]
    forward_passes: int
    tokens_per_forward: float
    first_token_s: float | None
    first_commit_s: float | None
    cached_tokens: int
    empty_redraws: int | None = None
    infill: InfillOut | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason
    dgemma: ChoiceStats


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class FunctionOut(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's convention)


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason
    dgemma: ChoiceStats


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class EditResponse(BaseModel):
    id: str
    object: Literal["edit"]
    created: int
    model: str
    text: str
    replacement: str
    start: int
    end: int
    finish_reason: FinishReason
    dgemma: ChoiceStats
    usage: Usage


class ModelLimits(BaseModel):
    canvas_length: int
    max_context: int
    vocab_size: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    dgemma: ModelLimits


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    auth: bool
    engine: dict[str, Any]


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class ThinkingBlock(BaseModel):
    type: Literal["thinking"]
    thinking: str
    signature: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextBlock | ThinkingBlock | ToolUseBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: AnthropicUsage
    dgemma: ChoiceStats


class CountTokensResponse(BaseModel):
    input_tokens: int


# --- status codes -------------------------------------------------------------------------------------------------
ERRORS = {
    400: "Invalid request: the body is not a JSON object, a field is missing, mistyped, out of range or not "
    "supported, the prompt does not fit the context (`code: context_length_exceeded`), or the Host header is not "
    "a loopback name on a loopback bind (`code: bad_host`).",
    401: "Missing or wrong API key (`Authorization: Bearer KEY` or `x-api-key: KEY`).",
    404: "The model is not served (`code: model_not_found`); GET /v1/models lists it.",
    413: "The request body exceeds the server's limit (2 MB by default).",
    415: "The Content-Type is not application/json.",
    500: "Generation failed inside the engine (the request is dropped; the server stays up).",
    503: "The queue is full (`code: server_overloaded`, with Retry-After) or the engine is not running.",
}
SSE_EVENT = {  # one server-sent event (stream: true); `data` is a JSON chunk or [DONE]
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
SSE = {"text/event-stream": {"schema": SSE_EVENT}}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def responses(
    ok: type[BaseModel],
    *,
    auth: bool,
    body: bool = False,
    model: bool = False,
    generates: bool = False,
    anthropic: bool = False,
    public: bool = False,
) -> dict:
    """The `responses=` of a route: 200 (`ok`, plus SSE when it `generates`), and each error status it returns."""
    error = AnthropicErrorResponse if anthropic else ErrorResponse
    codes = [400] + ([401] if auth and not public else []) + ([404] if model else [])
    codes += [413, 415] if body else []
    codes += [500, 503] if generates else []
    out: dict[int | str, dict] = {200: {"model": ok, "description": "Success"}}
    if generates:
        out[200]["content"] = SSE
    for code in codes:
        out[code] = {"model": error, "description": ERRORS[code]}
    if generates:
        out[503]["headers"] = RETRY_AFTER
    return out


# --- per-server values in the document ----------------------------------------------------------------------------
GENERATION_REQUESTS = ("CompletionRequest", "ChatRequest", "EditRequest", "MessagesRequest")


def examples(model_id: str, max_tokens: int) -> dict[str, dict]:
    """One working request per body schema, shown in the docs (and tried first by schema-driven fuzzers)."""
    n = min(16, max_tokens)
    say = [{"role": "user", "content": "Write one sentence about the sea."}]
    return {
        "CompletionRequest": {"model": model_id, "prompt": "Once upon a time", "max_tokens": n},
        "ChatRequest": {"model": model_id, "messages": say, "max_tokens": n},
        "EditRequest": {"model": model_id, "text": "The cat sat on the mat.", "start": 4, "end": 7},
        "MessagesRequest": {"model": model_id, "messages": say, "max_tokens": n},
        "CountTokensRequest": {"model": model_id, "messages": say},
    }


def document(schema: dict, *, model_id: str, max_tokens: int, max_n: int, max_steps: int, vocab: int) -> dict:
    """`schema` (FastAPI's document) with FastAPI's 422 removed and the served model's values written in: the model
    id as an enum (so generated requests name it), the bounds `frontend` enforces, and an example request body."""
    shown = examples(model_id, max_tokens)
    for path in schema["paths"].values():
        for op in path.values():
            op["responses"].pop("422", None)
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None and "$ref" in body["schema"]:
                example = shown.get(body["schema"]["$ref"].rsplit("/", 1)[-1])
                if example is not None:
                    body["example"] = example
            for p in op.get("parameters", []):
                if p["name"] == "model":
                    p["schema"] = {"type": "string", "enum": [model_id], "title": "Model"}
    comps = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    _integral(comps)
    for name in (*GENERATION_REQUESTS, "CountTokensRequest"):
        props = comps[name]["properties"]
        props["model"] = {"type": "string", "enum": [model_id], "title": "Model", "description": "GET /v1/models"}
        if name in GENERATION_REQUESTS:
            for field in ("max_tokens", "max_completion_tokens"):
                _bound(props.get(field), maximum=max_tokens)
            _bound(props.get("steps"), maximum=max_steps)
            _bound(props.get("n"), maximum=1 if name == "EditRequest" else max_n)
    prompt = comps["CompletionRequest"]["properties"]["prompt"]
    for branch in prompt["anyOf"]:
        if branch.get("type") == "array" and branch["items"].get("type") == "integer":
            branch["items"].update(minimum=0, maximum=vocab - 1)
    return schema


def _integral(node) -> None:
    """Integer bounds as integers: FastAPI writes `ge=1` as 1.0, and generators then send 3.0 for an integer field,
    which strict validation refuses."""
    if isinstance(node, list):
        for item in node:
            _integral(item)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(node.get(k), float) and node[k].is_integer():
                    node[k] = int(node[k])
        for value in node.values():
            _integral(value)


def _bound(prop: dict | None, **bounds) -> None:
    """Apply `bounds` to the integer branch(es) of a property (a plain or an `anyOf` with null)."""
    if prop is None:
        return
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "integer":
            for k, v in bounds.items():
                branch[k] = min(branch.get(k, v), v)
