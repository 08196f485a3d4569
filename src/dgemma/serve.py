"""`dgemma serve`: argument parser and runner for the HTTP server (`dgemma.server`).

Kept apart from the server so `dgemma --help` stays instant: torch, FastAPI and uvicorn are imported only when the
command runs. The order of checks follows the hardening notes: refuse an unauthenticated non-loopback bind, bind the
socket (a busy port fails before any weights are read), then load the model.
"""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import json
import os
import signal
import socket
import sys

from .cli import (
    EXIT_CHECKPOINT,
    EXIT_FAILURE,
    CliError,
    add_model_arguments,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a live canvas view",
        description="Serve /v1/completions and /v1/chat/completions (batched, streaming) and a live canvas view at /.",
    )
    add_model_arguments(p)
    net = p.add_argument_group("network and auth")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    net.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (or set DGEMMA_API_KEY)")
    net.add_argument(
        "--allow-unauthenticated-network", action="store_true", help="allow a non-loopback --host without an API key"
    )
    lim = p.add_argument_group("capacity and limits")
    lim.add_argument("--max-batch", type=positive_int, default=8, metavar="N", help="requests per denoise step")
    lim.add_argument("--max-queue", type=positive_int, default=64, metavar="N", help="waiting requests before 503")
    lim.add_argument("--max-n", type=positive_int, default=8, metavar="N", help="cap on a request's n")
    lim.add_argument("--max-tokens", type=positive_int, metavar="N", help="cap on a request's max_tokens")
    srv = p.add_argument_group("serving")
    srv.add_argument("--model-id", metavar="NAME", help="model name clients send (default: dgemma-<dir name>)")
    srv.add_argument(
        "--settle-steps",
        type=positive_int,
        default=3,
        metavar="N",
        help="steps a streamed token's argmax must hold before it is sent",
    )
    srv.add_argument(
        "--settle-entropy",
        type=positive_float,
        default=0.1,
        metavar="X",
        help="max entropy (nats) of a token sent before its canvas commits",
    )
    srv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's dtype")
    srv.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    srv.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch CPU threads per process (default on CPU: cores / processes - 1, at least 1: a core is "
        "left for the HTTP loop)",
    )
    srv.add_argument(
        "--processes",
        type=positive_int,
        metavar="N",
        help="server processes on one port, each with its own model copy and batching engine (Python "
        "runs one thread at a time, so this is how a small model uses several CPU cores). Default: "
        "1 on CUDA; on CPU one per core (at most 4) while the copies fit in a quarter of the RAM",
    )
    srv.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="run a step's batch as N groups side by side in threads",
    )
    srv.add_argument(
        "--prefix-cache-mb",
        type=non_negative_int,
        default=1024,
        metavar="MB",
        help="multi-turn prompt cache: encoder KV of earlier prompts reused by block-aligned prefix, LRU, per "
        "process (0: off; outputs are the same either way)",
    )
    srv.add_argument(
        "--empty-redraws",
        type=non_negative_int,
        default=2,
        metavar="N",
        help="empty-reply guard: re-draw a reply's first canvas when it starts with EOS, at most N times (the "
        "last one bars EOS there); 0 for reference parity",
    )
    srv.add_argument(
        "--shutdown-grace",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds running generations may finish before they end with an error event",
    )
    srv.add_argument(
        "--stall-exit",
        type=non_negative_float,
        default=600.0,
        metavar="S",
        help="a denoising step or prefill block running this long means the engine hung: exit non-zero so a "
        "supervisor restarts the server (/health turns 503 after 120 s); 0: never",
    )
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Check the flags, bind the socket, load the model, serve until interrupted."""
    api_key = args.api_key or os.environ.get("DGEMMA_API_KEY") or None
    loopback = is_loopback(args.host)
    if not loopback and api_key is None and not args.allow_unauthenticated_network:
        raise CliError(
            f"refusing to serve on {args.host} without an API key; pass --api-key (or DGEMMA_API_KEY), "
            "or --allow-unauthenticated-network if anyone who can reach it may use it"
        )
    if not 0 <= args.port < 65536:
        raise CliError(f"--port must be in 0..65535, got {args.port}")
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}", EXIT_FAILURE) from None
    with sock:
        app = _load_app(args, api_key, loopback)  # with --processes too: a bad checkpoint fails here, once
        if not loopback and api_key is None:
            print(f"WARNING: serving on {args.host} WITHOUT authentication", file=sys.stderr)
        import uvicorn

        from .transport import uvicorn_options

        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        options = uvicorn_options(args.log_level, args.shutdown_grace)
        if args.processes == 1:
            print(f"dgemma: serving {app.state.server.model_id} on http://{host}:{port}/", file=sys.stderr)
            # uvicorn re-raises the SIGTERM it handled once it is done; a drained shutdown is a clean exit (0)
            signal.signal(signal.SIGTERM, lambda *_: None)
            uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])
            return EXIT_FAILURE if app.state.fatal else 0
        from uvicorn.supervisors import Multiprocess

        from .runtime import release_memory

        model_id = app.state.server.model_id
        del app
        release_memory()  # the parent only supervises: its checked copy of the model goes
        # children are spawned (fresh interpreters) and rebuild the app from these settings; they share the socket
        os.environ[CHILD_SETTINGS] = json.dumps(
            {**vars(args), "handler": None, "api_key": api_key, "loopback": loopback}
        )
        config = uvicorn.Config(f"{__name__}:app_from_env", factory=True, workers=args.processes, **options)
        print(f"dgemma: serving {model_id} on http://{host}:{port}/ ({args.processes} processes)", file=sys.stderr)
        if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn < 0.36 takes the worker function too
            Multiprocess(config, target=uvicorn.Server(config).run, sockets=[sock]).run()
        else:
            Multiprocess(config, sockets=[sock]).run()
    return 0


CHILD_SETTINGS = "DGEMMA_SERVE_CHILD_SETTINGS"
MAX_AUTO_PROCESSES = 4


def default_processes(pipeline) -> int:
    """One process per CPU core (at most 4) while that many model copies fit in a quarter of the RAM; 1 on CUDA."""
    model = pipeline.model
    if model.device.type != "cpu":
        return 1
    from .quantize import model_nbytes

    weights = model_nbytes(model)  # quantized weights too (state_dict misses their kernel buffers)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_AUTO_PROCESSES, ram // 4 // max(weights, 1)))


def app_from_env():
    """uvicorn app factory of a `--processes` child: the parent's checked settings, from the environment."""
    settings = json.loads(os.environ.pop(CHILD_SETTINGS))
    api_key, loopback = settings.pop("api_key"), settings.pop("loopback")
    return _load_app(argparse.Namespace(**settings), api_key, loopback)


