"""OpenAI-compatible HTTP server: a thin FastAPI adapter in front of the batching `Engine`.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `GET /health`, `GET /openapi.json`,
and the live canvas view at `/`. Requests are validated at the boundary (strict pydantic models; every error is
OpenAI's JSON error shape with a 4xx status), tokenized in a worker thread, then handed to the engine thread; HTTP
handlers never touch torch. Safety defaults: loopback bind, loopback-only `Host` headers, an optional API key on
every route but `/health` and `/` (constant-time compare), a 2 MB body limit, caps on `max_tokens`, `n`, `stop` and
the canvas-rounded context, and the checkpoint's own chat template only.

Extensions to the OpenAI API (all optional):
- Diffusion knobs as body fields: `steps`, `entropy_bound`, `t_min`, `t_max`, `confidence_threshold`,
  `stability_threshold` (they override the checkpoint's generation_config.json).
- Every choice carries a `dgemma` object: `seed`, `steps_per_canvas`, `forward_passes`, `tokens_per_forward`,
  `first_token_s`, `first_commit_s` (on the last chunk of a stream).
- `stream_options.include_draft`: `event: draft` SSE events, one per denoising step, with the whole canvas
  (`tokens`, `pieces`, `accepted`, `entropy`, `settled`).
- `stream_options.settle_steps` / `settle_entropy`: when streamed text counts as settled (engine.Settle); streamed
  text is pinned once sent, so it is never retracted. `settle_steps: 0` streams whole canvases only and keeps the
  reference's commit rule exactly; non-streamed requests always do.

Not supported: `temperature` and `top_p` other than null or 1 (the sampler has its own schedule; use `t_min` /
`t_max`), penalties other than 0, logprobs, echo, suffix, best_of > 1, logit_bias, tools, response_format other
than text, client-supplied chat templates; each gets a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ConfigError, GenerationSettings
from .engine import Draft, Engine, EngineClosed, Failed, Finished, Job, QueueFull, Settle, Tokens

log = logging.getLogger(__name__)

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
PUBLIC_PATHS = frozenset({"/health", "/"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
MAX_BODY = 2 * 1024 * 1024
MAX_N = 8
MAX_STOP, MAX_STOP_CHARS = 4, 256
DEFAULT_SETTLE = Settle()
KNOBS = ("steps", "entropy_bound", "t_min", "t_max", "confidence_threshold", "stability_threshold")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --- request models ---------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False
    include_draft: bool = False
    settle_steps: int | None = Field(None, ge=0, le=1024)
    settle_entropy: float | None = Field(None, gt=0, le=1e9)


class GenerationFields(BaseModel):
    """Fields shared by both endpoints: OpenAI's, the diffusion knobs, and known-but-unsupported ones (checked)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    model: str
    max_tokens: int | None = Field(None, ge=1, le=2**31)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    n: int = Field(1, ge=1, le=2**31)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    steps: int | None = Field(None, ge=1, le=1024)
    entropy_bound: float | None = Field(None, gt=0, le=1e9)
    t_min: float | None = Field(None, ge=0, le=1e3)
    t_max: float | None = Field(None, gt=0, le=1e3)
    confidence_threshold: float | None = Field(None, gt=0, le=1e9)
    stability_threshold: int | None = Field(None, ge=0, le=1024)
    chat_template: Any = None
    chat_template_kwargs: Any = None


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Any = None


class ChatRequest(GenerationFields):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None


