"""Runs queued jobs through the handler with the runpod SDK worker's semantics.

The per-job code paths are the SDK's own (`run_job_generator`, `run_job`); this module only
replaces what the SDK does over HTTP (job-take, stream and result posts) with in-process state,
mirroring `rp_job.handle_job` and `rp_scale.JobScaler`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import Any
from collections.abc import Callable

from runpod.serverless.modules.rp_handler import is_generator
from runpod.serverless.modules.rp_job import run_job, run_job_generator

from endpoint.jobs import (
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_QUEUE,
    RETRYABLE_STATUSES,
    TIMED_OUT,
    JobRecord,
    JobStore,
)

log = logging.getLogger(__name__)

# RunPod drops /stream chunks above this size; warn so a handler that relies on it is noticed.
STREAM_CHUNK_LIMIT_BYTES = 1_000_000

ConcurrencyModifier = Callable[[int], int]
FinalHook = Callable[[JobRecord], None]


class NotRetryable(Exception):
    """/retry on a job that is not FAILED or TIMED_OUT."""


def _default_concurrency_modifier(current: int) -> int:
    return current


class JobRunner:
    """Queue, concurrency limit, execution timeout and cancellation for one local 'worker'."""

    def __init__(
        self,
        handler: Callable[..., Any],
        store: JobStore,
        concurrency_modifier: ConcurrencyModifier | None = None,
        on_final: FinalHook | None = None,
    ) -> None:
        self.handler = handler
        self.store = store
        self.concurrency_modifier = concurrency_modifier or _default_concurrency_modifier
        self.on_final = on_final  # called once per terminal state, on the loop; must not block
        self.concurrency = 1  # the SDK starts at 1 and asks the modifier from there
        self.counters = {"completed": 0, "failed": 0, "cancelled": 0, "timedOut": 0, "retried": 0}
        self._queue: deque[JobRecord] = deque()
        self._running: dict[str, JobRecord] = {}
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name="endpoint-dispatcher")

    async def stop(self) -> None:
        """Cancel the dispatcher and every running job (server shutdown)."""
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if self._dispatcher is not None:
            tasks.append(self._dispatcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def submit(self, record: JobRecord) -> None:
        self.store.add(record)
        self._queue.append(record)
        self._wakeup.set()

    def retry(self, record: JobRecord) -> None:
        """Queue a FAILED or TIMED_OUT job again under its id and input; anything else raises."""
        if record.status not in RETRYABLE_STATUSES:
            raise NotRetryable(f"only FAILED or TIMED_OUT jobs can be retried, this one is {record.status}")
        record.requeue()
        self.counters["retried"] += 1
        self._queue.append(record)
        self._wakeup.set()

    def purge(self) -> int:
        """Cancel every queued job (running ones go on); how many there were."""
        queued, self._queue = list(self._queue), deque()
        for record in queued:
            self._finish(record, CANCELLED)
        return len(queued)

    def cancel(self, record: JobRecord) -> None:
        """Queued: never starts. Running: its task is cancelled, as the SDK does on a stop signal."""
        if record.status == IN_QUEUE:
            self._queue.remove(record)
            self._finish(record, CANCELLED)
        elif record.task is not None and not record.is_final:
            record.task.cancel()

    def _refresh_concurrency(self) -> None:
        # Like JobScaler.set_scale: ask the modifier, but only resize when nothing is in flight.
        wanted = max(1, int(self.concurrency_modifier(self.concurrency)))
        if wanted != self.concurrency and not self._running:
            self.concurrency = wanted

    async def _dispatch(self) -> None:
        while True:
            self._refresh_concurrency()
            while self._queue and len(self._running) < self.concurrency:
                record = self._queue.popleft()
                record.start()
                self._running[record.id] = record
                record.task = asyncio.create_task(self._execute(record), name=f"job-{record.id}")
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _execute(self, record: JobRecord) -> None:
        try:
            async with asyncio.timeout(record.execution_timeout_s):
                result = await self._run_handler(record)
        except TimeoutError:
            self._finish(record, TIMED_OUT, error="execution timeout exceeded")
        except asyncio.CancelledError:
            self._finish(record, CANCELLED)
        except Exception as err:  # a fault of this server, not of the handler (the SDK catches those)
            log.exception("job %s: local runner error", record.id)
            self._finish(record, FAILED, error=f"local runner: {type(err).__name__}: {err}")
        else:
            if result.get("error"):
                self._finish(record, FAILED, output=result.get("output"), error=str(result["error"]))
            else:
                self._finish(record, COMPLETED, output=result.get("output"))
        finally:
            self._running.pop(record.id, None)
            self._wakeup.set()

    async def _run_handler(self, record: JobRecord) -> dict[str, Any]:
        """The result the SDK would post to job-done: `{"output": ...}` or `{"error": ...}`."""
        job = {"id": record.id, "input": record.input}
        if record.s3_config is not None:
            job["s3Config"] = record.s3_config  # what RunPod hands the worker
        if not is_generator(self.handler):
            return await run_job(self.handler, job)
        aggregate: list[Any] = []
        async for partial in run_job_generator(self.handler, job):
            output = partial.get("output")
            if isinstance(output, dict) and output.get("error"):
                return {"error": str(output["error"])}
            if partial.get("error"):
                return partial
            self._check_chunk_size(record, output)
            record.pending_stream.append(output)
            aggregate.append(output)  # return_aggregate_stream=True, as the contract requires
        return {"output": aggregate}

    @staticmethod
    def _check_chunk_size(record: JobRecord, output: Any) -> None:
        size = len(json.dumps(output))
        if size > STREAM_CHUNK_LIMIT_BYTES:
            log.warning(
                "job %s: stream chunk of %d bytes exceeds RunPod's %d byte limit",
                record.id, size, STREAM_CHUNK_LIMIT_BYTES,
            )

    def _finish(self, record: JobRecord, status: str, output: Any = None, error: str | None = None) -> None:
        if record.is_final:
            return
        record.finish(status, output=output, error=error)
        key = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled", TIMED_OUT: "timedOut"}[status]
        self.counters[key] += 1
        if self.on_final is not None:
            self.on_final(record)
