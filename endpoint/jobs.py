"""Job records and their store: the state behind /status, /stream and /health."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
FINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})
RETRYABLE_STATUSES = frozenset({FAILED, TIMED_OUT})  # RunPod's /retry takes only these


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


@dataclass
class JobRecord:
    """One request: its input, lifecycle timestamps, the worker holding it, undelivered stream
    chunks and result.

    `s3_config` goes to the worker as `job["s3Config"]` and never into a response; `webhook`
    receives the final /status body."""

    input: Any
    execution_timeout_s: float
    s3_config: dict[str, Any] | None = None
    webhook: str | None = None
    id: str = field(default_factory=lambda: f"{uuid.uuid4()}-local")
    status: str = IN_QUEUE
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    takes: int = 0  # times a worker took it: more than 1 + retries would be a job run twice
    output: Any = None
    error: str | None = None
    progress: Any = None
    pending_stream: list[Any] = field(default_factory=list)
    streamed: int = 0  # chunks received from the worker in this run
    last_chunk_at: float | None = None  # when the latest one came (scripts/bench_loop.py: the result post's time)
    chunks_after_end: int = 0  # chunks that came after the job had ended
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None  # the execution timeout, from the take

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def job_for_worker(self) -> dict[str, Any]:
        """What job-take hands the worker, as RunPod does: the id, the input, and `s3Config`."""
        job: dict[str, Any] = {"id": self.id, "input": self.input}
        if self.s3_config is not None:
            job["s3Config"] = self.s3_config
        return job

    def start(self, worker_id: str) -> None:
        self.status = IN_PROGRESS
        self.started_at = time.monotonic()
        self.worker_id = worker_id
        self.takes += 1

    def add_chunk(self, chunk: Any) -> None:
        """A chunk posted to job-stream: kept for /stream while the job runs, counted after."""
        if self.is_final:
            self.chunks_after_end += 1
            return
        self.pending_stream.append(chunk)
        self.streamed += 1
        self.last_chunk_at = time.monotonic()

    def set_progress(self, payload: Any) -> None:
        """Keep the latest progress post; only shown while the job runs."""
        if self.status == IN_PROGRESS:
            self.progress = payload

    def finish(self, status: str, output: Any = None, error: str | None = None) -> bool:
        """Move to a final status once; False (and nothing changes) when it already ended, e.g. a
        result posted again after a retried POST, or a cancel racing completion."""
        if self.is_final:
            return False
        self.status = status
        self.output = output
        self.error = error
        self.finished_at = time.monotonic()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.done.set()
        return True

    def requeue(self) -> None:
        """Back to IN_QUEUE under the same id and input, the previous result gone (RunPod's /retry)."""
        self.status = IN_QUEUE
        self.submitted_at = time.monotonic()
        self.started_at = self.finished_at = self.last_chunk_at = None
        self.worker_id = None
        self.output = self.error = self.progress = None
        self.pending_stream = []
        self.streamed = self.chunks_after_end = 0
        self.done = asyncio.Event()

    def take_stream(self) -> list[Any]:
        """Chunks produced since the previous call (what /stream returns)."""
        chunks, self.pending_stream = self.pending_stream, []
        return chunks

    def timings(self) -> dict[str, int]:
        """delayTime (queued) and executionTime (running) in ms, as far as they are known."""
        out: dict[str, int] = {}
        if self.started_at is not None:
            out["delayTime"] = _ms(self.started_at - self.submitted_at)
            end = self.finished_at if self.finished_at is not None else time.monotonic()
            out["executionTime"] = _ms(end - self.started_at)
        elif self.finished_at is not None:  # cancelled while queued
            out["delayTime"] = _ms(self.finished_at - self.submitted_at)
        return out


class JobStore:
    """All known jobs; final ones are forgotten `retention_s` after they finish."""

    def __init__(self, retention_s: float) -> None:
        self.retention_s = retention_s
        self._jobs: dict[str, JobRecord] = {}

    def add(self, record: JobRecord) -> None:
        self.prune()
        self._jobs[record.id] = record

    def get(self, job_id: str) -> JobRecord | None:
        """Plain lookup (worker posts: a result for a job just expired is simply dropped)."""
        return self._jobs.get(job_id)

    def lookup(self, job_id: str) -> JobRecord | None:
        """Lookup for API requests: expired results are gone."""
        self.prune()
        return self._jobs.get(job_id)

    def prune(self) -> None:
        horizon = time.monotonic() - self.retention_s
        expired = [
            job_id
            for job_id, record in self._jobs.items()
            if record.finished_at is not None and record.finished_at < horizon
        ]
        for job_id in expired:
            del self._jobs[job_id]
