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
    """One request: its input, lifecycle timestamps, undelivered stream chunks and result.

    `s3_config` goes to the handler as `job["s3Config"]` and never into a response; `webhook`
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
    output: Any = None
    error: str | None = None
    progress: Any = None
    pending_stream: list[Any] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def set_progress(self, payload: Any) -> None:
        """Keep the latest progress_update payload; only shown while the job runs."""
        if self.status == IN_PROGRESS:
            self.progress = payload

    def start(self) -> None:
        self.status = IN_PROGRESS
        self.started_at = time.monotonic()

    def finish(self, status: str, output: Any = None, error: str | None = None) -> None:
        """Move to a final status once; later calls (e.g. a cancel racing completion) are ignored."""
        if self.is_final:
            return
        self.status = status
        self.output = output
        self.error = error
        self.finished_at = time.monotonic()
        self.done.set()

    def requeue(self) -> None:
        """Back to IN_QUEUE under the same id and input, the previous result gone (RunPod's /retry)."""
        self.status = IN_QUEUE
        self.submitted_at = time.monotonic()
        self.started_at = self.finished_at = None
        self.output = self.error = self.progress = None
        self.pending_stream = []
        self.done = asyncio.Event()
        self.task = None

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
        """Plain lookup, safe from any thread (the progress hook calls it from handler threads)."""
        return self._jobs.get(job_id)

    def lookup(self, job_id: str) -> JobRecord | None:
        """Lookup for API requests: expired results are gone."""
        self.prune()
        return self._jobs.get(job_id)

    def count(self, status: str) -> int:
        return sum(1 for record in self._jobs.values() if record.status == status)

    def prune(self) -> None:
        horizon = time.monotonic() - self.retention_s
        expired = [
            job_id
            for job_id, record in self._jobs.items()
            if record.finished_at is not None and record.finished_at < horizon
        ]
        for job_id in expired:
            del self._jobs[job_id]
