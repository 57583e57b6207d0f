"""A plain (non-generator) handler under the runpod SDK's loop: what reaches the platform for a
returned value, a returned `error`, an exception and `refresh_worker`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from endpoint.background import BackgroundEndpoint
from endpoint.pool import PoolSettings, worker_command
from tests.conftest import running_endpoint
from tests.endpoint.http import Api


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundEndpoint]:
    pool = PoolSettings(command=worker_command("tests.endpoint.plain_worker:handler"),
                        log_dir=Path(tmp_path_factory.mktemp("plain-workers")))
    with running_endpoint(pool) as server:
        yield server


def test_returned_values_are_the_output(plain: BackgroundEndpoint) -> None:
    api = Api(plain)
    for value in ([1, 2], {"a": 1}, "text"):
        body = api.call("POST", "runsync", {"input": {"value": value}}).json()
        assert (body["status"], body["output"]) == ("COMPLETED", value)


def test_a_returned_error_fails_the_job_and_keeps_the_rest(plain: BackgroundEndpoint) -> None:
    body = Api(plain).call("POST", "runsync", {"input": {"action": "error", "value": 1}}).json()
    assert (body["status"], body["error"], body["output"]) == ("FAILED", "nope", {"echo": 1})


def test_an_exception_fails_the_job_with_the_sdks_error_info(plain: BackgroundEndpoint) -> None:
    body = Api(plain).call("POST", "runsync", {"input": {"action": "raise"}}).json()
    assert body["status"] == "FAILED"
    assert '"error_message": "boom"' in body["error"]


def test_refresh_worker_replaces_the_worker_after_its_job(plain: BackgroundEndpoint) -> None:
    """A plain handler's `refresh_worker` reaches the platform as stopPod: the platform stops that
    worker (the SDK alone would not) and a fresh one serves the next job."""
    api = Api(plain)
    body = api.call("POST", "runsync", {"input": {"action": "refresh", "value": 2}}).json()
    assert (body["status"], body["output"]) == ("COMPLETED", {"echo": 2})  # the flag itself is popped
    after = api.wait(api.submit({"value": 3}), timeout_s=60)  # queued until the fresh worker asks for it
    assert (after["status"], after["output"]) == ("COMPLETED", 3)
    assert after["workerId"] != body["workerId"]
    assert (body["workerId"], 0) in plain.pool.exits  # it drained and exited cleanly
