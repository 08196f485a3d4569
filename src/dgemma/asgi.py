"""ASGI pieces shared by every protocol: the `Guard` middleware (run before routing) and the SSE response.

Guard: the request head's framing (at most `MAX_HEADERS` headers in `MAX_HEADER_BYTES`: 431; exactly one `Host`, and
not both Content-Length and Transfer-Encoding, the request-smuggling shape: 400; these close the connection, so no
second request is read from the same bytes), loopback-only `Host` headers (DNS rebinding), an optional API key
(`Authorization: Bearer KEY` or Anthropic's `x-api-key: KEY`; constant-time compare of digests) on every route but
the public ones, and a body-size limit and read deadline enforced while reading (413, 408); its errors take the
shape `error_body(path, err)` gives (each protocol its own).
`EventStream` sends server-sent events from an async iterator and notices a client that went away even while the
stream is idle.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from starlette.responses import Response

from .frontend import APIError, dumps

PUBLIC_PATHS = frozenset({"/health", "/"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
MAX_BODY = 2 * 1024 * 1024
DRAIN_FACTOR = 8  # an oversized body is read (and discarded) up to this many times the limit before the 413
MAX_HEADERS, MAX_HEADER_BYTES = 100, 16 * 1024
BODY_TIMEOUT = 30.0  # seconds to read a whole body (slowloris bodies)
CLOSE = [(b"connection", b"close")]
# per body (or the context plus 4,096 where that is more): parsing and validating them stays near 10 ms
MAX_JSON_VALUES = 65_536
_STRUCTURAL = torch.zeros(256, dtype=torch.bool)
_STRUCTURAL[list(b",:[{")] = True


def json_values(body: bytes, limit: int) -> int:
    """How many JSON values and keys `body` holds (an empty array or object counts twice), counted without parsing
    it; at or below `limit`, a bound that may also count separators inside strings.

    `json.loads` holds the GIL for its whole run (some 100 ms for 2 MB of token ids), so every stream and `/health`
    wait on it: a body over the limit is refused before it is parsed. Every value or key but the first follows a
    `,`, `:`, `[` or `{` outside a string; `bytes.count` gives the bound in ~1 ms per MB, and the exact count runs
    as whole-tensor ops, which release the GIL."""
    bound = sum(body.count(c) for c in (b",", b":", b"[", b"{")) + 1
    if bound <= limit:
        return bound
    b = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    quote = b == ord('"')
    if b'\\"' in body:  # a quote after an odd run of backslashes is escaped
        at = torch.arange(len(body), dtype=torch.int32)
        last_other = torch.where(b == ord("\\"), -1, at).cummax(0).values
        run = torch.zeros_like(at)
        run[1:] = at[:-1] - last_other[:-1]
        quote &= run % 2 == 0
    outside = quote.to(torch.uint8).cumsum(0, dtype=torch.uint8) % 2 == 0  # wraps at 256 and stays right mod 2
    return int((_STRUCTURAL[b.long()] & outside).sum()) + 1


class JSONBody(Response):
    """A JSON response written by `dumps`."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return dumps(content).encode()


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