def _load_app(args: argparse.Namespace, api_key: str | None, loopback: bool):
    from .config import ConfigError
    from .generate import BUNDLED_MODEL, Pipeline, Settle
    from .loader import CheckpointError
    from .server import create_app

    if args.model is None and not BUNDLED_MODEL.is_dir():
        raise CliError(f"no bundled model at {BUNDLED_MODEL}; pass --model DIR", EXIT_CHECKPOINT)
    try:
        pipeline = Pipeline.load(args.model, dtype=args.dtype, device=args.device, offline=args.offline)
        args.processes = args.processes or default_processes(pipeline)
        if args.threads or pipeline.model.device.type == "cpu":
            import torch

            # one Python thread drives each model: torch threads beyond the cores left over only contend
            torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.processes - 1))
        return create_app(
            pipeline,
            model_id=args.model_id,
            api_key=api_key,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            max_n=args.max_n,
            max_tokens_cap=args.max_tokens,
            loopback_only=loopback,
            settle=Settle(args.settle_steps, args.settle_entropy),
            workers=args.workers,
            prefix_cache_bytes=args.prefix_cache_mb << 20,
            empty_redraws=args.empty_redraws,
            grace=args.shutdown_grace,
            stall_exit_s=args.stall_exit or None,
        )
    except (CheckpointError, ConfigError, OSError) as e:
        raise CliError(str(e), EXIT_CHECKPOINT) from None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port or a bad address fails before any weights are read."""
    host = "127.0.0.1" if host.lower() == "localhost" else host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock
