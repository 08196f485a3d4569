"""Schemathesis campaign against dgemma serve: every operation of /openapi.json, positive and negative data.

    python scripts/schemathesis_campaign.py [--url URL | --model DIR] [--examples 500] [--max-tokens 32] [--max-n 2]

Without --url it serves the model (default: the bundled one) in this process on a loopback port, with --max-tokens
and --max-n capping the cost of a generation (the schema advertises the caps, so generated requests respect them).
Prints per-operation status counts and every failure, then one JSON line: requests, status counts, failures,
seconds. Exit status 1 when any check failed (5xx, undocumented status, schema violation, accepted negative data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from schema_fuzz import fuzz


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server (default: start one here)")
    ap.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--examples", type=int, default=500, help="generated cases per operation and mode")
    ap.add_argument("--max-tokens", type=int, default=32, help="server cap on max_tokens (own server only)")
    ap.add_argument("--max-n", type=int, default=2, help="server cap on n (own server only)")
    ap.add_argument("--api-key", help="sent as Authorization: Bearer (and used by the own server)")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    if args.url:
        figures = fuzz(args.url.rstrip("/"), args.examples, headers=headers)
    else:
        import torch
        from serving import LiveServer

        from dgemma.generate import BUNDLED_MODEL, Pipeline
        from dgemma.server import create_app

        torch.set_num_threads(1)
        pipe = Pipeline.load(args.model or BUNDLED_MODEL, device="cpu")
        app = create_app(pipe, api_key=args.api_key, max_tokens_cap=args.max_tokens, max_n=args.max_n)
        with LiveServer(app) as live:
            figures = fuzz(live.url, args.examples, headers=headers)
    for op, counts in figures["operations"].items():
        print(f"{op:<34} " + "  ".join(f"{k}: {v}" for k, v in counts.items()))
    for (op, message), count in figures["rejected"].most_common(40):
        print(f"refused positive {count:>5}  {op:<30} {message}")
    for failure in figures["failures"]:
        print("FAIL", *failure)
    summary = {k: figures[k] for k in ("requests", "status", "seconds", "skipped")}
    summary["failures"] = len(figures["failures"])
    summary["server_errors"] = sum(v for k, v in figures["status"].items() if k >= 500)
    print(json.dumps(summary))
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
