"""The GPU thread: runs the model calls and decodes the scheduler chooses, and delivers each image.

Jobs submit their images from the event loop (`submit`); one thread asks the scheduler
(serving/scheduler.py) for the next model call, starts the rows it names that have not started
(text encoded, noise drawn), runs the call, and decodes finished rows between calls, handing each
image to its job's `on_outcome` as soon as it is decoded. The event loop never waits on the model.

Isolated: a call that runs out of memory is split in halves (and the group's calls stay at most
that small), a failing call is retried one row at a time so only the row at fault fails, a row
whose own update fails fails alone, a cancelled job's rows leave at the next call. An unrecoverable
device error is reported to `on_fatal`. When the GPU is idle, the first call waits up to `wait_s`
for compatible rows (jobs that come together start together), longer while jobs are on their way
(`IncomingJobs`: taken from the platform, not started), at most `incoming.wait_s` more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pipelines.engine import Engine, ImageItem, StageClock, synchronize
from serving.job_ticket import ImageOutcome, JobTicket, JobUsage
from serving.scheduler import Call, Job, Priority, Scheduler, Slot

log = logging.getLogger(__name__)
INCOMING_POLL_S = 0.005  # `incoming` is a plain predicate: looked at this often while it holds a call


@dataclass(frozen=True)
class IncomingJobs:
    """Jobs the worker has taken that have not reached the scheduler yet: `pending()` says whether
    there are any (called from the GPU thread); they arrive within `wait_s`."""

    pending: Callable[[], bool]
    wait_s: float


NO_INCOMING = IncomingJobs(pending=lambda: False, wait_s=0.0)


@dataclass
class _Admission:
    """The first call of an idle GPU, waiting for company: until `deadline`, or while jobs are on
    their way until `hold_until` (then the usual window again for them to submit)."""

    deadline: float
    hold_until: float
    held: bool = False


def _ticket(slot: Slot) -> JobTicket:
    return slot.job.owner


class EngineLoop:
    """Owns the scheduler and the one GPU thread; see the module docstring."""

    def __init__(
        self,
        scheduler: Scheduler,
        max_batch_for: Callable[[Engine, Any], int],
        wait_s: float,
        decode_megapixels: float,
        is_oom: Callable[[BaseException], bool],
        is_fatal: Callable[[BaseException], bool],
        on_fatal: Callable[[BaseException], None],
        clock: Callable[[], float] = time.perf_counter,
        incoming: IncomingJobs = NO_INCOMING,
    ) -> None:
        self._scheduler = scheduler
        self._clock = clock  # seconds: arrivals, the admission wait and the calls' measured cost
        self._max_batch_for = max_batch_for
        self._wait_s = wait_s
        self._decode_pixels = decode_megapixels * 2**20
        self._is_oom = is_oom
        self._is_fatal = is_fatal
        self._on_fatal = on_fatal
        self._incoming = incoming
        self._tickets: dict[str, JobTicket] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpu-engine-loop", daemon=True)
        self._thread.start()

    # -- called from the event loop -------------------------------------------------------------
    def submit(
        self, job_id: str, engine: Engine, spec: Any, items: list[tuple[int, ImageItem]],
        on_outcome: Callable[[ImageOutcome], None], priority: Priority | None = None,
    ) -> JobTicket:
        """Queue a job's images, each with its index in the job. Its rows share calls with other
        jobs' rows of the same engine and batch key (a job's images all have one)."""
        group = (engine.name, engine.batch_key(spec, items[0][1]))
        calls, weight = engine.model_calls(spec), engine.activation_bytes(spec) / 2**30
        job = Job(job_id, group, self._clock(), max(1, self._max_batch_for(engine, spec)), priority,
                  decode_rows=max(1, int(self._decode_pixels // (spec.width * spec.height))))
        for index, _item in items:
            job.add_slot(index, calls, weight)
        ticket = JobTicket(job_id, engine, spec, dict(items), on_outcome, job)
        job.owner = ticket
        with self._cond:
            if job_id in self._tickets:
                raise ValueError(f"job {job_id} is already scheduled")
            self._tickets[job_id] = ticket
            self._scheduler.add(job)
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: JobTicket) -> None:
        """The job's rows leave at once; a call in flight finishes without them being delivered."""
        with self._cond:
            ticket.cancelled = True
            self._scheduler.remove(ticket.job)
            if self._tickets.get(ticket.job_id) is ticket:  # not a retried job's new ticket
                del self._tickets[ticket.job_id]

    def usage(self, ticket: JobTicket) -> JobUsage:
        """A copy of the job's usage so far (the GPU thread may still be adding to it)."""
        with self._cond:
            usage = ticket.usage
            return JobUsage(dict(usage.timings_ms), usage.model_calls, list(usage.batch_sizes))

    def queued_images(self) -> int:
        with self._cond:
            return self._scheduler.pending_images()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # -- the GPU thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            work = self._next_work()
            if work is None:
                return
            try:
                if isinstance(work, Call):
                    self._run_call(work)
                else:
                    self._decode(work)
            except Exception:  # noqa: BLE001 - the GPU thread must outlive any bug in one call
                slots = work.slots if isinstance(work, Call) else work
                log.exception("model call or decode failed outside the engine")
                self._fail(slots, "internal_error", "the worker failed this image")

    def _next_work(self) -> Call | list[Slot] | None:
        """The scheduler's next model call or decode chunk, once due; None to stop."""
        with self._cond:
            admission: _Admission | None = None
            while not self._stopping:
                work = self._scheduler.next()
                if isinstance(work, list):
                    return work
                if work is None:
                    self._cond.wait()
                    continue
                if admission is None:
                    deadline = work.top.arrival_s + self._wait_s
                    admission = _Admission(deadline, deadline + self._incoming.wait_s)
                wait = self._admission_wait(work, admission)
                if wait <= 0:
                    return work
                self._cond.wait(wait)
            return None

    def _admission_wait(self, call: Call, admission: _Admission) -> float:
        """Seconds to wait for more rows before a call: only when the GPU is idle and the call is
        not full, for at most `wait_s` after its top job arrived, or while jobs are on their way."""
        if len(call.slots) >= call.limit or self._scheduler.has_started_rows():
            return 0.0
        now = self._clock()
        if now < admission.hold_until and self._incoming.pending():
            admission.held = True
            return min(INCOMING_POLL_S, admission.hold_until - now)
        if admission.held:  # they have just started: the usual window for them to plan and submit
            admission.held, admission.deadline = False, max(admission.deadline, now + self._wait_s)
        return admission.deadline - now

    def _run_call(self, call: Call) -> None:
        engine = _ticket(call.slots[0]).engine
        self._start([slot for slot in call.slots if slot.state == "waiting"], engine)
        with self._cond:
            runnable = [slot for slot in call.slots if slot.state == "started" and not slot.job.removed]
        if runnable:
            self._step(runnable, engine)

    def _start(self, slots: list[Slot], engine: Engine) -> None:
        """Rows for the newcomers, one `start` per job (a job's images share a spec): its stages
        timed (`vae_encoding` for image to image, the rest `text_encoding`)."""
        by_job: dict[int, list[Slot]] = {}
        for slot in slots:
            by_job.setdefault(id(slot.job), []).append(slot)
        for members in by_job.values():
            ticket = _ticket(members[0])
            clock = StageClock(engine.device)
            rows, _, _ = self._timed(engine, partial(self._start_rows, engine, ticket, clock), members)
            clock.lap("text_encoding")
            with self._cond:
                ticket.usage.add_stages(clock.timings_ms)
                for slot, row in rows:
                    row.tag, slot.row, slot.state = slot, row, "started"

    @staticmethod
    def _start_rows(engine: Engine, ticket: JobTicket, clock: StageClock, slots: list[Slot]) -> list:
        return engine.start([ticket.items[slot.index] for slot in slots], ticket.spec, clock)

    def _step(self, slots: list[Slot], engine: Engine) -> None:
        done, seconds, once = self._timed(engine, lambda batch: engine.step([slot.row for slot in batch]), slots)
        ran = [slot for slot, _ in done]
        failed = [(slot, slot.row.error) for slot in ran if slot.row.error is not None]
        with self._cond:
            self._scheduler.ran(ran, seconds if once else None)
            rows = frozenset(id(slot) for slot in ran)
            for ticket in {id(_ticket(slot)): _ticket(slot) for slot in ran}.values():
                ticket.usage.add_call(rows, seconds * 1000)
            for slot in ran:
                if slot.row.done and slot.row.error is None:
                    self._scheduler.finished(slot)
        for slot, err in failed:
            self._classify(err, [slot], _ticket(slot).spec)

    def _decode(self, slots: list[Slot]) -> None:
        live = [slot for slot in slots if not slot.job.removed]
        if not live:
            return
        engine = _ticket(live[0]).engine
        done, seconds, once = self._timed(engine, lambda batch: list(engine.finish([s.row for s in batch])), live)
        with self._cond:
            if once and done:
                self._scheduler.decoded(live, seconds)
            for ticket in {id(_ticket(slot)): _ticket(slot) for slot, _ in done}.values():
                ticket.usage.timings_ms["decoding"] += seconds * 1000
        for slot, pixels in done:
            self._deliver(slot, ImageOutcome(slot.index, _ticket(slot).items[slot.index].seed, pixels=pixels))

    def _timed(self, engine: Engine, run: Callable[[list[Slot]], Any],
               slots: list[Slot]) -> tuple[list[tuple[Slot, Any]], float, bool]:
        """`_attempt`, timed on the device: the pairs that succeeded, the seconds, and whether it took
        one run (a split or retried call's time is not the cost of one call of these rows)."""
        runs = 0

        def counted(batch: list[Slot]) -> Any:
            nonlocal runs
            runs += 1
            return run(batch)

        began = self._clock()
        done = self._attempt(counted, slots, _ticket(slots[0]).spec)
        synchronize(engine.device)
        return done, self._clock() - began, runs == 1

    def _attempt(self, run: Callable[[list[Slot]], Any], slots: list[Slot], spec: Any) -> list[tuple[Slot, Any]]:
        """`run(slots)`, which returns one result per slot (or None for all). On failure: out of
        memory splits the slots in halves (capping the group), any other error retries them one
        by one; what fails alone is failed. Returns the (slot, result) pairs that succeeded."""
        try:
            results = run(slots)
        except BaseException as err:  # noqa: BLE001 - the worker must outlive any call
            if self._is_fatal(err) or len(slots) == 1:
                self._classify(err, slots, spec)
                return []
            if self._is_oom(err):
                half = len(slots) // 2
                log.warning("out of memory at %d rows: splitting, and calls of this group stay at %d", len(slots), half)
                with self._cond:
                    self._scheduler.cap(slots[0].job.group, half)
                return self._attempt(run, slots[:half], spec) + self._attempt(run, slots[half:], spec)
            log.warning("call of %d rows failed (%s): retrying them one by one", len(slots), type(err).__name__)
            return [pair for slot in slots for pair in self._attempt(run, [slot], spec)]
        return list(zip(slots, results if results is not None else [None] * len(slots)))

    def _classify(self, err: BaseException, slots: list[Slot], spec: Any) -> None:
        if self._is_fatal(err):
            log.error("unrecoverable device error: %s", type(err).__name__)
            self._on_fatal(err)
            self._fail(slots, "device_failure", "the GPU failed; this worker is being replaced, retry the job")
        elif self._is_oom(err):
            self._fail(slots, "out_of_memory", f"one {spec.width}x{spec.height} image does not fit in GPU memory")
        else:
            log.error("image failed: %s: %s", type(err).__name__, err)
            self._fail(slots, "generation_failed", f"{type(err).__name__} while generating this image")

    def _fail(self, slots: list[Slot], code: str, message: str) -> None:
        for slot in slots:
            seed = _ticket(slot).items[slot.index].seed
            self._deliver(slot, ImageOutcome(slot.index, seed, error_code=code, error_message=message))

    def _deliver(self, slot: Slot, outcome: ImageOutcome) -> None:
        ticket = _ticket(slot)
        with self._cond:
            self._scheduler.release(slot)
            slot.row = None  # its latents and encodings go now
            if ticket.cancelled:
                return
        try:
            ticket.on_outcome(outcome)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the GPU thread
            log.exception("delivering an image of job %s failed", ticket.job_id)