def _unsupported(body: GenerationFields) -> None:
    """400 naming the first field whose value would change semantics dgemma cannot honour."""
    fields = body.model_fields_set
    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("temperature", lambda v: v in (None, 1), "the diffusion sampler uses its own schedule; set t_min/t_max"),
        ("top_p", lambda v: v in (None, 1), "nucleus sampling is not supported by the diffusion sampler"),
        ("presence_penalty", lambda v: v in (None, 0), "penalties are not supported"),
        ("frequency_penalty", lambda v: v in (None, 0), "penalties are not supported"),
        ("logit_bias", lambda v: not v, "logit_bias is not supported"),
        ("chat_template", lambda v: False, "the checkpoint's own chat template is always used"),
        ("chat_template_kwargs", lambda v: False, "the checkpoint's own chat template is always used"),
        ("echo", lambda v: not v, "echo is not supported"),
        ("suffix", lambda v: not v, "suffix (insertion) is not supported"),
        ("best_of", lambda v: v in (None, 1), "best_of is not supported"),
        ("logprobs", lambda v: v in (None, False), "logprobs are not supported"),
        ("top_logprobs", lambda v: v is None, "logprobs are not supported"),
        ("response_format", lambda v: v in (None, {"type": "text"}), "only response_format {'type': 'text'}"),
        ("tools", lambda v: not v, "tools are not supported"),
        ("tool_choice", lambda v: v in (None, "none"), "tools are not supported"),
        ("functions", lambda v: not v, "function calling is not supported"),
        ("function_call", lambda v: v in (None, "none"), "function calling is not supported"),
        ("parallel_tool_calls", lambda v: True, ""),
        ("audio", lambda v: v is None, "audio output is not supported"),
        ("modalities", lambda v: v in (None, ["text"]), "only text output is supported"),
        ("prediction", lambda v: v is None, "predicted outputs are not supported"),
    ]
    for name, ok, why in checks:
        if name in fields and not ok(getattr(body, name, None)):
            raise APIError(400, f"'{name}' is not supported: {why}", param=name, code="unsupported_parameter")


# --- per-request plan ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """A validated request, ready for the engine."""

    prompt_ids: list[int]
    settings: GenerationSettings
    max_tokens: int
    stop: list[str]
    seeds: list[int]
    stream: bool
    include_usage: bool
    draft: bool
    settle: Settle | None


class ChoiceText:
    """One choice's text: token cap, UTF-8-safe incremental decoding and stop strings. Append-only: a trailing
    incomplete character or a tail that could still become a stop string is held back until it resolves."""

    def __init__(self, tokenizer, stop: list[str], max_tokens: int, eos: set[int]):
        self.tokenizer, self.stop, self.max_tokens, self.eos = tokenizer, stop, max_tokens, eos
        self.ids: list[int] = []
        self.sent = ""
        self.finish_reason: str | None = None

    def push(self, ids: list[int], final_reason: str | None = None) -> str:
        """Append tokens; `final_reason` when generation ended. Returns the new text (may be empty)."""
        if self.finish_reason is not None:
            return ""
        room = self.max_tokens - len(self.ids)
        if len(ids) >= room:
            ids = ids[:room]
            final_reason = "stop" if self.eos.intersection(self.ids + ids) else "length"
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        if final_reason is None:
            text = text.rstrip("\ufffd")  # a multi-byte character may be completed by the next token
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            text, final_reason = text[:cut], "stop"
        elif final_reason is None:
            text = text[: len(text) - self._held_back(text)]
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        self.finish_reason = final_reason
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


# --- the app --------------------------------------------------------------------------------------------------------
class _DraftSlot:
    __slots__ = ("draft", "taken")

    def __init__(self, draft: Draft):
        self.draft, self.taken = draft, False


