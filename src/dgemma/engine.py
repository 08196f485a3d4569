"""Serving engine: one worker thread owns the model and runs every active request in shared denoise steps.

Requests wait in a bounded FIFO. Between steps the worker drops cancelled requests, admits queued ones up to
`max_batch` (prefill), and advances all active ones with one batched `denoise_step`, so requests with different
prompt lengths and step counts join and leave freely. The model runs in `batch_invariant` mode, so a seeded request
gives the same tokens alone or in any batch. Each request's events go back through its own `deliver` callback (the
server wraps `loop.call_soon_threadsafe`). It knows nothing about text, HTTP or asyncio.

Early settlement (`Settle`, used for streaming): a position of the current canvas is *settled* once it and every
position before it kept the same argmax for `steps` consecutive steps with entropy below `entropy`. Settled tokens
are reported at once and *pinned*: the committed canvas keeps them even if the final argmax would differ. The
reference commits the last argmax wholesale, so pinning is a deliberate deviation, applied only to requests that ask
for it; without it outputs match `Pipeline.generate` token for token.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .config import GenerationSettings
from .generate import CanvasEvent, Generation, StepEvent, denoise_step
from .model import DiffusionGemma

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The request queue has no room; retry later."""


class EngineClosed(RuntimeError):
    """The engine is stopped or its worker died."""


@dataclasses.dataclass(frozen=True)
class Settle:
    """When a canvas position counts as settled (see the module docstring)."""

    steps: int = 3
    entropy: float = 0.1


# --- events delivered to a job's callback (from the worker thread) --------------------------------------------------
@dataclasses.dataclass
class Tokens:
    """New tokens appended to the output; never retracted. `committed`: they come from a canvas commit."""

    ids: list[int]
    committed: bool


@dataclasses.dataclass
class Draft:
    """One denoising step of the current canvas (opt-in): what would be committed now, and how sure the model is."""

    canvas_index: int
    step: int
    tokens: list[int]
    accepted: list[bool]
    entropy: list[float]
    settled: int  # positions of this canvas already reported (pinned)


@dataclasses.dataclass
class Finished:
    finish_reason: str  # "stop" (EOS) or "length"
    token_ids: list[int]
    steps_per_canvas: list[int]
    forward_passes: int
    queued_s: float  # submit -> admission
    first_token_s: float | None  # submit -> first reported token
    first_commit_s: float | None  # submit -> first canvas commit
    total_s: float


@dataclasses.dataclass
class Failed:
    message: str


@dataclasses.dataclass(eq=False)
class Job:
    """One generation request. `cancelled` may be set from any thread; the worker drops the job before its next step."""

    prompt_ids: list[int]
    settings: GenerationSettings
    seed: int | None
    deliver: Callable[[object], None]
    settle: Settle | None = None
    draft: bool = False
    cancelled: bool = False
    gen: PinnedGeneration | None = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    first_commit: float | None = None
    sent_in_canvas: int = 0