async def answer(request, stream: AsyncIterator[str] | None, collect, cancel: Callable[[], None]) -> Response:
    """The HTTP answer to a submitted generation: SSE from `stream`, or else the Response that the coroutine
    `collect` builds, awaited while watching for a disconnect; work is dropped (`cancel`) when the client leaves
    first (499: nobody is listening)."""
    if stream is not None:
        return EventStream(stream, cancel)
    collecting = asyncio.ensure_future(collect)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        finished = collecting.done()
        if not finished:
            cancel()
            collecting.cancel()
    return collecting.result() if finished else Response(status_code=499)


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Guard:
    """Pure ASGI middleware run before routing: loopback `Host` check, API key, body size limit (413)."""

    def __init__(
        self,
        app,
        api_key: str | None,
        max_body: int,
        loopback_only: bool,
        error_body: Callable[[str, APIError], dict[str, Any]] = lambda path, err: err.body(),
        body_timeout: float = BODY_TIMEOUT,
    ):
        self.app, self.max_body, self.loopback_only, self.error_body = app, max_body, loopback_only, error_body
        self.body_timeout = body_timeout
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = scope["headers"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}

        async def reject(err: APIError, extra: list | None = None) -> None:
            await _reject(send, err, self.error_body(scope["path"], err), extra)

        if (err := _framing_error(raw, headers, scope.get("http_version", "1.1"))) is not None:
            return await reject(err, CLOSE)
        if self.loopback_only and not _loopback_host(headers.get("host", "")):
            return await reject(APIError(400, "The Host header must name a loopback address.", code="bad_host"))
        if self.key_digest is not None and scope["path"] not in PUBLIC_PATHS and not self._authorized(headers):
            err = APIError(
                401,
                "Missing or invalid API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY').",
                type="authentication_error",
                code="invalid_api_key",
            )
            return await reject(err, [(b"www-authenticate", b"Bearer")])
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = headers.get("content-length", "")
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        if declared.isdigit() and int(declared) > self.max_body:
            if int(declared) <= DRAIN_FACTOR * self.max_body:  # let the client finish sending, then it reads the 413
                await _drain(receive, DRAIN_FACTOR * self.max_body, deadline)
            return await reject(_too_large(self.max_body), CLOSE)  # unread body bytes must not become a request
        body, more = bytearray(), True
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                err = APIError(408, f"The request body was not received within {self.body_timeout:g} s.")
                return await reject(err, CLOSE)
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                if more:
                    await _drain(receive, DRAIN_FACTOR * self.max_body, deadline)
                return await reject(_too_large(self.max_body), CLOSE)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects still arrive

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict) -> bool:
        """The Bearer token or the x-api-key header (Anthropic's clients) matches; both are checked."""
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        keys = [bearer if scheme.lower() == "bearer" else None, headers.get("x-api-key")]
        return any(self._matches(k) for k in keys if k is not None)

    def _matches(self, key: str) -> bool:
        digest = hashlib.sha256(key.strip().encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(digest, self.key_digest)


def _framing_error(raw: list, headers: dict, version: str) -> APIError | None:
    """What is wrong with the request head's framing (connection-level: the caller closes), or None."""
    if len(raw) > MAX_HEADERS or sum(len(k) + len(v) + 4 for k, v in raw) > MAX_HEADER_BYTES:
        return APIError(
            431, f"Request headers exceed {MAX_HEADERS} fields or {MAX_HEADER_BYTES} bytes.", code="headers_too_large"
        )
    hosts = sum(k.lower() == b"host" for k, _ in raw)
    if hosts > 1 or (hosts == 0 and version != "1.0"):  # RFC 9112 section 3.2: exactly one Host
        return APIError(400, "A request needs exactly one Host header.", code="bad_host")
    if "transfer-encoding" in headers and "content-length" in headers:  # RFC 9112 section 6.3: smuggling shape
        return APIError(400, "Content-Length and Transfer-Encoding must not both be sent.", code="bad_framing")
    return None


async def _drain(receive, limit: int, deadline: float) -> None:
    """Read and discard the rest of an oversized body (at most `limit` bytes, until `deadline`): a client still
    uploading would otherwise see the connection reset instead of the 413 (the server answers only once the
    upload ends, as the response cannot be read mid-send by most clients)."""
    seen, loop = 0, asyncio.get_running_loop()
    while seen <= limit:
        try:
            message = await asyncio.wait_for(receive(), deadline - loop.time())
        except asyncio.TimeoutError:
            return
        seen += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds {limit} bytes.", code="payload_too_large")


def _loopback_host(host: str) -> bool:
    if any(c in host for c in "/?#@"):
        return False
    name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return name.lower() in LOOPBACK_HOSTS


async def _reject(send, err: APIError, shaped: dict, headers: list | None = None) -> None:
    body = json.dumps(shaped).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (headers or [])
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