class Inbox:
    """One request's events from the engine thread, consumed by its response on the event loop. Tokens, Finished
    and Failed are all kept, in order; a Draft replaces the still-unread Draft of its choice when nothing else came
    after it. So a client that reads slowly gets the newest canvas, and what waits here is bounded by the request's
    tokens, not by its number of steps."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.open: dict[int, _DraftSlot] = {}  # choice -> its draft slot still in the queue, nothing after it

    def deliver_to(self, i: int) -> Callable[[object], None]:
        def deliver(ev) -> None:  # runs on the engine thread
            try:
                self.loop.call_soon_threadsafe(self._put, i, ev)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        return deliver

    def _put(self, i: int, ev) -> None:
        if isinstance(ev, Draft):
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


class Server:
    """Request handling state shared by the routes: pipeline, engine, limits."""

    def __init__(self, pipeline, engine: Engine, model_id: str, max_n: int, max_tokens_cap: int | None,
                 settle: Settle):  # fmt: skip
        if pipeline.tokenizer is None:
            raise ValueError(f"{pipeline.model_dir} has no tokenizer.json; the server needs one")
        self.pipeline, self.engine, self.model_id = pipeline, engine, model_id
        self.tokenizer = pipeline.tokenizer
        self.max_n, self.max_tokens_cap, self.settle = max_n, max_tokens_cap, settle
        self.canvas = pipeline.model.config.canvas_length
        self.context = pipeline.model.text.max_position_embeddings
        self.vocab = pipeline.model.text.vocab_size
        self.created = int(time.time())
        self._pieces: dict[int, str] = {}

    # --- validation ------------------------------------------------------------------------------------------
    async def plan(self, body: GenerationFields, prompt_ids: Callable[[], list[int]], max_tokens: int | None) -> Plan:
        if body.model != self.model_id:
            raise APIError(404, "The model does not exist; GET /v1/models lists the served model.", "model",
                           "model_not_found")  # fmt: skip
        _unsupported(body)
        if body.n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n}", "n", "invalid_parameter")
        stop = _stop_list(body.stop)
        knobs = {k: getattr(body, k) for k in KNOBS}
        try:
            settings = self.pipeline.settings.override(**knobs)  # validates the combination (e.g. t_min < t_max)
        except ConfigError as e:
            raise APIError(400, str(e), None, "invalid_parameter") from None
        try:
            ids = await run_in_threadpool(prompt_ids)
        except ConfigError as e:
            raise APIError(400, str(e), None, "invalid_parameter") from None
        max_tokens = self._check_length(len(ids), max_tokens, settings.max_new_tokens)
        opts = body.stream_options or StreamOptions()
        settle = None
        if body.stream and opts.settle_steps != 0:
            settle = Settle(opts.settle_steps or self.settle.steps, opts.settle_entropy or self.settle.entropy)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**62)
        return Plan(
            ids, settings.override(max_new_tokens=max_tokens), max_tokens, stop, [seed + i for i in range(body.n)],
            body.stream, opts.include_usage, opts.include_draft and body.stream, settle,
        )  # fmt: skip

    def _check_length(self, prompt_len: int, max_tokens: int | None, default: int) -> int:
        """max_tokens after the context check; canvases make the real budget ceil(max_tokens / C) * C."""
        c, room = self.canvas, self.context - prompt_len
        if max_tokens is None:
            max_tokens = min(default, room // c * c, self.max_tokens_cap or math.inf)
            if max_tokens < 1:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                               f"{prompt_len} tokens, leaving no room for one canvas of {c}.", "prompt",
                               "context_length_exceeded")  # fmt: skip
            return max_tokens
        if self.max_tokens_cap is not None and max_tokens > self.max_tokens_cap:
            raise APIError(400, f"max_tokens must be at most {self.max_tokens_cap}", "max_tokens", "invalid_parameter")
        needed = math.ceil(max_tokens / c) * c
        if prompt_len + needed > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                           f"{prompt_len} tokens and max_tokens={max_tokens} needs {needed} (canvases of {c}).",
                           "max_tokens", "context_length_exceeded")  # fmt: skip
        return max_tokens

    def completion_prompt(self, body: CompletionRequest) -> Callable[[], list[int]]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt", "invalid_parameter")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not _check_text(prompt, "prompt").strip():
                raise APIError(400, "prompt must not be empty", "prompt", "invalid_parameter")
            return lambda: self.tokenizer.encode(prompt, add_bos=True)
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_parameter")
        if any(not 0 <= i < self.vocab for i in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab})", "prompt", "invalid_parameter")
        return lambda: list(prompt)

    def chat_prompt(self, body: ChatRequest) -> Callable[[], list[int]]:
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages", "invalid_parameter")
        messages = []
        for i, m in enumerate(body.messages):
            param = f"messages[{i}]"
            role = {"developer": "system"}.get(m.role, m.role)
            if role not in ("system", "user", "assistant") or m.tool_calls is not None:
                raise APIError(400, f"{param}: role must be system, user or assistant (no tools)", param,
                               "invalid_parameter")  # fmt: skip
            content = m.content if isinstance(m.content, str) else None
            if isinstance(m.content, list):
                if any(p.type != "text" or p.text is None for p in m.content):
                    raise APIError(400, f"{param}: only text content parts are supported", param, "invalid_parameter")
                content = "".join(p.text for p in m.content)
            if content is None:
                raise APIError(400, f"{param}: content must be a string", param, "invalid_parameter")
            messages.append({"role": role, "content": _check_text(content, param)})
        return lambda: self.pipeline.prompt_ids(messages=messages)

    # --- running ---------------------------------------------------------------------------------------------
    def submit(self, plan: Plan) -> tuple[list[Job], Inbox]:
        inbox = Inbox(asyncio.get_running_loop())
        jobs = [
            Job(plan.prompt_ids, plan.settings, seed, inbox.deliver_to(i), plan.settle, plan.draft)
            for i, seed in enumerate(plan.seeds)
        ]
        try:
            self.engine.submit(jobs)
        except QueueFull:
            raise APIError(503, "The server is busy; retry shortly.", None, "server_overloaded",
                           "server_error", {"Retry-After": "1"}) from None  # fmt: skip
        except EngineClosed:
            raise APIError(503, "The engine is not running.", None, "engine_unavailable", "server_error") from None
        return jobs, inbox

    def cancel(self, jobs: list[Job], inbox: Inbox | None = None) -> None:
        for job in jobs:
            if not job.cancelled:
                self.engine.cancel(job)
        if inbox is not None:
            inbox.wake()  # a waiting consumer ends

    def texts(self, plan: Plan) -> list[ChoiceText]:
        eos = set(plan.settings.eos_token_ids)
        return [ChoiceText(self.tokenizer, plan.stop, plan.max_tokens, eos) for _ in plan.seeds]

    async def events(self, plan: Plan, jobs: list[Job], inbox: Inbox) -> AsyncIterator[tuple]:
        """(kind, index, payload) until every choice has finished: ("text", i, delta), ("draft", i, Draft),
        ("done", i, stats), or ("error", -1, message); stops early when the client went away."""
        texts, pending = self.texts(plan), set(range(len(jobs)))
        while pending:
            i, ev = await inbox.get()
            if i == -1:
                return
            if i not in pending:
                continue
            if isinstance(ev, Draft):
                yield "draft", i, ev
                continue
            if isinstance(ev, Failed):
                self.cancel(jobs)
                yield "error", -1, ev.message
                return
            delta = texts[i].push(ev.ids) if isinstance(ev, Tokens) else texts[i].push([], ev.finish_reason)
            if delta:
                yield "text", i, delta
            if texts[i].finish_reason is not None:
                pending.discard(i)
                self.cancel([jobs[i]])  # stop string or token cap: drop remaining work
                yield "done", i, self._stats(plan, i, jobs[i], texts[i], ev if isinstance(ev, Finished) else None)

    def _stats(self, plan: Plan, i: int, job: Job, text: ChoiceText, fin: Finished | None) -> dict:
        gen = job.gen
        steps = fin.steps_per_canvas if fin else list(gen.steps_per_canvas) if gen else []
        passes = fin.forward_passes if fin else gen.forward_passes if gen else 0
        first = job.first_token and job.first_token - job.submitted
        commit = job.first_commit and job.first_commit - job.submitted
        return {
            "finish_reason": text.finish_reason, "completion_tokens": len(text.ids), "text": text.sent,
            "dgemma": {
                "seed": plan.seeds[i], "steps_per_canvas": steps, "forward_passes": passes,
                "tokens_per_forward": round(len(text.ids) / max(passes, 1), 4),
                "first_token_s": first and round(first, 4), "first_commit_s": commit and round(commit, 4),
            },
        }  # fmt: skip

    def piece(self, token_id: int) -> str:
        if (p := self._pieces.get(token_id)) is None:
            p = self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special=False)
        return p

    def usage(self, plan: Plan, completion_tokens: int) -> dict:
        p = len(plan.prompt_ids)
        return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}


def _check_text(text: str, param: str) -> str:
    """JSON may carry lone surrogates (\\ud800); they are not text and the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} is not valid Unicode (lone surrogate)", param, "invalid_parameter") from None
    return text


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings", "stop", "invalid_parameter")
    if any(not _check_text(s, "stop") or len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"each stop string needs 1 to {MAX_STOP_CHARS} characters", "stop", "invalid_parameter")
    return stop


