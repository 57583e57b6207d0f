"""Faults through the real loop: a worker process (the fake worker under the runpod SDK's loop)
reaches the job server through a fault-injecting proxy; workers are stopped and killed the way
RunPod and crashes do it. Every job ends once, as the platform documents, never silently lost."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from endpoint.app import ServerSettings
from endpoint.background import BackgroundEndpoint
from tests.conftest import API_KEY, fake_workers
from tests.endpoint.fault_proxy import Fault, FaultProxy
from tests.endpoint.http import Api, exit_code, images_of

JOB = {"prompt": "p", "num_images": 3, "delay_s": 0.3}


@pytest.fixture(scope="module")
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def endpoint(proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundEndpoint]:
    """One worker, calling back through the proxy (this module's `endpoint`: the shared
    idle-at-start guard of tests/conftest.py applies)."""
    pool = fake_workers(tmp_path_factory.mktemp("workers"), callback_base=proxy.url, drain_timeout_s=30)
    with BackgroundEndpoint(ServerSettings(api_key=API_KEY), pool) as server:
        proxy.set_target(server.endpoint.callback_base)
        server.wait_for_workers(1)
        yield server


@pytest.fixture(autouse=True)
def disarmed(proxy: FaultProxy) -> Iterator[None]:
    yield
    proxy.faults.clear()


def the_worker(server: BackgroundEndpoint, not_this: str | None = None, timeout_s: float = 60) -> str:
    """The one worker ready to take jobs (once a replacement for `not_this` is)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ready = [w["id"] for w in server.on_loop(server.pool.details)
                 if w["state"] in ("idle", "running") and w["id"] != not_this]
        if len(ready) == 1:
            return ready[0]
        assert time.monotonic() < deadline, server.on_loop(server.pool.details)
        time.sleep(0.05)


@pytest.mark.parametrize("forward_first", [False, True], ids=["lost-before-the-server", "lost-after-the-server"])
def test_a_result_post_answered_500_once_is_recorded_once(
    endpoint: BackgroundEndpoint, proxy: FaultProxy, forward_first: bool
) -> None:
    api = Api(endpoint)
    before = api.call("GET", "health").json()
    proxy.arm(Fault("job-done", status=500, forward_first=forward_first))
    job_id = api.submit(JOB)
    final = api.wait(job_id, timeout_s=30)
    assert final["status"] == "COMPLETED" and sorted(images_of(final["output"])) == [0, 1, 2]
    assert [post.status for post in proxy.results_of(job_id, 2)] == [500, 200]  # the SDK retried the result
    after = api.call("GET", "health").json()
    assert after["jobs"]["completed"] - before["jobs"]["completed"] == 1
    duplicates = after["local"]["duplicateResults"] - before["local"]["duplicateResults"]
    assert duplicates == (1 if forward_first else 0)  # the second post of a recorded result is dropped
    assert final == api.status(job_id)


def test_a_slow_result_answer_is_recorded_once(endpoint: BackgroundEndpoint, proxy: FaultProxy) -> None:
    api = Api(endpoint)
    before = api.call("GET", "health").json()
    proxy.arm(Fault("job-done", delay_s=2.0))
    job_id = api.submit(JOB)
    assert api.wait(job_id, timeout_s=30)["status"] == "COMPLETED"
    after = api.call("GET", "health").json()
    assert after["jobs"]["completed"] - before["jobs"]["completed"] == 1
    assert after["local"]["duplicateResults"] == before["local"]["duplicateResults"]
    next_id = api.submit({**JOB, "num_images": 1})  # the worker goes on
    assert api.wait(next_id, timeout_s=30)["status"] == "COMPLETED"


def test_a_take_answered_429_backs_off_and_goes_on(endpoint: BackgroundEndpoint, proxy: FaultProxy) -> None:
    """The SDK sleeps 5 s after a 429 on job-take, then takes again."""
    api = Api(endpoint)
    worker_id = the_worker(endpoint)
    proxy.arm(Fault("job-take", status=429))  # the poll open now is already past the proxy: the next one
    first = api.submit({**JOB, "num_images": 1})
    assert api.wait(first, timeout_s=30)["status"] == "COMPLETED"
    deadline = time.monotonic() + 30
    while not (refused := [s for s in list(proxy.seen) if s.route.startswith("job-take") and s.status == 429]):
        assert time.monotonic() < deadline, "no take was refused"
        time.sleep(0.05)
    second = api.submit({**JOB, "num_images": 1})
    final = api.wait(second, timeout_s=30)
    assert (final["status"], final["workerId"]) == ("COMPLETED", worker_id)  # the same worker went on
    assert len(refused) == 1 and refused[0].worker_id == worker_id
    assert any(s.route.startswith("job-take") and s.status == 200 and s.at > refused[0].at for s in proxy.seen)


def test_sigterm_lets_the_job_in_flight_finish_and_post_before_exit(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    worker_id = the_worker(endpoint)
    job_id = api.submit({**JOB, "num_images": 4})
    api.wait_for_status(job_id, "IN_PROGRESS")
    endpoint.on_loop(lambda: endpoint.pool.terminate(worker_id))  # RunPod scaling the worker down
    final = api.wait(job_id, timeout_s=30)
    assert (final["status"], final["workerId"]) == ("COMPLETED", worker_id)
    assert sorted(images_of(final["output"])) == [0, 1, 2, 3]
    assert exit_code(endpoint, worker_id) == 0  # it drained and exited cleanly
    the_worker(endpoint, not_this=worker_id)  # and a fresh one took its place
    assert api.wait(api.submit({**JOB, "num_images": 1}), timeout_s=60)["status"] == "COMPLETED"


def test_a_killed_worker_times_its_job_out_then_retry_completes_it(endpoint: BackgroundEndpoint) -> None:
    """SIGKILL mid-job: as RunPod documents, the job the worker never reported on ends TIMED_OUT at
    its execution timeout (5 s, RunPod's minimum), and /retry runs it again on the new worker."""
    api = Api(endpoint)
    worker_id = the_worker(endpoint)
    job_id = api.submit({**JOB, "num_images": 6, "delay_s": 0.4}, policy={"executionTimeout": 5000})
    assert api.wait_for_status(job_id, "IN_PROGRESS")["workerId"] == worker_id
    deadline = time.monotonic() + 10
    while "output" not in api.status(job_id):  # an image made: it is mid-job
        assert time.monotonic() < deadline
        time.sleep(0.02)
    endpoint.on_loop(lambda: endpoint.pool.kill(worker_id))
    assert api.status(job_id)["status"] == "IN_PROGRESS"
    timed_out = api.wait(job_id, timeout_s=30)
    assert (timed_out["status"], timed_out["error"]) == ("TIMED_OUT", "execution timeout exceeded")
    new_worker = the_worker(endpoint, not_this=worker_id)
    assert exit_code(endpoint, worker_id) == -9
    assert api.call("POST", f"retry/{job_id}").json()["status"] == "IN_QUEUE"
    final = api.wait(job_id, timeout_s=30)
    assert (final["status"], final["workerId"]) == ("COMPLETED", new_worker)
    assert sorted(images_of(final["output"])) == list(range(6))