class PinnedGeneration(Generation):
    """A Generation that can report a settled prefix of its canvas early and keeps it when committing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pins: list[int] = []
        self.committed_pins: list[int] = []  # the pins of the canvas committed last
        self.runs: list[int] = []  # per position: consecutive steps with the current argmax
        self.prev: list[int] | None = None

    def settle(self, ev: StepEvent, rule: Settle) -> list[int]:
        """Extend the pinned prefix with positions that are now settled; returns the newly pinned tokens."""
        draft = ev.draft
        if self.prev is None:
            self.runs = [1] * len(draft)
        else:
            self.runs = [r + 1 if a == b else 1 for r, a, b in zip(self.runs, draft, self.prev)]
        self.prev = draft
        eos = set(self.settings.eos_token_ids)
        n = len(self.pins)
        if n and self.pins[-1] in eos:
            return []  # the canvas ends here
        while n < len(draft) and self.runs[n] >= rule.steps and ev.entropy[n] < rule.entropy:
            n += 1
            if draft[n - 1] in eos:
                break
        new = draft[len(self.pins) : n]
        self.pins += new
        return new

    def _commit(self, argmax: torch.Tensor) -> CanvasEvent:
        if self.pins:
            argmax = argmax.clone()
            argmax[: len(self.pins)] = torch.tensor(self.pins, dtype=argmax.dtype, device=argmax.device)
        self.committed_pins, self.pins, self.runs, self.prev = self.pins, [], [], None
        return super()._commit(argmax)


class Engine:
    """The worker thread and its queue. `submit`, `cancel` and `stats` may be called from any thread."""

    def __init__(self, model: DiffusionGemma, max_batch: int = 8, max_queue: int = 64, workers: int = 1):
        if max_batch < 1 or max_queue < 1 or workers < 1:
            raise ValueError(f"max_batch, max_queue and workers must be >= 1, got {max_batch}, {max_queue}, {workers}")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        # workers > 1: a step's batch is split into that many groups run side by side (for CPUs with one torch
        # thread per worker); batch invariance makes the split invisible in the results
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers - 1, "dgemma-step") if workers > 1 else None
        model.batch_invariant = True  # seeded outputs must not depend on batch composition
        self._queue: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dgemma-engine", daemon=True)
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        self.counters = collections.Counter()

    # --- API for the server (any thread) ----------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; queued and active jobs get `Failed`."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all `jobs` or none of them (QueueFull)."""
        with self._cv:
            if self._stopping or not self._thread.is_alive():
                raise EngineClosed("the engine is not running")
            if len(self._queue) + len(jobs) > self.max_queue:
                self.counters["rejected"] += len(jobs)
                raise QueueFull(f"the queue holds {self.max_queue} requests")
            self._queue.extend(jobs)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job: at once if still queued, before the next step if active."""
        job.cancelled = True
        with self._cv:
            if job in self._queue:
                self._queue.remove(job)
                self.counters["cancelled"] += 1

    def stats(self) -> dict:
        with self._cv:
            active, queued = sum(not j.cancelled for j in self._active), len(self._queue)
        busy = self.busy_since is not None
        return {
            "alive": self._thread.is_alive(), "active": active, "queued": queued, "max_batch": self.max_batch,
            "max_queue": self.max_queue, "busy_s": round(time.monotonic() - self.busy_since, 3) if busy else 0.0,
            **self.counters,
        }  # fmt: skip

    def healthy(self, stall_s: float = 120.0) -> bool:
        """Worker alive and, when busy, making progress (one loop iteration within `stall_s`)."""
        stalled = self.busy_since is not None and time.monotonic() - self.heartbeat > stall_s
        return self._thread.is_alive() and not self._stopping and not stalled

    # --- worker -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._iteration():
                pass
        except BaseException:  # never leave callers waiting on a dead worker
            log.exception("engine worker crashed")
            raise
        finally:
            with self._cv:
                self._stopping = True
                leftover = list(self._queue) + self._active
                self._queue.clear()
                self._active = []
            for job in leftover:
                job.deliver(Failed("the server is shutting down"))

    def _iteration(self) -> bool:
        with self._cv:
            while not self._stopping and not self._queue and not self._active:
                self.busy_since = None
                self._cv.wait()
            if self._stopping:
                return False
            if self.busy_since is None:
                self.busy_since = self.heartbeat = time.monotonic()
            self._drop_cancelled()
            admitted = []
            while self._queue and len(self._active) + len(admitted) < self.max_batch:
                admitted.append(self._queue.popleft())
        for job in admitted:
            self._admit(job)
        if self._active:
            self._step()
        self.heartbeat = time.monotonic()
        return True

    def _drop_cancelled(self) -> None:
        keep = []
        for job in self._active:
            if job.cancelled:
                job.gen = None  # frees its cache
                self.counters["cancelled"] += 1
            else:
                keep.append(job)
        self._active = keep

    def _admit(self, job: Job) -> None:
        job.admitted = time.perf_counter()
        try:
            job.gen = PinnedGeneration(self.model, job.prompt_ids, job.settings, job.seed)
            job.gen.prefill()
        except Exception as e:  # a bad request must not take the worker down
            log.exception("prefill failed")
            job.gen = None
            job.deliver(Failed(f"prefill failed: {type(e).__name__}"))
            return
        with self._cv:
            self._active.append(job)

    def _step(self) -> None:
        jobs = list(self._active)
        try:
            results = self._denoise([j.gen for j in jobs])
        except Exception as e:  # e.g. out of memory: fail this batch, keep serving
            log.exception("denoise step failed")
            with self._cv:
                self._active = [j for j in self._active if j not in jobs]
            for job in jobs:
                job.gen = None
                job.deliver(Failed(f"generation failed: {type(e).__name__}"))
            return
        self.counters["steps"] += 1
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(jobs))
        for job, events in zip(jobs, results):
            self._deliver(job, events)
        with self._cv:
            self._active = [j for j in self._active if j.gen is not None and not j.gen.finished]

    def _denoise(self, gens: list[Generation]) -> list[list]:
        if self._pool is None or len(gens) < 2:
            return denoise_step(self.model, gens)
        size = math.ceil(len(gens) / self.workers)
        groups = [gens[i : i + size] for i in range(0, len(gens), size)]
        others = [self._pool.submit(denoise_step, self.model, g) for g in groups[1:]]
        results = denoise_step(self.model, groups[0])
        for future in others:
            results += future.result()
        return results

    def _deliver(self, job: Job, events: list) -> None:
        gen = job.gen
        committing = any(isinstance(e, CanvasEvent) for e in events)
        for ev in events:
            if isinstance(ev, StepEvent):
                if job.settle is not None and not committing:
                    new = gen.settle(ev, job.settle)
                    if new:
                        job.first_token = job.first_token or time.perf_counter()
                        job.sent_in_canvas += len(new)
                        job.deliver(Tokens(new, committed=False))
                if job.draft:
                    pins = gen.committed_pins if committing else gen.pins
                    tokens = pins + ev.draft[len(pins) :]
                    job.deliver(Draft(ev.canvas_index, ev.step, tokens, ev.accepted, ev.entropy, len(pins)))
            else:
                now = time.perf_counter()
                job.first_commit = job.first_commit or now
                assert ev.token_ids[: job.sent_in_canvas] == gen.committed_pins[: job.sent_in_canvas]
                new = ev.token_ids[job.sent_in_canvas :]
                job.sent_in_canvas = 0
                if new:
                    job.first_token = job.first_token or now
                    job.deliver(Tokens(new, committed=True))
        if gen.finished:
            self.counters["finished"] += 1
            t0 = job.submitted
            job.deliver(Finished(
                gen.finish_reason, gen.token_ids, gen.steps_per_canvas, gen.forward_passes, job.admitted - t0,
                job.first_token and job.first_token - t0, job.first_commit and job.first_commit - t0,
                time.perf_counter() - t0,
            ))  # fmt: skip