def create_app(pipeline, *, model_id: str | None = None, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, max_n: int = MAX_N, max_tokens_cap: int | None = None,
               max_body: int = MAX_BODY, loopback_only: bool = True, settle: Settle = DEFAULT_SETTLE,
               workers: int = 1) -> FastAPI:  # fmt: skip
    """The FastAPI app. Its engine thread starts and stops with the app's lifespan."""
    engine = Engine(pipeline.model, max_batch=max_batch, max_queue=max_queue, workers=workers)
    srv = Server(pipeline, engine, model_id or f"dgemma-{pipeline.model_dir.name}", max_n, max_tokens_cap, settle)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="dgemma", summary="OpenAI-compatible DiffusionGemma server", version="0.1.0",
                  docs_url=None, redoc_url=None, lifespan=lifespan)  # fmt: skip
    app.state.server = srv
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, loopback_only=loopback_only)
    _add_error_handlers(app)
    _add_routes(app, srv, api_key is not None)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        err = (exc.errors() or [{}])[0]
        loc = [p for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return APIError(400, "The request body is not valid JSON.").response()
        if not loc:
            return APIError(400, "The request body must be a JSON object with the documented fields.").response()
        param = str(loc[0]) + (f"[{loc[1]}]" if len(loc) > 1 and isinstance(loc[1], int) else "")
        msg = err.get("msg", "invalid value")
        return APIError(400, f"{param}: {msg}", param, "invalid_parameter").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return APIError(500, "Internal server error.", type="server_error").response()


def _add_routes(app: FastAPI, srv: Server, auth: bool) -> None:
    @app.get("/health")
    async def health():
        ok = srv.engine.healthy()
        body = {"status": "ok" if ok else "unavailable", "model": srv.model_id, "auth": auth,
                "engine": srv.engine.stats()}  # fmt: skip
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/", include_in_schema=False)
    async def web_view():
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(srv)]}

    @app.get("/v1/models/{model}")
    async def model(model: str):
        if model != srv.model_id:
            raise APIError(404, "The model does not exist.", "model", "model_not_found")
        return _model_card(srv)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        plan = await srv.plan(body, srv.completion_prompt(body), body.max_tokens)
        return await _respond(srv, plan, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        plan = await srv.plan(body, srv.chat_prompt(body), max_tokens)
        return await _respond(srv, plan, request, chat=True)


def _model_card(srv: Server) -> dict:
    return {
        "id": srv.model_id, "object": "model", "created": srv.created, "owned_by": "dgemma",
        "dgemma": {"canvas_length": srv.canvas, "max_context": srv.context, "vocab_size": srv.vocab},
    }  # fmt: skip


async def _respond(srv: Server, plan: Plan, request: Request, chat: bool) -> Response:
    jobs, inbox = srv.submit(plan)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": srv.model_id}  # fmt: skip
    if plan.stream:
        return EventStream(_sse(srv, plan, jobs, inbox, head, chat), lambda: srv.cancel(jobs, inbox))
    collect = asyncio.ensure_future(_collect(srv, plan, jobs, inbox, head, chat))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not collect.done():
            srv.cancel(jobs, inbox)
            collect.cancel()
        gone.cancel()
    if collect.cancelled():
        return Response(status_code=499)  # nobody is listening
    return collect.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(srv: Server, plan: Plan, jobs, inbox: Inbox, head: dict, chat: bool) -> JSONResponse:
    done: dict[int, dict] = {}
    async for kind, i, payload in srv.events(plan, jobs, inbox):
        if kind == "error":
            raise APIError(500, f"Generation failed: {payload}", type="server_error")
        if kind == "done":
            done[i] = payload
    choices = []
    for i in sorted(done):
        d = done[i]
        out = {"message": {"role": "assistant", "content": d["text"]}} if chat else {"text": d["text"]}
        choices.append({"index": i, **out, "logprobs": None, "finish_reason": d["finish_reason"],
                        "dgemma": d["dgemma"]})  # fmt: skip
    usage = srv.usage(plan, sum(d["completion_tokens"] for d in done.values()))
    return JSONResponse({**head, "choices": choices, "usage": usage})


async def _sse(srv: Server, plan: Plan, jobs, inbox: Inbox, head: dict, chat: bool) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if plan.include_usage else {}

    def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False, **more) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish, **more}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish, **more}
        return _data({**head, "choices": [choice], **extra})

    if chat:
        for i in range(len(jobs)):
            yield chunk(i, None, role=True)
    total = 0
    async for kind, i, payload in srv.events(plan, jobs, inbox):
        if kind == "text":
            yield chunk(i, payload)
        elif kind == "draft":
            yield _draft_event(srv, head, i, payload)
        elif kind == "done":
            total += payload["completion_tokens"]
            yield chunk(i, None, payload["finish_reason"], dgemma=payload["dgemma"])
        else:
            yield _data(APIError(500, f"Generation failed: {payload}", type="server_error").body())
            return
    if plan.include_usage:
        yield _data({**head, "choices": [], "usage": srv.usage(plan, total)})
    yield "data: [DONE]\n\n"


