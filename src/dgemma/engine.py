"""Serving engine: pure scheduling. One worker thread owns the model and runs every active request in shared
denoise steps.

Requests (`generate.Request`, unchanged from the boundary) wait in a bounded FIFO. Between steps the worker drops
cancelled jobs, admits queued ones up to `max_batch` (prefill, then a copy into the batch's `StaticCache` row), and
advances all active ones with one batched `denoise_step` (reading the static rows as views), so requests with different prompt lengths, step counts and pins join and leave freely. The model runs
in `batch_invariant` mode, so a seeded request gives the same tokens alone or in any batch. Each job's events (the
Generation's own StepEvent / SettleEvent / CanvasEvent, then Finished or Failed) go back through its `deliver`
callback (the server wraps `loop.call_soon_threadsafe`). It knows nothing about text, HTTP or asyncio.

Faults: a failed prefill or denoise step fails its jobs and the worker goes on. A worker that dies anyway (a bug, a
broken device) fails every queued and active job, then starts again with a fresh batch cache, at most
`MAX_RESTARTS` times in `RESTART_WINDOW_S`; past that `on_fatal` runs (the server exits, so a supervisor replaces
the process: never a process that answers 503 forever). `drain` refuses new work while the running jobs finish
(graceful shutdown); `stop` then fails what is left.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .cache import CacheRow, PrefixCache, StaticCache
from .generate import CanvasEvent, Generation, Request, SettleEvent, denoise_step
from .model import DiffusionGemma, Execution

log = logging.getLogger(__name__)
STATIC_CAPACITY = 1024  # full-attention keys per row at first; doubled when a request needs more
MAX_RESTARTS, RESTART_WINDOW_S = 3, 60.0


class QueueFull(RuntimeError):
    """The request queue has no room; retry later."""


class EngineClosed(RuntimeError):
    """The engine is stopped or its worker died."""


@dataclasses.dataclass
class Finished:
    finish_reason: str  # "stop" (EOS) or "length"
    token_ids: list[int]
    steps_per_canvas: list[int]
    forward_passes: int
    queued_s: float  # submit -> admission
    first_token_s: float | None  # submit -> first released token
    first_commit_s: float | None  # submit -> first canvas commit
    total_s: float
    seam_nll: float | None  # Generation.seam_nll (infill scoring)
    free_entropy: list[float]
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    empty_redraws: int = 0  # first canvases drawn again (empty-reply guard)


@dataclasses.dataclass
class Failed:
    message: str


@dataclasses.dataclass(eq=False)
class Job:
    """One request on its way through the engine. `cancelled` may be set from any thread; the worker drops the job
    before its next step."""

    request: Request
    deliver: Callable[[object], None]
    cancelled: bool = False
    gen: Generation | None = None
    group: int = 0  # the submission (one API request: n choices x infill candidates) it came in
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    first_commit: float | None = None


class Engine:
    """The worker thread and its queue. `submit`, `cancel` and `stats` may be called from any thread."""

    def __init__(
        self,
        model: DiffusionGemma,
        max_batch: int = 8,
        max_queue: int = 64,
        workers: int = 1,
        prefix_cache: PrefixCache | None = None,
        on_fatal: Callable[[], None] = lambda: None,
        stall_exit_s: float | None = None,
    ):
        """`on_fatal`: called when the worker cannot go on (it kept crashing, or it hung). `stall_exit_s`: a worker
        busy this long without finishing a step or a prefill block is hung (a Python thread cannot be killed):
        `on_fatal` is called once (None: never)."""
        if max_batch < 1 or max_queue < 1 or workers < 1:
            raise ValueError(f"max_batch, max_queue and workers must be >= 1, got {max_batch}, {max_queue}, {workers}")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        # prompts are always encoded in blocks through a prefix cache (one that keeps nothing when off), so seeded
        # outputs do not depend on whether reuse is on
        self.prefix_cache = prefix_cache or PrefixCache(0, model.config.canvas_length)
        # workers > 1: a step's batch is split into that many groups run side by side (for CPUs with one torch
        # thread per worker); batch invariance makes the split invisible in the results
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers - 1, "dgemma-step") if workers > 1 else None
        # seeded outputs must not depend on batch composition: invariant kernels where invariance holds (CPU)
        model = model.with_execution(Execution.for_serving(model.device))
        self.model = model
        self._static: StaticCache | None = None  # the batch's KV cache, made at the first admission
        self._queue: collections.deque[Job] = collections.deque()
        self._groups = itertools.count(1)
        self._active: list[Job] = []
        self._cv = threading.Condition()
        self._stopping = self._draining = False
        self.on_fatal, self._crashes = on_fatal, collections.deque(maxlen=MAX_RESTARTS + 1)
        self.stall_exit_s = stall_exit_s
        self._thread = self._new_thread()
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        self.counters = collections.Counter()
        self.latency: collections.Counter = collections.Counter()

    # --- API for the server (any thread) ----------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        if self.stall_exit_s:
            threading.Thread(target=self._watch, name="dgemma-watchdog", daemon=True).start()
        return self

    def stalled_s(self) -> float:
        """Seconds the busy worker has gone without finishing a step or a prefill block (0 when idle)."""
        return time.monotonic() - self.heartbeat if self.busy_since is not None else 0.0

    def _watch(self) -> None:
        """The hung-worker watchdog: a worker stuck past `stall_exit_s` gets `on_fatal`, once."""
        period = min(1.0, self.stall_exit_s / 4)
        while not self._stopping:
            time.sleep(period)
            if self.stalled_s() > self.stall_exit_s and not self._stopping:
                self.counters["stalls"] += 1
                log.critical("engine worker stalled for %.0f s (limit %g s)", self.stalled_s(), self.stall_exit_s)
                for job in self._take_all(stop=True):  # the hung worker will never fail them itself
                    self._safe_deliver(job, Failed("the engine hung; retry"))
                self.on_fatal()
                return

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name="dgemma-engine", daemon=True)

    def drain(self) -> None:
        """Refuse new work (EngineClosed, health 503); running and queued jobs go on until `stop`."""
        with self._cv:
            self._draining = True

    def idle(self) -> bool:
        with self._cv:
            return not self._queue and not self._active

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; queued and active jobs get `Failed`."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive() and not self.counters["stalls"]:  # a hung worker would only use up the timeout
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all `jobs` (one request's generations) or none of them (QueueFull). `max_queue` counts waiting
        requests, not generations: an infill's candidates or n choices take one place."""
        with self._cv:
            if self._stopping or self._draining or not self._thread.is_alive():
                raise EngineClosed("the engine is not running")
            if self._waiting_requests() >= self.max_queue:
                self.counters["rejected"] += len(jobs)
                raise QueueFull(f"the queue holds {self.max_queue} requests")
            group = next(self._groups)
            for job in jobs:
                job.group = group
            self._queue.extend(jobs)
            self._cv.notify()

    def _waiting_requests(self) -> int:
        """Submissions with a job still queued (under the lock; at most max_queue x max_queue jobs to look at)."""
        return len({job.group for job in self._queue})

    def _take_all(self, stop: bool) -> list[Job]:
        """Empty the queue and the batch and return their jobs (to be failed); `stop`: the engine stops for good."""
        with self._cv:
            jobs = list(self._queue) + self._active
            self._queue.clear()
            self._active = []
            self._stopping = self._stopping or stop
        return jobs

    def cancel(self, job: Job) -> None:
        """Drop a job: at once if still queued, before the next step if active."""
        job.cancelled = True
        with self._cv:
            if job in self._queue:
                self._queue.remove(job)
                self.counters["cancelled"] += 1

    def stats(self) -> dict:
        with self._cv:
            active, queued, waiting = (
                sum(not j.cancelled for j in self._active),
                len(self._queue),
                self._waiting_requests(),
            )
        busy = self.busy_since is not None
        return {
            "alive": self._thread.is_alive(),
            "draining": self._draining,
            "active": active,
            "queued": queued,
            "queued_requests": waiting,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "busy_s": round(time.monotonic() - self.busy_since, 3) if busy else 0.0,
            "stalled_s": round(self.stalled_s(), 3),  # since the last finished step or prefill block
            "prefix_cache": self.prefix_cache.stats(),
            **self.counters,
        }

    def healthy(self, stall_s: float = 120.0) -> bool:
        """Worker alive and, when busy, making progress (one loop iteration within `stall_s`)."""
        stalled = self.stalled_s() > stall_s
        return self._thread.is_alive() and not self._stopping and not self._draining and not stalled

    # --- worker -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        crashed = True
        try:
            while self._iteration():
                pass
            crashed = False
        except Exception:  # never leave callers waiting on a dead worker
            log.exception("engine worker crashed")
        finally:  # also on BaseException (SystemExit, KeyboardInterrupt): those stop the engine for good
            restart = crashed and self._may_restart()
            leftover = self._take_all(stop=not restart)
            message = "the engine failed; retry" if crashed else "the server is shutting down"
            for job in leftover:
                self._safe_deliver(job, Failed(message))
            if restart:
                self._restart()
            elif crashed:
                log.critical("engine worker crashed %d times in %g s; giving up", len(self._crashes), RESTART_WINDOW_S)
                self.on_fatal()

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._crashes.append(now)
        recent = [t for t in self._crashes if now - t <= RESTART_WINDOW_S]
        return not self._stopping and len(recent) <= MAX_RESTARTS

    def _restart(self) -> None:
        """A fresh worker and batch cache (the old rows may be half written); the prefix cache only holds finished
        prefills, so it stays."""
        self.counters["restarts"] += 1
        self._static, self.busy_since = None, None
        with self._cv:
            self._thread = self._new_thread()
            self._thread.start()
        log.warning("engine worker restarted (%d so far)", self.counters["restarts"])

    @staticmethod
    def _safe_deliver(job: Job, event) -> None:
        try:
            job.deliver(event)
        except Exception:  # a consumer that is gone must not stop the others from hearing
            log.exception("delivering to a job failed")

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
                self._release(job)
                self.counters["cancelled"] += 1
            else:
                keep.append(job)
        self._active = keep

    def _release(self, job: Job, keep: bool = False) -> None:
        """Free a job's static-cache row (the last row moves into it); drop its generation unless `keep` (a finished
        one: the front end may still read its counters)."""
        gen = job.gen
        if gen is not None and isinstance(gen.cache, CacheRow) and gen.cache.slot >= 0:
            self._static.release(gen.cache)
            gen.cache = None
        if not keep:
            job.gen = None

    def _static_cache(self, gen: Generation) -> StaticCache:
        if self._static is None:
            self._static = StaticCache(gen.cache, self.max_batch, STATIC_CAPACITY, self.model.config.canvas_length)
        return self._static

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    def _admit(self, job: Job) -> None:
        job.admitted = time.perf_counter()
        try:
            job.gen = Generation(self.model, job.request)
            job.gen.prefill(self.prefix_cache, self._beat)
            job.gen.cache = self._static_cache(job.gen).admit(job.gen.cache)  # O(its own cache), once
        except Exception as e:  # a bad request must not take the worker down
            log.exception("prefill failed")
            job.gen = None
            job.deliver(Failed(f"prefill failed: {type(e).__name__}"))
            return
        with self._cv:
            self._active.append(job)

    def _step(self) -> None:
        jobs = sorted(self._active, key=lambda j: j.gen.cache.slot)  # rows [0, B) of the static cache, in order
        try:
            results = self._denoise([j.gen for j in jobs])
        except Exception as e:  # e.g. out of memory: fail this batch, keep serving
            log.exception("denoise step failed")
            with self._cv:
                self._active = [j for j in self._active if j not in jobs]
            for job in jobs:
                self._release(job)
                job.deliver(Failed(f"generation failed: {type(e).__name__}"))
            return
        self.counters["steps"] += 1
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(jobs))
        for job, events in zip(jobs, results):
            self._deliver(job, events)
        for job in jobs:
            if job.gen is not None and job.gen.finished:
                self._release(job, keep=True)
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
        for ev in events:
            if isinstance(ev, (SettleEvent, CanvasEvent)):
                now = time.perf_counter()
                if isinstance(ev, CanvasEvent):
                    job.first_commit = job.first_commit or now
                if ev.token_ids:
                    job.first_token = job.first_token or now
            job.deliver(ev)
        if gen.finished:
            self.counters["finished"] += 1
            self.counters["generated_tokens"] += len(gen.token_ids)
            if job.first_token is not None:  # time to first token, summed for /metrics (a Prometheus summary)
                self.latency["first_token_s"] += job.first_token - job.submitted
                self.latency["first_token_count"] += 1
            t0 = job.submitted
            job.deliver(
                Finished(
                    gen.finish_reason,
                    gen.token_ids,
                    gen.steps_per_canvas,
                    gen.forward_passes,
                    job.admitted - t0,
                    job.first_token and job.first_token - t0,
                    job.first_commit and job.first_commit - t0,
                    time.perf_counter() - t0,
                    gen.seam_nll,
                    gen.free_entropy,
                    gen.cached_tokens,
                    gen.redraws,
                )
            )
