"""The HTTP server: the FastAPI app and its routes, in front of the batching `Engine`.

Routes: `GET /v1/models`, `POST /v1/completions` (with `suffix`: infill), `POST /v1/chat/completions`,
`POST /v1/edits` (dgemma: rewrite a span in place), Anthropic's `POST /v1/messages` and `/v1/messages/count_tokens`,
`GET /health`, `GET /openapi.json`, and the live canvas view at `/`. The layers under it: `asgi.Guard` (host check,
API key, body limit) runs before routing; `openai_api` and `anthropic_api` parse and shape their wire formats;
`frontend.Frontend` validates, builds the `Request`s, runs the text layer and talks to the engine thread. HTTP
handlers never touch torch. Every error is OpenAI's JSON error shape (Anthropic's on `/v1/messages`,
`anthropic_api.error_body`) with a 4xx status (5xx only for a failed generation or a full queue).

Lifecycle: the engine thread starts and stops with the app's lifespan. SIGTERM (or `app.state.drain()`) starts a
drain: new generations get 503 and `/health` 503 at once, running ones finish for up to `grace` seconds, then the
engine stops and what is left ends with an error event (and `[DONE]`), before uvicorn's own shutdown timeout would
cut the streams. An engine that keeps crashing (`engine.MAX_RESTARTS`) calls `on_fatal`: by default the process
exits non-zero (SIGTERM to itself, so a supervisor, or uvicorn's for `--processes`, replaces it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import anthropic_api as an
from . import openai_api as oa
from . import openapi
from .asgi import BODY_TIMEOUT, MAX_BODY, MAX_JSON_VALUES, Guard, json_values
from .cache import PrefixCache
from .engine import Engine
from .frontend import APIError, Frontend
from .generate import Settle
from .transport import GRACE

log = logging.getLogger(__name__)

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
MAX_N = 8
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30
DEFAULT_SETTLE = Settle()


def create_app(
    pipeline,
    *,
    model_id: str | None = None,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_n: int = MAX_N,
    max_tokens_cap: int | None = None,
    max_body: int = MAX_BODY,
    loopback_only: bool = True,
    settle: Settle = DEFAULT_SETTLE,
    workers: int = 1,
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    empty_redraws: int | None = None,
    grace: float = GRACE,
    body_timeout: float = BODY_TIMEOUT,
    on_fatal: Callable[[], None] | None = None,
    stall_exit_s: float | None = None,
) -> FastAPI:
    """The FastAPI app. Its engine thread starts and stops with the app's lifespan. `prefix_cache_bytes`: the
    multi-turn prompt cache (0: off); `empty_redraws`: the default of the empty-reply guard (None: the
    checkpoint's settings, off unless set); `grace`: seconds a shutdown lets running generations finish;
    `on_fatal`: called when the engine gave up restarting, or hung for `stall_exit_s` (None: no watchdog) in a step
    or a prefill block (default: exit the process)."""
    if empty_redraws is not None:
        pipeline = dataclasses.replace(pipeline, settings=pipeline.settings.override(empty_redraws=empty_redraws))
    prefix = PrefixCache(prefix_cache_bytes, pipeline.model.config.canvas_length)
    fatal = on_fatal or (lambda: _exit_process(app))
    engine = Engine(
        pipeline.model,
        max_batch=max_batch,
        max_queue=max_queue,
        workers=workers,
        prefix_cache=prefix,
        on_fatal=lambda: fatal(),
        stall_exit_s=stall_exit_s,
    )
    srv = Frontend(pipeline, engine, model_id or f"dgemma-{pipeline.model_dir.name}", max_n, max_tokens_cap, settle)

    async def drain() -> None:
        """Refuse new work, let running generations finish for up to `grace` s, then fail the rest."""
        if engine.stats()["draining"]:
            return
        engine.drain()
        dead = app.state.fatal  # a hung or dead engine finishes nothing: no grace
        deadline = time.monotonic() + (0 if dead else grace)
        while not engine.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await run_in_threadpool(engine.stop)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        loop = asyncio.get_running_loop()
        restore = _on_sigterm(lambda: loop.call_soon_threadsafe(lambda: asyncio.ensure_future(drain())))
        try:
            yield
        finally:
            restore()
            await run_in_threadpool(engine.stop)

    app = FastAPI(
        title="dgemma",
        summary="OpenAI-compatible DiffusionGemma server",
        version="0.1.0",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.server, app.state.drain, app.state.fatal = srv, drain, False
    app.router.route_class = OffloadedJSONRoute  # before any route is added
    app.add_middleware(
        Guard,
        api_key=api_key,
        max_body=max_body,
        loopback_only=loopback_only,
        error_body=_body,
        body_timeout=body_timeout,
    )
    _add_error_handlers(app)
    _add_routes(app, srv, api_key is not None)
    _add_openapi(app, srv)
    return app


def _add_openapi(app: FastAPI, srv: Frontend) -> None:
    """/openapi.json with this server's model id and limits written in (`openapi.document`)."""
    build = app.openapi

    def document() -> dict:
        if app.openapi_schema is None:
            cap = min(srv.max_tokens_cap or srv.context, srv.context)
            app.openapi_schema = openapi.document(
                build(),
                model_id=srv.model_id,
                max_tokens=cap,
                max_n=srv.max_n,
                max_steps=srv.max_steps,
                vocab=srv.vocab,
            )
        return app.openapi_schema

    app.openapi = document


def _on_sigterm(hook: Callable[[], None]) -> Callable[[], None]:
    """Run `hook` on SIGTERM before the handler already installed (uvicorn's, which starts its shutdown); returns
    the undo. Signal handlers belong to the main thread: elsewhere (a server on a test thread) nothing is hooked."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(sig, frame):
        hook()
        if callable(previous):
            previous(sig, frame)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _exit_process(app: FastAPI) -> None:
    """The engine cannot run: shut down (streams end with an error event) and exit non-zero (`serve` reads
    `app.state.fatal`), so a supervisor starts a fresh process."""
    log.critical("the engine cannot recover; exiting so a supervisor can replace this process")
    app.state.fatal = True
    os.kill(os.getpid(), signal.SIGTERM)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        err = (exc.errors() or [{}])[0]
        loc = [p for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return _error(request, APIError(400, "The request body is not valid JSON."))
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if request.method == "POST" and kind != "application/json" and not kind.endswith("+json"):
            return _error(
                request, APIError(415, "The Content-Type must be application/json.", code="unsupported_media_type")
            )
        if not loc:
            return _error(request, APIError(400, "The request body must be a JSON object with the documented fields."))
        param = str(loc[0]) + (f"[{loc[1]}]" if len(loc) > 1 and isinstance(loc[1], int) else "")
        msg = err.get("msg", "invalid value")
        return _error(request, APIError(400, f"{param}: {msg}", param, "invalid_parameter"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(request, APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error(request, APIError(500, "Internal server error.", type="server_error"))


class OffloadedJSONRoute(APIRoute):
    """Parses a JSON body on a worker thread before FastAPI validates it (FastAPI would `json.loads` a 2 MB body on
    the event loop: 60 ms for 900k token ids), after refusing a body of more JSON values than `json_values_limit`
    (parsing holds the GIL however it is threaded), and refuses a token-id prompt longer than the context before the
    validation walks every id on the loop (235 ms for 900k ids). Bodies that are not JSON reach FastAPI unchanged,
    so its errors (400 here) stay as they are."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            body = await request.body()
            if body and request.headers.get("content-type", "").startswith("application/json"):
                limit = json_values_limit(request.app.state.server.context)
                values, parsed = await run_in_threadpool(_count_then_parse, body, limit)  # one hop off the loop
                if values > limit:
                    raise APIError(
                        400,
                        f"The request body holds {values} JSON values; this server parses at most {limit} per "
                        "request (send fewer prompts or token ids per request).",
                        code="request_too_complex",
                    )
                if parsed is not _INVALID:  # else FastAPI parses it again and answers 400
                    request._json = parsed  # Request.json() returns it
                    _refuse_long_id_prompt(parsed, request.app.state.server.context)
            return await handler(request)

        return route


_INVALID = object()


def _count_then_parse(body: bytes, limit: int) -> tuple[int, object]:
    """(JSON values, the parsed body); the body is parsed only within the limit, and is `_INVALID` when it is not
    JSON or over the limit."""
    values = json_values(body, limit)
    if values > limit:
        return values, _INVALID
    try:
        return values, json.loads(body)
    except (ValueError, RecursionError):
        return values, _INVALID


def json_values_limit(context: int) -> int:
    """The most JSON values one body may hold: enough for a whole context of token ids and its fields."""
    return max(MAX_JSON_VALUES, context + 4096)


def _refuse_long_id_prompt(body, context: int) -> None:
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if isinstance(prompt, list) and len(prompt) > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens; the prompt has {len(prompt)} token ids.",
            "prompt",
            "context_length_exceeded",
        )


