"""Shared fixtures: the real handler on the embedded demo model, driven in-process, and the local
endpoint (a job server on 127.0.0.1 at an ephemeral port, with fake-worker processes)."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from endpoint.app import ServerSettings
from endpoint.background import BackgroundEndpoint
from endpoint.pool import PoolSettings, worker_command

ROOT = Path(__file__).resolve().parent.parent

SMALL = {"width": 64, "height": 64, "steps": 2, "output_format": "png"}  # lossless: tests compare pixels


@pytest.fixture(scope="session")
def handler_module():
    import handler

    return handler


def run_job(handler_module, job_input: dict[str, Any], job_id: str = "test") -> dict[str, Any]:
    """What /runsync returns, merged into one result dict (or {"error": ...})."""
    from serving.local_run import collect

    return asyncio.run(collect(handler_module.handler, {"id": job_id, "input": job_input}))


def pixels(image_entry: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_entry["base64"]))).convert("RGB"))


def force_parsing_label(parser, label: int) -> None:
    """Make a BiSeNet face parser vote for ``label`` everywhere: its classifier's features are
    >= 1 after the ReLU and only that class's weights are non-zero."""
    import torch

    head = parser.conv_out
    with torch.no_grad():
        head.conv.bn.bias.fill_(1.0)
        head.conv_out.weight.zero_()
        head.conv_out.weight[label] = 1.0


def assert_regenerates(batched: np.ndarray, alone: np.ndarray) -> None:
    """The same image computed twice (again, alone instead of batched, by diffusers' own pipeline)
    is equal up to float rounding, which differs between CPUs and batch shapes: at most one level
    on under 1 % of values. Never compare float-derived pixels bitwise."""
    difference = np.abs(batched.astype(int) - alone.astype(int))
    assert difference.max() <= 1, difference.max()
    assert (difference > 0).mean() < 0.01


def assert_differs(a: np.ndarray, b: np.ndarray) -> None:
    """Two really different images (another seed, workflow or identity), not a rounding difference:
    more than one level apart on average."""
    assert np.abs(a.astype(float) - b.astype(float)).mean() > 1.0


# -- the local endpoint ------------------------------------------------------------------------

FAKE_WORKER = "tests.endpoint.fake_worker:handler"
API_KEY = "test-key"
EndpointFactory = Callable[..., BackgroundEndpoint]


def fake_workers(log_dir: Path, workers: int = 1, **overrides: Any) -> PoolSettings:
    """Worker processes running the fake worker under the runpod SDK's loop (~2 s to start)."""
    return PoolSettings(command=worker_command(FAKE_WORKER), workers=workers, log_dir=log_dir, **overrides)


@contextmanager
def running_endpoint(pool: PoolSettings | None, **settings: Any) -> Iterator[BackgroundEndpoint]:
    """A local endpoint on 127.0.0.1, its workers ready to take jobs; stopped on exit."""
    settings.setdefault("api_key", API_KEY)
    with BackgroundEndpoint(ServerSettings(**settings), pool) as server:
        if pool is not None:
            server.wait_for_workers(pool.workers)
        yield server


@pytest.fixture(scope="session")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundEndpoint]:
    """One fake-worker endpoint for the session (a worker process takes ~2 s to start); each test
    starts with it idle (`idle_endpoint`). A module may define its own `endpoint`."""
    with running_endpoint(fake_workers(tmp_path_factory.mktemp("workers"))) as server:
        yield server


@pytest.fixture(autouse=True)
def idle_endpoint(request: pytest.FixtureRequest) -> None:
    """A test on a module's shared endpoint starts with nothing queued or running: whatever an
    earlier test left (it failed midway) is cancelled, so no test depends on another."""
    if "endpoint" not in request.fixturenames:
        return
    server = request.getfixturevalue("endpoint")
    if not isinstance(server, BackgroundEndpoint):  # a test's own argument of that name
        return

    def cancel_leftovers() -> None:
        platform = server.platform
        platform.purge()
        for seat in platform.workers.values():
            for job_id in list(seat.held):
                platform.cancel(platform.store.get(job_id))

    server.on_loop(cancel_leftovers)


@pytest.fixture
def start_endpoint(tmp_path: Path) -> Iterator[EndpointFactory]:
    """Endpoints with their own settings, stopped after the test; `workers=0` starts none (for
    tests that speak the worker protocol themselves, tests/endpoint/protocol.py)."""
    with ExitStack() as stack:
        def start(workers: int = 1, **settings: Any) -> BackgroundEndpoint:
            pool = fake_workers(tmp_path / "workers", workers) if workers else None
            return stack.enter_context(running_endpoint(pool, **settings))

        yield start
