"""`/health` latency while the largest allowed requests are being admitted (issue 14: the event loop never blocks).

Starts `dgemma serve` in its own process, then --senders processes post near-2 MB bodies back to back for --seconds
(kinds, round robin: a 1.9 MB single-word completion prompt, the same as a chat message, a prompt of ~900k token
ids, and a JSON schema with thousands of properties); meanwhile this process probes `/health` every --interval
seconds on one kept-alive connection. Each big request is refused (context length, or too many JSON values to
parse: the ids and schema kinds) or admitted; either way the server must count, tokenize, render or compile it first,
which is the work that must stay off the event loop. Reports the
probe's p50/p99/max and the big requests' status counts: a human table, then one JSON line last. Target p99 <= 50 ms.

    python scripts/health_latency.py [--model DIR] [--senders 4] [--seconds 20] [--kinds word,chat,ids,schema]
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import statistics
import time

import httpx

from dgemma.bench import Server
from dgemma.generate import BUNDLED_MODEL

BODY_BYTES = 1_900_000


def bodies(vocab: int) -> dict[str, bytes]:
    """Each kind's body, just under the 2 MB limit."""
    word = "abcdefghij" * (BODY_BYTES // 10)
    ids = [(7 * i) % vocab for i in range(BODY_BYTES // 2)]
    while len(json.dumps(ids)) > BODY_BYTES:
        ids = ids[: len(ids) * 9 // 10]
    props = {f"p{i}": {"type": "string", "maxLength": 4} for i in range(BODY_BYTES // 50)}
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": props}}}
    out = {
        "word": {"prompt": word, "max_tokens": 8},
        "chat": {"messages": [{"role": "user", "content": word}], "max_tokens": 8},
        "ids": {"prompt": ids, "max_tokens": 8},
        "schema": {"messages": [{"role": "user", "content": "hi"}], "response_format": schema},
    }
    return {k: json.dumps({"model": "bench", **v}).encode() for k, v in out.items()}


PATHS = {"word": "/v1/completions", "chat": "/v1/chat/completions", "ids": "/v1/completions"}


def sender(url: str, kinds: list[str], vocab: int, until: float, out: mp.Queue) -> None:
    """Post the big bodies round robin until `until`; put a Counter of (kind, status)."""
    payloads, counts, k = bodies(vocab), collections.Counter(), 0
    with httpx.Client(base_url=url, timeout=120) as c:
        while time.time() < until:
            kind = kinds[k % len(kinds)]
            k += 1
            try:
                status = c.post(
                    PATHS.get(kind, "/v1/chat/completions"),
                    content=payloads[kind],
                    headers={"content-type": "application/json"},
                ).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            counts[f"{kind} {status}"] += 1
    out.put(counts)


def probe(url: str, until: float, interval: float) -> list[float]:
    lat = []
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.time() < until:
            t0 = time.perf_counter()
            c.get("/health")
            lat.append(time.perf_counter() - t0)
            time.sleep(max(0.0, interval - lat[-1]))
    return lat


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--interval", type=float, default=0.02, help="seconds between /health probes")
    p.add_argument("--kinds", default="word,chat,ids,schema")
    p.add_argument("--flags", default="--processes 1", help="extra `dgemma serve` flags")
    args = p.parse_args()
    kinds = args.kinds.split(",")
    with Server(args.model, args.flags.split()) as srv:
        vocab = httpx.get(srv.url + "/v1/models").json()["data"][0]["dgemma"]["vocab_size"]
        idle = probe(srv.url, time.time() + 2, args.interval)
        until = time.time() + args.seconds
        out = mp.Queue()
        procs = [mp.Process(target=sender, args=(srv.url, kinds, vocab, until, out)) for _ in range(args.senders)]
        for proc in procs:
            proc.start()
        loaded = probe(srv.url, until, args.interval)
        counts = collections.Counter()
        for _ in procs:
            counts.update(out.get())
        for proc in procs:
            proc.join()
    ms = {name: [x * 1000 for x in xs] for name, xs in (("idle", idle), ("loaded", loaded))}
    print(f"{'':8} {'probes':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, xs in ms.items():
        print(f"{name:8} {len(xs):7d} {statistics.median(xs):8.1f} {pct(xs, 0.99):8.1f} {max(xs):8.1f}")
    print("big requests:", dict(sorted(counts.items())))
    result = {
        "senders": args.senders,
        "seconds": args.seconds,
        "kinds": kinds,
        "idle_p50_ms": round(statistics.median(ms["idle"]), 2),
        "idle_p99_ms": round(pct(ms["idle"], 0.99), 2),
        "p50_ms": round(statistics.median(ms["loaded"]), 2),
        "p99_ms": round(pct(ms["loaded"], 0.99), 2),
        "max_ms": round(max(ms["loaded"]), 2),
        "probes": len(ms["loaded"]),
        "requests": dict(sorted(counts.items())),
        "target_p99_ms": 50,
        "pass": pct(ms["loaded"], 0.99) <= 50,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