def _draft_event(srv: Server, head: dict, i: int, d: Draft) -> str:
    draft = {
        "index": i, "canvas": d.canvas_index, "step": d.step, "tokens": d.tokens,
        "pieces": [srv.piece(t) for t in d.tokens], "accepted": d.accepted,
        "entropy": [round(h, 4) for h in d.entropy], "settled": d.settled,
    }  # fmt: skip
    return "event: draft\n" + _data({**head, "object": "dgemma.draft", "choices": [], "dgemma_draft": draft})


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(Response):
    """Server-sent events from an async iterator; calls `on_close` when the stream ends or the client goes away
    (watched on `receive`, so an idle stream notices a disconnect too)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]):
        self.status_code, self.background = 200, None  # no Response.__init__: it would add content-length: 0
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.body_iterator, self.on_close = body, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_close()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for text in self.body_iterator:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-write
        finally:
            watcher.cancel()
            self.on_close()


class Guard:
    """Pure ASGI middleware run before routing: loopback `Host` check, API key, body size limit (413)."""

    def __init__(self, app, api_key: str | None, max_body: int, loopback_only: bool):
        self.app, self.max_body, self.loopback_only = app, max_body, loopback_only
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.loopback_only and not _loopback_host(headers.get("host", "")):
            return await _reject(send, APIError(400, "The Host header must name a loopback address.", code="bad_host"))
        if self.key_digest is not None and scope["path"] not in PUBLIC_PATHS and not self._authorized(headers):
            err = APIError(401, "Missing or invalid API key (send 'Authorization: Bearer KEY').",
                           type="authentication_error", code="invalid_api_key")  # fmt: skip
            return await _reject(send, err, [(b"www-authenticate", b"Bearer")])
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await _reject(send, _too_large(self.max_body))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await _reject(send, _too_large(self.max_body))
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects still arrive

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(key.strip().encode("utf-8", "surrogateescape")).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self.key_digest)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds {limit} bytes.", code="payload_too_large")


def _loopback_host(host: str) -> bool:
    if any(c in host for c in "/?#@"):
        return False
    name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return name.lower() in LOOPBACK_HOSTS


async def _reject(send, err: APIError, headers: list | None = None) -> None:
    body = json.dumps(err.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (headers or [])
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
