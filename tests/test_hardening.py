"""Hardening regressions (issue 14; ../shared/notes/hardening-checklist.md sections A, C5, D, E, G): each test
replays a finding against a real server (uvicorn with dgemma's transport options on a loopback port, or
`dgemma serve` in its own process) over raw sockets or httpx, and checks the fixed behaviour: the HTTP edges
(slowloris heads and bodies, header limits, Host, request smuggling), an event loop that never blocks, engine
faults that heal, and SIGTERM drains."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving import LiveServer, server_checkpoint

from dgemma.generate import Pipeline
from dgemma.server import create_app
from dgemma.transport import HardenedH11, uvicorn_options

MODEL = "tiny"
ROOT = Path(__file__).resolve().parents[1]


class QuickH11(HardenedH11):
    head_timeout = 1.0


def options(**more) -> dict:
    return {**uvicorn_options("warning", grace=2), "http": QuickH11, **more}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return Pipeline.load(server_checkpoint(tmp_path_factory.mktemp("hardening_ckpt")), device="cpu")


@pytest.fixture(scope="module")
def live(pipeline):
    app = create_app(pipeline, model_id=MODEL, body_timeout=1.5, on_fatal=lambda: None)
    with LiveServer(app, **options()) as s:
        yield s


def raw(port: int, data: bytes, wait: float = 3.0, trickle: float | None = None) -> tuple[bytes, bool]:
    """Send `data` (one byte per `trickle` seconds when given) and read until the server closes or `wait` passes;
    returns (what came back, whether the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(wait)
        try:
            if trickle is None:
                s.sendall(data)
            else:
                for b in data:
                    s.sendall(bytes([b]))
                    time.sleep(trickle)
        except OSError:  # closed on us mid-send
            return b"", True
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
            return out, True
        except TimeoutError:
            return out, False
        except ConnectionResetError:
            return out, True


def status_lines(out: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", out)]


def completion(prompt="Hello", **more) -> bytes:
    return json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 4, **more}).encode()


def post(body: bytes, extra: bytes = b"", host: bytes = b"127.0.0.1") -> bytes:
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


def assert_serving(live) -> None:
    """The server is up and the next request succeeds."""
    r = httpx.post(live.url + "/v1/completions", content=completion(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


# --- A. HTTP / transport ------------------------------------------------------------------------------------------
def test_slowloris_head_is_closed_after_the_head_timeout(live):
    """A7: a request head trickled 1 byte per 0.3 s is cut at the 1 s head deadline (was: open for as long as the
    client kept trickling); a silent connection is closed too."""
    t0 = time.monotonic()
    out, closed = raw(live.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40, 6, trickle=0.3)
    assert closed and time.monotonic() - t0 < 4 and b"200 OK" not in out
    out, closed = raw(live.port, b"", 4)
    assert closed and status_lines(out) in ([], [408])
    assert_serving(live)


def test_kept_alive_connection_is_not_cut_by_the_head_timeout(live):
    """The head deadline starts at a head's first byte: a client that pauses between requests less than the
    keep-alive (5 s) keeps its connection."""
    with httpx.Client(base_url=live.url) as c:
        assert c.get("/health").status_code == 200
        time.sleep(1.5)
        assert c.get("/health").status_code == 200


def test_slowloris_body_is_408_and_closed(live):
    """A7: a body trickled slower than the body deadline (1.5 s here, 30 s by default) gets 408 and the connection
    closes (was: held as long as bytes kept coming)."""
    body = completion()
    head = post(body)[: -len(body)]
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.settimeout(6)
        s.sendall(head)
        out = b""
        for b in body[:8]:
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            time.sleep(0.4)
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    assert status_lines(out) == [408] and time.monotonic() - t0 < 5
    assert_serving(live)


@pytest.mark.parametrize(
    "headers",
    [b"X-Big: " + b"a" * 100_000 + b"\r\n", b"".join(b"X-%d: b\r\n" % i for i in range(2000))],
    ids=["100KB-header", "2000-headers"],
)
def test_header_size_and_count_limits_are_431(live, headers):
    """A4: a 100 KB header or 2,000 headers (both arrived whole, so h11's incomplete-event cap never fired) are
    refused with 431 and the connection closes (was: 200)."""
    out, closed = raw(live.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n")
    assert status_lines(out) == [431] and closed
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "headers_too_large"


@pytest.mark.parametrize("hosts", [(b"evil.example", b"127.0.0.1"), (b"127.0.0.1", b"evil.example")])
def test_duplicate_host_headers_are_refused(live, hosts):
    """A6/E6: with two Host headers neither the first nor the last decides the loopback check; the request is
    refused (RFC 9112: exactly one Host) and the connection closes. h11 0.16 refuses it first; `Guard` refuses it
    again for any server that passes both on (`test_guard_counts_host_headers`)."""
    req = b"GET /v1/models HTTP/1.1\r\nHost: %s\r\nHost: %s\r\n\r\n" % hosts
    out, closed = raw(live.port, req)
    assert status_lines(out) == [400] and closed and b'"object"' not in out


def test_guard_counts_host_headers():
    """The Guard's own check, on an ASGI scope with both Host headers (as a server without h11's check sends)."""
    import asyncio

    from dgemma.asgi import Guard

    sent = []

    async def app(scope, receive, send):
        sent.append("app")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "http_version": "1.1"}
    scope["headers"] = [(b"host", b"evil.example"), (b"host", b"127.0.0.1")]
    asyncio.run(Guard(app, None, 1024, True)(scope, None, send))
    assert sent[0]["status"] == 400 and (b"connection", b"close") in sent[0]["headers"] and "app" not in sent


@pytest.mark.parametrize("host", [b"evil.example", b"localhost.evil.example", b"127.0.0.1.nip.io", b"localhost/x?"])
def test_foreign_host_on_loopback_is_400(live, host):
    out, _ = raw(live.port, b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 2)
    assert status_lines(out) == [400] and b"loopback" in out


def test_content_length_with_chunked_is_400_and_no_smuggled_request(live):
    """A5: Content-Length and Transfer-Encoding: chunked together get 400, the connection closes, and the request
    hidden in the same bytes is never served (was: 200 for both, connection kept)."""
    body = completion()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    before = live.engine.stats().get("finished", 0)
    out, closed = raw(live.port, post(chunked, b"Transfer-Encoding: chunked\r\n")[: -len(chunked)] + chunked + smuggled)
    assert status_lines(out) == [400] and closed and b"bad_framing" in out
    assert b'"object":"list"' not in out.replace(b" ", b"")
    assert live.engine.stats().get("finished", 0) == before


def test_malformed_chunked_body_is_400_and_closed(live):
    """A5: a bad CRLF after a chunk (h11 0.16's fix) is a 400 from the HTTP layer, and the connection closes."""
    req = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"
    out, closed = raw(live.port, req)
    assert status_lines(out) == [400] and closed
    assert_serving(live)


def test_oversized_body_closes_the_connection(live):
    """A3: a 413 for a declared oversized body closes the connection, so its unread bytes never parse as a
    request."""
    body = b"x" * 100
    req = post(body).replace(b"Content-Length: 100", b"Content-Length: %d" % (3 << 20))
    out, closed = raw(live.port, req + b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status_lines(out) == [413] and closed


def test_keep_alive_health_is_fast(live):
    """E2: kept-alive requests answer in milliseconds. Without TCP_NODELAY each response's body write waited for
    the client's delayed ACK of its head: every /health after the first took ~44 ms."""
    with httpx.Client(base_url=live.url) as c:
        c.get("/health")
        lat = []
        for _ in range(20):
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            lat.append(time.perf_counter() - t0)
    assert statistics.median(lat) < 0.02, lat
