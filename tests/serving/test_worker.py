"""The worker's own duties: a bug while planning fails only that job, and a broken GPU reaches the
handler through the explicit `on_fatal` callback."""

from __future__ import annotations

import asyncio

import serving.worker as worker_module
from serving.local_run import collect
from serving.startup import LoadedEngines
from serving.worker import Worker
from tests.conftest import SMALL


def _worker(handler_module, **kwargs) -> Worker:
    served = handler_module.WORKER
    return Worker(served.settings, LoadedEngines(served.engine, None, "off"), **kwargs)


def test_a_bug_while_planning_is_that_jobs_internal_error(handler_module, monkeypatch):
    async def broken(*args, **kwargs):
        raise KeyError("secret-internal-detail")

    monkeypatch.setattr(worker_module, "plan_job", broken)
    worker = _worker(handler_module)
    result = asyncio.run(collect(worker.run_job, {"id": "b", "input": {"prompt": "x", **SMALL}}))
    assert result == {"error": "internal_error: KeyError while preparing the job"}


def test_a_fatal_device_error_calls_on_fatal_and_fails_the_call(handler_module, monkeypatch):
    calls = []
    worker = _worker(handler_module, on_fatal=lambda: calls.append(1))

    def broken_step(rows):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(worker.engine, "step", broken_step)
    result = asyncio.run(collect(worker.run_job, {"id": "f", "input": {"prompt": "x", "num_images": 2, **SMALL}}))
    assert calls == [1]
    assert [error["code"] for error in result["errors"]] == ["device_failure", "device_failure"]
