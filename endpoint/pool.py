"""The local endpoint's workers: real worker processes, started the way RunPod starts them.

Each worker runs the worker command (`python handler.py` for the real handler, exactly what the
image runs) with the environment RunPod gives a worker: `RUNPOD_WEBHOOK_GET_JOB`,
`RUNPOD_WEBHOOK_POST_OUTPUT`, `RUNPOD_WEBHOOK_POST_STREAM`, `RUNPOD_WEBHOOK_PING`,
`RUNPOD_POD_ID`, `RUNPOD_AI_API_KEY` and `RUNPOD_PING_INTERVAL`, pointing at this server. Nothing
of the SDK is patched: the worker calls `runpod.serverless.start` and its JobScaler talks HTTP to
the server's worker API (endpoint/worker_api.py).

A worker that exits (after `refresh_worker`, killed, crashed) is replaced by a fresh one with a
new id, as RunPod starts a new worker; one that keeps dying before it asks for a job is restarted
after a growing delay. Each worker is the leader of its own process group: the terminal's Ctrl-C
reaches only the server, which stops its workers with SIGTERM (the SDK finishes the jobs it
holds, then exits) and, after `drain_timeout_s`, SIGKILL to the whole group. Killing the group
also ends the SDK's ping process, a child that would outlive a killed worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from endpoint.platform import Platform

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HANDLER = "handler:handler"


def worker_command(spec: str = DEFAULT_HANDLER) -> tuple[str, ...]:
    """`handler:handler` runs as the image runs it (`python handler.py`); any other `module:attr`
    runs under the same SDK loop through `endpoint.sdk_worker`."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"handler must look like module:attr, got {spec!r}")
    if spec == DEFAULT_HANDLER:
        return (sys.executable, "handler.py")
    return (sys.executable, "-m", "endpoint.sdk_worker", spec)


@dataclass(frozen=True)
class PoolSettings:
    command: tuple[str, ...] = field(default_factory=worker_command)
    workers: int = 1
    env: Mapping[str, str] = field(default_factory=dict)  # more environment for every worker, e.g. CONCURRENCY
    log_dir: Path | None = None  # one log file per worker there; None: this process's stdout and stderr
    ping_interval_ms: int = 2_000  # the SDK pings the jobs it holds: a lost stop signal is repeated this soon
    drain_timeout_s: float = 60.0  # how long stopping waits for workers to finish their jobs
    callback_base: str | None = None  # where workers reach the server, if not where it listens (a container)
    restart_delay_s: tuple[float, float] = (1.0, 30.0)  # first and longest delay for a worker dying at start


@dataclass
class WorkerProcess:
    id: str
    slot: int
    process: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.monotonic)


class WorkerPool:
    """Starts, watches, replaces and stops the workers; `start` and everything after on the
    server's event loop."""

    def __init__(self, settings: PoolSettings, platform: Platform, worker_key: str) -> None:
        self.settings = settings
        self.platform = platform
        self.worker_key = worker_key
        self.workers: dict[str, WorkerProcess] = {}  # the live ones
        self.exits: list[tuple[str, int]] = []  # (worker id, exit code) of every worker that ended
        self._base_url = ""
        self._stopping = False
        self._deaths_at_start = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, callback_base: str, endpoint_id: str = "local") -> None:
        """Start the workers; they call back to `callback_base` (this server, as they reach it)."""
        self._base_url = f"{callback_base.rstrip('/')}/v2/{endpoint_id}"
        for slot in range(self.settings.workers):
            await self._spawn(slot)

    def terminate(self, worker_id: str) -> None:
        """Stop a worker the way RunPod scales one down: no more jobs for it, then SIGTERM; the SDK
        finishes and posts the jobs it holds, then exits (and a fresh worker takes its place)."""
        self.platform.drain(worker_id)
        worker = self.workers.get(worker_id)
        if worker is not None and worker.process.returncode is None:
            worker.process.send_signal(signal.SIGTERM)

    def kill(self, worker_id: str) -> None:
        """SIGKILL the worker's whole process group: a crash, its jobs in flight die with it."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            self._kill_group(worker)

    async def stop(self) -> None:
        self._stopping = True
        alive = list(self.workers.values())
        for worker in alive:
            self.terminate(worker.id)
        waits = [asyncio.ensure_future(worker.process.wait()) for worker in alive]
        if waits:
            _, late = await asyncio.wait(waits, timeout=self.settings.drain_timeout_s)
            if late:
                log.warning("%d worker(s) still busy after %.0f s: killing them",
                            len(late), self.settings.drain_timeout_s)
            for worker in alive:
                self._kill_group(worker)
            await asyncio.gather(*waits, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in list(self.workers.values()):  # a replacement that was starting when stop began
            self._kill_group(worker)

    def details(self) -> list[dict[str, Any]]:
        """Per live worker: id, pid, state, jobs held, resident memory (what /health shows locally)."""
        rows = []
        for worker in self.workers.values():
            seat = self.platform.seat(worker.id)
            rows.append({"id": worker.id, "pid": worker.process.pid, "state": seat.state, "jobs": len(seat.held),
                         "rss_mb": _rss_mb(worker.process.pid),
                         "uptime_s": round(time.monotonic() - worker.started_at, 1)})
        return rows

    def _environment(self, worker_id: str) -> dict[str, str]:
        base = self._base_url
        env = {**os.environ, **self.settings.env}
        # The SDK's own system checks include a TCP connection to 8.8.8.8, which an offline
        # machine fails (the worker would exit at start); RunPod's machines pass them.
        env.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
        env.setdefault("RUNPOD_LOG_LEVEL", "INFO")  # the SDK's DEBUG default logs whole outputs
        env.update({
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=local",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=local",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=local",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_AI_API_KEY": self.worker_key,
            "RUNPOD_PING_INTERVAL": str(self.settings.ping_interval_ms),
        })
        return env

    async def _spawn(self, slot: int) -> None:
        worker_id = f"local-{slot}-{secrets.token_hex(4)}"
        log_dir = self.settings.log_dir
        log_file = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            log_file = (log_dir / f"{worker_id}.log").open("wb")
        try:
            process = await asyncio.create_subprocess_exec(
                *self.settings.command, cwd=REPO_ROOT, env=self._environment(worker_id),
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()  # the worker has its own descriptor
        self.platform.seat(worker_id)  # "initializing" until it asks for a job
        worker = WorkerProcess(worker_id, slot, process)
        self.workers[worker_id] = worker
        log.info("worker %s started (pid %d)", worker_id, process.pid)
        task = asyncio.create_task(self._watch(worker), name=f"watch-{worker_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, worker: WorkerProcess) -> None:
        code = await worker.process.wait()
        self._kill_group(worker)  # whatever it left behind (the SDK's ping process)
        self.workers.pop(worker.id, None)
        self.exits.append((worker.id, code))
        ready = self.platform.seat(worker.id).polled
        self.platform.worker_exited(worker.id)
        log.info("worker %s exited with code %d", worker.id, code)
        if self._stopping:
            return
        self._deaths_at_start = 0 if ready else self._deaths_at_start + 1
        if self._deaths_at_start:
            first, longest = self.settings.restart_delay_s
            delay = min(longest, first * 2 ** (self._deaths_at_start - 1))
            log.warning("worker %s died before asking for a job: next one in %.0f s", worker.id, delay)
            await asyncio.sleep(delay)
        if not self._stopping:
            await self._spawn(worker.slot)

    @staticmethod
    def _kill_group(worker: WorkerProcess) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.process.pid, signal.SIGKILL)


def _rss_mb(pid: int) -> float | None:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except psutil.Error:
        return None