def _add_routes(app: FastAPI, srv: Frontend, auth: bool) -> None:
    def answers(ok, **kind) -> dict:
        return openapi.responses(ok, auth=auth, **kind)

    generation = {"body": True, "model": True, "generates": True}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(prometheus(srv.engine), media_type="text/plain; version=0.0.4")

    @app.get(
        "/health",
        responses=answers(openapi.Health, public=True)
        | {503: {"model": openapi.Health, "description": "The engine is down or stalled"}},
    )
    async def health():
        ok = srv.engine.healthy()
        body = {
            "status": "ok" if ok else "unavailable",
            "model": srv.model_id,
            "auth": auth,
            "engine": srv.engine.stats(),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/", include_in_schema=False)
    async def web_view():
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models", responses=answers(openapi.ModelList))
    async def models():
        return {"object": "list", "data": [_model_card(srv)]}

    @app.get("/v1/models/{model}", responses=answers(openapi.ModelCard, model=True))
    async def model(model: str):
        if model != srv.model_id:
            raise APIError(404, "The model does not exist.", "model", "model_not_found")
        return _model_card(srv)

    @app.post("/v1/completions", responses=answers(openapi.CompletionResponse, **generation))
    async def completions(body: oa.CompletionRequest, request: Request):
        prompt, moved = oa.completion_prompt(srv, body)
        p = oa.params(
            srv, body, prompt, body.max_tokens, suffix=body.suffix, fill_lengths=body.fill_lengths, fill_space=moved
        )
        return await oa.respond(srv, await srv.plan(p), request, "text")

    @app.post("/v1/chat/completions", responses=answers(openapi.ChatCompletionResponse, **generation))
    async def chat_completions(body: oa.ChatRequest, request: Request):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        prompt, chat = oa.chat_prompt(srv, body)
        p = oa.params(srv, body, prompt, max_tokens, **chat)
        return await oa.respond(srv, await srv.plan(p), request, "chat")

    @app.post("/v1/edits", responses=answers(openapi.EditResponse, **generation))
    async def edits(body: oa.EditRequest, request: Request):
        """dgemma extension: rewrite a span of `text` in place (see openai_api.EditRequest)."""
        p, start, end = await srv.offload(oa.edit_params, srv, body)
        return await oa.respond(srv, await srv.plan(p), request, "edit", (body.text, start, end))

    @app.post("/v1/messages", responses=answers(openapi.MessageResponse, anthropic=True, **generation))
    async def messages(body: an.MessagesRequest, request: Request):
        """Anthropic's Messages API (see anthropic_api)."""
        return await an.respond(srv, await srv.plan(an.params(srv, body)), request)

    @app.post(
        "/v1/messages/count_tokens",
        responses=answers(openapi.CountTokensResponse, anthropic=True, body=True, model=True),
    )
    async def count_tokens(body: an.CountTokensRequest):
        return await an.count_tokens(srv, body)


def _model_card(srv: Frontend) -> dict:
    return {
        "id": srv.model_id,
        "object": "model",
        "created": srv.created,
        "owned_by": "dgemma",
        "dgemma": {"canvas_length": srv.canvas, "max_context": srv.context, "vocab_size": srv.vocab},
    }


def _body(path: str, exc: APIError) -> dict:
    """The error shape of the route's protocol."""
    return an.error_body(exc) if an.owns(path) else exc.body()


def _error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(_body(request.url.path, exc), status_code=exc.status, headers=exc.headers)


METRICS = [  # (name, type, help, value from (stats, latency))
    ("dgemma_engine_up", "gauge", "1 while the engine thread is alive", lambda s, l: int(s["alive"])),
    ("dgemma_requests_active", "gauge", "generations in the running batch", lambda s, l: s["active"]),
    ("dgemma_requests_queued", "gauge", "generations waiting for a batch slot", lambda s, l: s["queued"]),
    ("dgemma_requests_finished_total", "counter", "generations finished", lambda s, l: s.get("finished", 0)),
    ("dgemma_requests_cancelled_total", "counter", "generations cancelled", lambda s, l: s.get("cancelled", 0)),
    (
        "dgemma_requests_rejected_total",
        "counter",
        "generations refused by a full queue",
        lambda s, l: s.get("rejected", 0),
    ),
    (
        "dgemma_denoise_steps_total",
        "counter",
        "batched denoising steps (rate: steps/s)",
        lambda s, l: s.get("steps", 0),
    ),
    (
        "dgemma_generated_tokens_total",
        "counter",
        "tokens of finished generations (rate: tokens/s)",
        lambda s, l: s.get("generated_tokens", 0),
    ),
    (
        "dgemma_time_to_first_token_seconds_sum",
        "counter",
        "submit -> first released token, summed",
        lambda s, l: round(l["first_token_s"], 6),
    ),
    (
        "dgemma_time_to_first_token_seconds_count",
        "counter",
        "generations with a first token",
        lambda s, l: l["first_token_count"],
    ),
]


def prometheus(engine: Engine) -> str:
    """The engine's counters in Prometheus' text format (GET /metrics, auth-protected like the API)."""
    stats, latency = engine.stats(), engine.latency
    lines = []
    for name, kind, text, value in METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value(stats, latency)}"]
    return "\n".join(lines) + "\n"
