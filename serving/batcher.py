"""The scheduler: which images run together through the one warm model.

Jobs submit their images; one GPU thread forms batches and runs them, so the event loop (job
fetching, heartbeats, cancellation, streaming) never waits on the model.

- Compatible images (same `group`: size, steps, sampler, guidance, mode and text length bucket)
  from different jobs share a pipeline call, up to `max_batch_for(engine, spec)` images, after a bounded
  wait for more work to arrive (`wait_s`), longer while the worker knows jobs are on their way
  (`incoming`: taken from the platform, not started yet), at most `incoming.wait_s` more, then
  `wait_s` again for them to submit.
- Fair: the job served least recently (a new job before any served one) picks the next group,
  and a batch takes images from its jobs in turn, so a small job waits behind a large one for at
  most one batch.
- Isolated: a failed batch is retried one image at a time, an out-of-memory batch is split in
  halves, a cancelled job's images leave the queue and its batch stops at the next model call
  once no other job needs it. An unrecoverable device error is reported to `on_fatal`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Hashable

import numpy as np

from pipelines.engine import Engine, ImageItem, SamplingStopped

log = logging.getLogger(__name__)

INCOMING_POLL_S = 0.005  # `incoming` is a plain predicate: looked at this often while it holds a batch


@dataclass(frozen=True)
class IncomingJobs:
    """Jobs the worker has taken that have not reached the scheduler yet: `pending()` says whether
    there are any (called from the GPU thread); they arrive within `wait_s`."""

    pending: Callable[[], bool]
    wait_s: float


NO_INCOMING = IncomingJobs(pending=lambda: False, wait_s=0.0)


@dataclass
class ImageOutcome:
    """One image's result as it leaves the GPU: pixels, or an error code and message."""

    index: int
    seed: int
    pixels: np.ndarray | None = None
    error_code: str | None = None
    error_message: str | None = None
    batch_size: int = 0
    batch_id: int = 0  # the model call that made it: its timings count once per job
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class JobTicket:
    """A job's place in the scheduler; `on_outcome` is called from the GPU thread per image."""

    job_id: str
    engine: Engine
    spec: Any
    group: Hashable
    on_outcome: Callable[[ImageOutcome], None]
    pending: deque[tuple[int, ImageItem]] = field(default_factory=deque)
    cancelled: bool = False
    last_served: float = 0.0  # never served yet: first in line, in the order jobs arrived
    arrival: int = 0


def _service_order(ticket: JobTicket) -> tuple[float, int]:
    """Least recently served first; jobs not served yet before all others, oldest first."""
    return ticket.last_served, ticket.arrival


class Batcher:
    """Forms and runs batches on one GPU thread; see the module docstring for the policy."""

    def __init__(
        self,
        max_batch_for: Callable[[Engine, Any], int],
        wait_s: float,
        is_oom: Callable[[BaseException], bool],
        is_fatal: Callable[[BaseException], bool],
        on_fatal: Callable[[BaseException], None],
        incoming: IncomingJobs = NO_INCOMING,
    ) -> None:
        self._max_batch_for = max_batch_for
        self._wait_s = wait_s
        self._incoming = incoming
        self._is_oom = is_oom
        self._is_fatal = is_fatal
        self._on_fatal = on_fatal
        self._tickets: dict[str, JobTicket] = {}
        self._arrivals = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpu-batcher", daemon=True)
        self._thread.start()

    # -- called from the event loop -------------------------------------------------------------
    def submit(
        self, job_id: str, engine: Engine, spec: Any, items: list[tuple[int, ImageItem]],
        on_outcome: Callable[[ImageOutcome], None],
    ) -> JobTicket:
        """Queue a job's images, each with its index in the job. Images merge with other jobs'
        when the engine gives them the same batch key (a job's images share one)."""
        group = (engine.name, engine.batch_key(spec, items[0][1]))
        with self._cond:
            self._arrivals += 1
            ticket = JobTicket(job_id, engine, spec, group, on_outcome, deque(items), arrival=self._arrivals)
            if job_id in self._tickets:
                raise ValueError(f"job {job_id} is already scheduled")
            self._tickets[job_id] = ticket
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: JobTicket) -> None:
        """Drop the job's queued images; a running batch stops once none of its jobs is live."""
        with self._cond:
            ticket.cancelled = True
            ticket.pending.clear()
            self._tickets.pop(ticket.job_id, None)

    def queued_images(self) -> int:
        with self._cond:
            return sum(len(t.pending) for t in self._tickets.values())

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # -- the GPU thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            ticket, members = batch
            try:
                self._run(ticket.engine, ticket.spec, members)
            except Exception:  # noqa: BLE001 - the GPU thread must outlive any bug in one batch
                log.exception("batch failed outside the model call")
                self._fail([m for m in members if not m[0].cancelled], "internal_error", "the worker failed this image")

    def _next_batch(self) -> tuple[JobTicket, list[tuple[JobTicket, int, ImageItem]]] | None:
        with self._cond:
            while True:
                while not self._stopping and not self._waiting_tickets():
                    self._cond.wait()
                if self._stopping:
                    return None
                first = min(self._waiting_tickets(), key=_service_order)
                limit = max(1, self._max_batch_for(first.engine, first.spec))
                deadline = time.monotonic() + self._wait_s
                hold_until = deadline + self._incoming.wait_s
                held = False
                while self._count(first.group) < limit and not self._stopping:
                    now = time.monotonic()
                    if now < hold_until and self._incoming.pending():
                        held = True
                        self._cond.wait(min(INCOMING_POLL_S, hold_until - now))
                        continue
                    if held:  # they have just started: the usual window for them to plan and submit
                        held, deadline = False, max(deadline, now + self._wait_s)
                    if now >= deadline:
                        break
                    self._cond.wait(deadline - now)
                members = self._take(first.group, limit)
                if members:  # empty when everything was cancelled during the wait
                    return first, members

    def _waiting_tickets(self) -> list[JobTicket]:
        return [t for t in self._tickets.values() if t.pending and not t.cancelled]

    def _count(self, group: Hashable) -> int:
        return sum(len(t.pending) for t in self._waiting_tickets() if t.group == group)

    def _take(self, group: Hashable, limit: int) -> list[tuple[JobTicket, int, ImageItem]]:
        """Up to `limit` images of `group`, one job at a time in turn, least recently served first."""
        jobs = sorted((t for t in self._waiting_tickets() if t.group == group), key=_service_order)
        members: list[tuple[JobTicket, int, ImageItem]] = []
        while len(members) < limit and any(t.pending for t in jobs):
            for ticket in jobs:
                if ticket.pending and len(members) < limit:
                    index, item = ticket.pending.popleft()
                    members.append((ticket, index, item))
        now = time.monotonic()
        for ticket in {id(t): t for t, _, _ in members}.values():
            ticket.last_served = now
        return members

    def _run(self, engine: Engine, spec: Any, members: list[tuple[JobTicket, int, ImageItem]]) -> None:
        live = [m for m in members if not m[0].cancelled]
        if not live:
            return
        tickets = [t for t, _, _ in live]

        def all_cancelled() -> bool:
            return all(t.cancelled for t in tickets)

        try:
            result = engine.generate([item for _, _, item in live], spec, all_cancelled)
        except SamplingStopped:
            return  # every job in it is gone: nobody waits for these images
        except BaseException as err:  # noqa: BLE001 - the worker must outlive any batch
            self._recover(engine, spec, live, err)
            return
        for position, (ticket, index, item) in enumerate(live):
            self._deliver(ticket, ImageOutcome(
                index, item.seed, pixels=result.images[position], batch_size=len(live), batch_id=result.batch_id,
                timings_ms=result.timings_ms,
            ))

    def _recover(
        self, engine: Engine, spec: Any, live: list[tuple[JobTicket, int, ImageItem]], err: BaseException
    ) -> None:
        if self._is_fatal(err):
            log.error("unrecoverable device error: %s", type(err).__name__)
            self._on_fatal(err)
            self._fail(live, "device_failure", "the GPU failed; this worker is being replaced, retry the job")
        elif self._is_oom(err) and len(live) > 1:
            log.warning("out of memory at batch %d: splitting", len(live))
            half = len(live) // 2
            self._run(engine, spec, live[:half])
            self._run(engine, spec, live[half:])
        elif self._is_oom(err):
            self._fail(live, "out_of_memory", f"one {spec.width}x{spec.height} image does not fit in GPU memory")
        elif len(live) > 1:
            log.warning("batch of %d failed (%s): retrying images one by one", len(live), type(err).__name__)
            for member in live:
                self._run(engine, spec, [member])
        else:
            log.error("image failed: %s: %s", type(err).__name__, err)
            self._fail(live, "generation_failed", f"{type(err).__name__} while generating this image")

    def _fail(self, members: list[tuple[JobTicket, int, ImageItem]], code: str, message: str) -> None:
        for ticket, index, item in members:
            self._deliver(ticket, ImageOutcome(index, item.seed, error_code=code, error_message=message))

    @staticmethod
    def _deliver(ticket: JobTicket, outcome: ImageOutcome) -> None:
        if ticket.cancelled:
            return
        try:
            ticket.on_outcome(outcome)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the GPU thread
            log.exception("delivering an image of job %s failed", ticket.job_id)
