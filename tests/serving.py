"""Helpers for the server tests: a tiny checkpoint with a tokenizer, and a real uvicorn server on a loopback port
running in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn
from tiny import corpus_lines, random_model, tiny_config

from dgemma.bpe import train_bpe
from dgemma.config import GenerationSettings
from dgemma.export import save_model

CANVAS = 16


def server_checkpoint(path: Path) -> Path:
    """Canvas 16 (batch invariance needs >= 16 rows per request in every GEMM), 512-token BPE, steps 6."""
    tok = train_bpe(corpus_lines(300), vocab_size=512)
    config = tiny_config(canvas_length=CANVAS, vocab_size=tok.get_vocab_size(), max_position_embeddings=256)
    settings = GenerationSettings(max_new_tokens=32, steps=6, eos_token_ids=(1,), pad_token_id=0)
    return save_model(random_model(config, seed=1), path, settings, tokenizer=tok)


class LiveServer:
    """`app` served by uvicorn on 127.0.0.1:<free port> in a daemon thread (lifespan included); `options`: more
    uvicorn.Config keywords (e.g. `transport.uvicorn_options()`)."""

    def __init__(self, app, **options):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, **{"log_level": "warning", "timeout_graceful_shutdown": 2, **options})
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    @property
    def engine(self):
        return self.app.state.server.engine


def children(pid: int, marker: str | None = None) -> list[int]:
    """Live child processes of `pid` (from /proc), those whose command line holds `marker` if given."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and (marker is None or marker in Path(stat.parent, "cmdline").read_text()):
                kids.append(int(stat.parent.name))
        except OSError:
            continue
    return kids
