"""Soak test of dgemma serve: N streaming clients for T minutes, then errors, latency, throughput and RSS growth.

    python scripts/soak.py [--url URL] [--clients 32] [--minutes 10] [--warmup-s 30] [--model DIR]
                           [--processes N] [--max-tokens 64] [--api-key KEY] [--seed 0]

Without --url it starts `dgemma serve` (the bundled model unless --model) on a free loopback port and stops it
afterwards. Each client loops over a fixed mix: streamed chat, streamed and plain completions, infill (`suffix`),
JSON-schema output (`response_format`), Anthropic messages, a stream it cancels after the first chunk, and a
non-streamed request it abandons (client timeout) mid-generation. An error is any unexpected status, a stream
without its terminator (`[DONE]` / `message_stop`), an SSE error event, a body that does not parse or a JSON reply
that does not validate against its schema; the two deliberate aborts count as cancels, not errors. RSS is read
from /proc for every server process (the `dgemma serve` process and its workers) after the warm-up and at the end.
Prints a human table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}
PROMPTS = ["Once upon a time", "The river", "In the morning, the old man", "She opened the door and", "Why is"]


def requests_mix(model: str, max_tokens: int) -> list[tuple[str, str, dict]]:
    """(kind, path, body) of one round; `seed` and the prompt are filled in per request."""
    chat = [{"role": "user", "content": "{prompt}"}]
    return [
        ("chat_stream", "/v1/chat/completions", {"messages": chat, "stream": True, "max_tokens": max_tokens}),
        ("completion_stream", "/v1/completions", {"prompt": "{prompt}", "stream": True, "max_tokens": max_tokens}),
        ("completion", "/v1/completions", {"prompt": "{prompt}", "max_tokens": max_tokens}),
        ("infill", "/v1/completions", {"prompt": "{prompt}", "suffix": " and then it was over.", "max_tokens": 16}),
        (
            "json_schema",
            "/v1/chat/completions",
            {
                "messages": chat,
                "max_tokens": max(max_tokens, 64),
                "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
            },
        ),
        ("anthropic_stream", "/v1/messages", {"messages": chat, "stream": True, "max_tokens": max_tokens}),
        ("cancel", "/v1/chat/completions", {"messages": chat, "stream": True, "max_tokens": 4 * max_tokens}),
        ("disconnect", "/v1/completions", {"prompt": "{prompt}", "max_tokens": 4 * max_tokens}),
    ]


def fill(body: dict, model: str, prompt: str, seed: int) -> dict:
    text = json.dumps(body).replace("{prompt}", prompt)
    return {**json.loads(text), "model": model, "seed": seed}


class Stats:
    def __init__(self):
        self.latency: dict[str, list[float]] = {}
        self.first: list[float] = []
        self.errors: list[str] = []
        self.cancels = self.requests = self.tokens = 0
        self.measuring = False

    def ok(self, kind: str, seconds: float, tokens: int, first: float | None) -> None:
        self.requests += 1
        if self.measuring:
            self.latency.setdefault(kind, []).append(seconds)
            self.tokens += tokens
            if first is not None:
                self.first.append(first)

    def error(self, kind: str, what: str) -> None:
        self.requests += 1
        self.errors.append(f"{kind}: {what}"[:300])


async def one(client: httpx.AsyncClient, kind: str, path: str, body: dict, stats: Stats) -> None:
    t0 = time.monotonic()
    try:
        if kind == "disconnect":
            try:
                await client.post(path, json=body, timeout=0.3)
                stats.ok(kind, time.monotonic() - t0, 0, None)  # finished before the client gave up
            except httpx.TimeoutException:
                stats.cancels += 1
            return
        if not body.get("stream"):
            r = await client.post(path, json=body)
            if r.status_code != 200:
                return stats.error(kind, f"status {r.status_code}: {r.text[:200]}")
            reply = r.json()
            if kind == "json_schema":
                import jsonschema

                jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), SCHEMA)
            return stats.ok(kind, time.monotonic() - t0, reply["usage"]["completion_tokens"], None)
        await stream(client, kind, path, body, stats, t0)
    except (httpx.HTTPError, ValueError, KeyError, json.JSONDecodeError) as e:
        stats.error(kind, f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - jsonschema.ValidationError and anything unforeseen is an error too
        stats.error(kind, f"{type(e).__name__}: {str(e)[:200]}")


async def stream(client: httpx.AsyncClient, kind: str, path: str, body: dict, stats: Stats, t0: float) -> None:
    anthropic = path == "/v1/messages"
    first, ended, tokens = None, False, 0
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return stats.error(kind, f"status {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                ended = True
                continue
            event = json.loads(data)
            if "error" in event and (not anthropic or event.get("type") == "error"):
                return stats.error(kind, f"error event: {data[:200]}")
            if first is None:
                first = time.monotonic() - t0
            if kind == "cancel":
                stats.cancels += 1
                return  # leaving the block closes the connection mid-stream
            if anthropic and event.get("type") == "message_stop":
                ended = True
            if anthropic and event.get("type") == "message_delta":
                tokens = event["usage"]["output_tokens"]
            if not anthropic and event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if not ended:
        return stats.error(kind, "stream ended without its terminator")
    stats.ok(kind, time.monotonic() - t0, tokens, first)


async def client_loop(url: str, headers: dict, model: str, mix, deadline: float, stats: Stats, rng) -> None:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        while time.monotonic() < deadline:
            kind, path, body = rng.choice(mix)
            body = fill(body, model, rng.choice(PROMPTS), rng.randrange(2**31))
            if body.get("stream") and path != "/v1/messages":
                body["stream_options"] = {"include_usage": True}
            await one(client, kind, path, body, stats)


def server_pids(root: int) -> list[int]:
    """The server process and its descendants (the --processes workers)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        todo += [int(c) for c in children]
    return pids


def rss_kb(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = int(line.split()[1])
        except OSError:
            pass
    return out


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dgemma", "serve", "--port", str(port), "--max-tokens", str(4 * args.max_tokens)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--processes", str(args.processes)] if args.processes else []
    cmd += ["--api-key", args.api_key] if args.api_key else []
    log = open(Path(tempfile.gettempdir()) / f"dgemma-soak-{port}.log", "w")  # noqa: SIM115 - the server keeps it
    print(f"dgemma serve on port {port}, log: {log.name}", file=sys.stderr)
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dgemma serve exited with {proc.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("dgemma serve did not become healthy in 300 s")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


async def soak(args, url: str, pids: list[int]) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers) as c:
        model = (await c.get("/v1/models")).json()["data"][0]["id"]
    mix = requests_mix(model, args.max_tokens)
    stats = Stats()
    start = time.monotonic()
    deadline = start + 60 * args.minutes
    rngs = [random.Random(args.seed * 1000 + i) for i in range(args.clients)]
    tasks = [asyncio.ensure_future(client_loop(url, headers, model, mix, deadline, stats, r)) for r in rngs]
    await asyncio.sleep(min(args.warmup_s, 60 * args.minutes / 2))
    stats.measuring, measured = True, time.monotonic()
    warm = rss_kb(pids)
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - measured
    end = rss_kb(pids)
    latencies = [x for v in stats.latency.values() for x in v]
    growth = {str(p): round(100 * (end[p] - warm[p]) / warm[p], 2) for p in warm if p in end}
    return {
        "clients": args.clients,
        "minutes": args.minutes,
        "requests": stats.requests,
        "errors": len(stats.errors),
        "error_samples": stats.errors[:10],
        "cancels": stats.cancels,
        "p50_s": percentile(latencies, 0.5),
        "p99_s": percentile(latencies, 0.99),
        "first_chunk_p50_s": percentile(stats.first, 0.5),
        "per_kind_p50_s": {k: percentile(v, 0.5) for k, v in sorted(stats.latency.items())},
        "measured_s": round(elapsed, 1),
        "requests_per_s": round(sum(len(v) for v in stats.latency.values()) / elapsed, 3),
        "tokens_per_s": round(stats.tokens / elapsed, 2),
        "rss_after_warmup_mb": {str(p): round(v / 1024, 1) for p, v in warm.items()},
        "rss_end_mb": {str(p): round(v / 1024, 1) for p, v in end.items()},
        "rss_growth_pct": growth,
        "max_rss_growth_pct": max(growth.values(), default=None),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running dgemma serve (default: start one)")
    ap.add_argument("--server-pid", type=int, help="with --url: the server's pid, for RSS (default: not measured)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup-s", type=float, default=30, help="requests before this are not measured")
    ap.add_argument("--model", help="checkpoint directory for the started server (default: bundled)")
    ap.add_argument("--processes", type=int, help="--processes of the started server")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of the ordinary requests")
    ap.add_argument("--api-key")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    proc = None
    if args.url:
        url, pids = args.url.rstrip("/"), server_pids(args.server_pid) if args.server_pid else []
    else:
        proc, url = start_server(args)
        time.sleep(1)  # let --processes workers appear
        pids = server_pids(proc.pid)
    try:
        result = asyncio.run(soak(args, url, pids))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"{'requests':<24}{result['requests']}  errors {result['errors']}  cancels/disconnects {result['cancels']}")
    print(f"{'latency p50 / p99':<24}{result['p50_s']} s / {result['p99_s']} s")
    print(f"{'throughput':<24}{result['requests_per_s']} req/s, {result['tokens_per_s']} tok/s")
    for kind, p50 in result["per_kind_p50_s"].items():
        print(f"  {kind:<22}p50 {p50} s")
    for pid, pct in result["rss_growth_pct"].items():
        print(f"{'rss pid ' + pid:<24}{result['rss_after_warmup_mb'][pid]} -> {result['rss_end_mb'][pid]} MB ({pct}%)")
    for e in result["error_samples"]:
        print("ERROR", e)
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
