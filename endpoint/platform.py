"""The platform side of one local endpoint: what RunPod does between its clients and its workers.

Clients submit jobs (IN_QUEUE); workers take them over the worker protocol (IN_PROGRESS), stream
chunks, post progress and one final result (COMPLETED or FAILED). The platform cancels, times out
and retries jobs, and tells a worker which of its jobs to stop. The rules are RunPod's documented
ones (docs/ENDPOINT.md, "Job lifecycle"):

- a job's execution timeout runs from its take; past it the job is TIMED_OUT and its worker is
  told to stop it; a cancelled job is CANCELLED at once and its worker is told the same way.
- a job whose worker vanished (killed, crashed) stays IN_PROGRESS until that timeout: RunPod
  documents TIMED_OUT for "the worker failed to report back before reaching the timeout
  threshold", and /retry for FAILED and TIMED_OUT jobs. Nothing is requeued behind the client's back.
- a job ends once: a result for a job that already ended (cancelled, timed out, or posted again
  because the worker's POST was retried) is acknowledged and dropped.
- a worker that asked to stop (`stopPod`, after `refresh_worker`) or is being stopped takes no
  more jobs.
- a stop signal for a job the SDK has taken but not started yet is lost (its `stop_job` knows only
  running tasks), and the job runs on; the SDK's pings list the jobs it holds, so a ping that
  still lists a job this platform ended is answered by signalling the stop again.

Everything runs on the server's event loop; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from endpoint.jobs import (
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    IN_QUEUE,
    RETRYABLE_STATUSES,
    TIMED_OUT,
    JobRecord,
    JobStore,
)

log = logging.getLogger(__name__)

FinalHook = Callable[[JobRecord], None]
StopPodHook = Callable[[str], None]
COUNTER_OF = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled", TIMED_OUT: "timedOut"}


class NotRetryable(Exception):
    """/retry on a job that is not FAILED or TIMED_OUT."""


@dataclass
class WorkerSeat:
    """What the platform knows of one worker: from its polls, pings and results."""

    id: str
    polled: bool = False  # it has asked for jobs: its start-up is over
    last_ping: float | None = None
    pinged_jobs: frozenset[str] = frozenset()  # the jobs its SDK said it holds, at `last_ping`
    draining: bool = False  # being stopped, or asked to be (stopPod): no more jobs for it
    gone: bool = False
    held: set[str] = field(default_factory=set)  # its IN_PROGRESS jobs
    stops: list[str] = field(default_factory=list)  # job ids for its stop channel
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def state(self) -> str:
        if self.gone:
            return "exited"
        if self.draining:
            return "draining"
        if not self.polled:
            return "initializing"
        return "running" if self.held else "idle"


class Platform:
    """One endpoint's queue and its workers' jobs; see the module docstring for the rules."""

    def __init__(self, store: JobStore, on_final: FinalHook | None = None,
                 on_stop_pod: StopPodHook | None = None) -> None:
        self.store = store
        self.on_final = on_final  # once per final state; must not block
        self.on_stop_pod = on_stop_pod  # a worker's result asked RunPod to stop it
        self.counters = {"completed": 0, "failed": 0, "cancelled": 0, "timedOut": 0, "retried": 0,
                         "duplicateResults": 0}
        self.workers: dict[str, WorkerSeat] = {}
        self._queue: deque[JobRecord] = deque()
        self._takers: deque[tuple[str, asyncio.Future[None]]] = deque()
        self._closed = False

    # -- what clients do ---------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_progress(self) -> int:
        return sum(len(seat.held) for seat in self.workers.values())

    def submit(self, record: JobRecord) -> None:
        self.store.add(record)
        self._queue.append(record)
        self._wake_a_taker()

    def cancel(self, record: JobRecord) -> None:
        """Queued: it never starts. Running: CANCELLED now, and its worker is told to stop it."""
        if record.status == IN_QUEUE:
            with suppress(ValueError):
                self._queue.remove(record)
        self._finish(record, CANCELLED)  # nothing when it has ended

    def retry(self, record: JobRecord) -> None:
        if record.status not in RETRYABLE_STATUSES:
            raise NotRetryable(f"only FAILED or TIMED_OUT jobs can be retried, this one is {record.status}")
        record.requeue()
        self.counters["retried"] += 1
        self._queue.append(record)
        self._wake_a_taker()

    def purge(self) -> int:
        """Every queued job ends CANCELLED; running ones go on."""
        queued, self._queue = list(self._queue), deque()
        for record in queued:
            self._finish(record, CANCELLED)
        return len(queued)

    # -- what workers do ---------------------------------------------------------------------------
    def seat(self, worker_id: str) -> WorkerSeat:
        """The worker's seat, made on first contact: a worker started by hand is served too."""
        seat = self.workers.get(worker_id)
        if seat is None:
            seat = self.workers[worker_id] = WorkerSeat(worker_id)
        return seat

    async def take(self, worker_id: str, count: int, hold_s: float) -> list[JobRecord]:
        """Up to `count` queued jobs for this worker, waiting up to `hold_s` for the first (a
        long-poll: RunPod's job-take holds the request too). Workers waiting longest are served
        first. Empty when nothing came, or the worker is being stopped."""
        seat = self.seat(worker_id)
        seat.polled = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold_s
        while not self._queue and self._may_take(seat):
            waiter: asyncio.Future[None] = loop.create_future()
            self._takers.append((worker_id, waiter))
            try:
                async with asyncio.timeout_at(deadline):  # asyncio.wait_for would drop a cancel (3.11)
                    await waiter
            except TimeoutError:
                return []
            except asyncio.CancelledError:  # the worker hung up: another poll gets the job it was woken for
                if waiter.done() and not waiter.cancelled():
                    self._wake_a_taker()
                raise
            finally:
                with suppress(ValueError):
                    self._takers.remove((worker_id, waiter))
        if not self._may_take(seat):
            return []
        taken = [self._queue.popleft() for _ in range(min(count, len(self._queue)))]
        for record in taken:
            self._start(record, seat)
        if self._queue:
            self._wake_a_taker()  # what is left may suit another worker's poll
        return taken

    def stream(self, worker_id: str, job_id: str, chunk: Any) -> None:
        record = self._held_record(worker_id, job_id, "stream chunk")
        if record is not None:
            record.add_chunk(chunk)

    def report(self, worker_id: str, job_id: str, body: dict[str, Any]) -> None:
        """A job-done post: progress (`status: IN_PROGRESS`) or the job's one result."""
        record = self._held_record(worker_id, job_id, "result")
        if record is None:
            return
        if body.get("status") == IN_PROGRESS:
            record.set_progress(body.get("output"))
            return
        if body.get("stopPod"):
            self._stop_pod(worker_id)
        if record.is_final:
            if record.status in (COMPLETED, FAILED):
                self.counters["duplicateResults"] += 1
            log.info("job %s: result from %s after it ended %s: dropped", job_id, worker_id, record.status)
            return
        if record.streamed and isinstance(body.get("output"), list) and len(body["output"]) != record.streamed:
            log.warning("job %s: the result holds %d chunks, the stream had %d",
                        job_id, len(body["output"]), record.streamed)
        if body.get("error"):
            self._finish(record, FAILED, output=body.get("output"), error=str(body["error"]))
        else:
            self._finish(record, COMPLETED, output=body.get("output"))

    async def stop_signals(self, worker_id: str, hold_s: float) -> list[str]:
        """Job ids this worker must stop, waiting up to `hold_s` for one (a long-poll). A draining
        worker with nothing left to stop is answered at once, so its SDK loop can exit."""
        seat = self.seat(worker_id)
        with suppress(TimeoutError):
            async with asyncio.timeout(hold_s):
                while not seat.stops and not self._closed and not (seat.draining and not seat.held):
                    seat.stop_event.clear()
                    await seat.stop_event.wait()
        stops, seat.stops = seat.stops, []
        return stops

    def ping(self, worker_id: str, held_job_ids: list[str]) -> None:
        seat = self.seat(worker_id)
        seat.last_ping, seat.pinged_jobs = time.monotonic(), frozenset(held_job_ids)
        for job_id in held_job_ids:
            record = self.store.get(job_id)
            stopped_here = (record is not None and record.worker_id == worker_id
                            and record.status in (CANCELLED, TIMED_OUT))
            if stopped_here and job_id not in seat.stops:
                seat.stops.append(job_id)
                seat.stop_event.set()

    # -- what the worker pool tells it --------------------------------------------------------------
    def drain(self, worker_id: str) -> None:
        """The worker is being stopped (scaled down): it takes no more jobs, finishes its own."""
        seat = self.seat(worker_id)
        seat.draining = True
        seat.stop_event.set()
        self._wake_all_takers()

    def worker_exited(self, worker_id: str) -> None:
        """Its jobs stay IN_PROGRESS until their execution timeout, as on RunPod."""
        seat = self.seat(worker_id)
        seat.gone = seat.draining = True
        seat.stops.clear()
        if seat.held:
            log.warning("worker %s exited holding %d job(s) %s: they end TIMED_OUT at their execution timeout, "
                        "as on RunPod (then /retry runs them again)", worker_id, len(seat.held), sorted(seat.held))
        self._wake_all_takers()

    def close(self) -> None:
        """The server stops: every long-poll returns now."""
        self._closed = True
        self._wake_all_takers()
        for seat in self.workers.values():
            seat.stop_event.set()

    # -- inside ----------------------------------------------------------------------------------
    def _may_take(self, seat: WorkerSeat) -> bool:
        return not (self._closed or seat.draining)

    def _start(self, record: JobRecord, seat: WorkerSeat) -> None:
        record.start(seat.id)
        seat.held.add(record.id)
        record.timer = asyncio.get_running_loop().call_later(record.execution_timeout_s, self._time_out, record)

    def _time_out(self, record: JobRecord) -> None:
        if record.status == IN_PROGRESS:
            self._finish(record, TIMED_OUT, error="execution timeout exceeded")

    def _held_record(self, worker_id: str, job_id: str, what: str) -> JobRecord | None:
        """The job, if this worker is the one that took it (a post for a job retried and taken by
        another worker, or forgotten after retention, is dropped)."""
        self.seat(worker_id)
        record = self.store.get(job_id)
        if record is None or record.worker_id != worker_id:
            log.info("%s for job %s from %s, which does not hold it: dropped", what, job_id, worker_id)
            return None
        return record

    def _finish(self, record: JobRecord, status: str, output: Any = None, error: str | None = None) -> None:
        was_running = record.status == IN_PROGRESS
        if not record.finish(status, output=output, error=error):
            return
        self.counters[COUNTER_OF[status]] += 1
        seat = self.workers.get(record.worker_id or "")
        if was_running and seat is not None:
            seat.held.discard(record.id)
            if status in (CANCELLED, TIMED_OUT) and not seat.gone:
                seat.stops.append(record.id)  # RunPod's per-job stop signal
            seat.stop_event.set()
        if self.on_final is not None:
            self.on_final(record)

    def _stop_pod(self, worker_id: str) -> None:
        seat = self.seat(worker_id)
        if not seat.draining:
            log.info("worker %s asked to be stopped after its job (refresh_worker)", worker_id)
            self.drain(worker_id)
            if self.on_stop_pod is not None:
                self.on_stop_pod(worker_id)

    def _wake_a_taker(self) -> None:
        while self._takers:
            worker_id, waiter = self._takers.popleft()
            if not waiter.done() and self._may_take(self.seat(worker_id)):
                waiter.set_result(None)
                return

    def _wake_all_takers(self) -> None:
        for _, waiter in self._takers:
            if not waiter.done():
                waiter.set_result(None)
        self._takers.clear()
