"""The job server's worker side, spoken over raw HTTP as the runpod SDK speaks it (no worker
process here: tests/endpoint/test_real_loop.py and test_faults.py run the SDK itself)."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from endpoint.worker_api import WorkerApiSettings
from tests.conftest import EndpointFactory
from tests.endpoint.http import Api
from tests.endpoint.protocol import ProtocolWorker

SHORT_HOLD = WorkerApiSettings(hold_s=0.3)


@pytest.fixture
def server(start_endpoint: EndpointFactory):
    return start_endpoint(workers=0, worker_api=SHORT_HOLD)


def test_a_job_goes_from_take_through_stream_to_done(server) -> None:
    api, worker = Api(server), ProtocolWorker(server)
    s3 = {"bucketName": "b", "accessId": "a", "accessSecret": "s", "endpointUrl": "https://s3.example.com"}
    job_id = api.submit({"prompt": "p"}, s3Config=s3)
    assert api.status(job_id)["status"] == "IN_QUEUE"
    [job] = worker.take()
    assert job == {"id": job_id, "input": {"prompt": "p"}, "s3Config": s3}  # what RunPod hands a worker
    running = api.status(job_id)
    assert (running["status"], running["workerId"]) == ("IN_PROGRESS", "w-test")
    assert api.call("GET", "health").json()["workers"] == {"idle": 0, "running": 1}
    chunks = [{"image": {"index": 0}}, {"summary": {}}]
    for chunk in chunks:
        assert worker.stream(job_id, chunk).status_code == 200
    assert api.call("GET", f"stream/{job_id}").json() == {"status": "IN_PROGRESS",
                                                          "stream": [{"output": c} for c in chunks]}
    assert worker.done(job_id, {"output": chunks}).status_code == 200
    final = api.status(job_id)
    assert (final["status"], final["output"]) == ("COMPLETED", chunks)
    assert "s3Config" not in final
    assert api.call("GET", "health").json()["workers"] == {"idle": 1, "running": 0}


def test_batch_take_hands_out_at_most_batch_size_and_204_when_empty(server) -> None:
    api, worker = Api(server), ProtocolWorker(server)
    ids = [api.submit({"n": i}) for i in range(3)]
    assert [job["id"] for job in worker.take(batch_size=2)] == ids[:2]
    assert [job["id"] for job in worker.take(batch_size=5)] == ids[2:]
    assert worker.take(batch_size=2) == []  # after the hold
    assert worker.get(f"job-take-batch/{worker.worker_id}", batch_size=65).status_code == 400
    assert worker.get(f"job-take-batch/{worker.worker_id}", batch_size="x").status_code == 400


def test_a_waiting_take_gets_a_job_submitted_later(start_endpoint: EndpointFactory) -> None:
    server = start_endpoint(workers=0, worker_api=WorkerApiSettings(hold_s=10.0))
    api, worker = Api(server), ProtocolWorker(server)
    threading.Timer(0.2, api.submit, args=({"late": True},)).start()
    [job] = worker.take()  # answered when the job came, not after the 10 s hold
    assert job["input"] == {"late": True}


def test_a_worker_that_hangs_up_mid_poll_is_handed_nothing(start_endpoint: EndpointFactory) -> None:
    server = start_endpoint(workers=0, worker_api=WorkerApiSettings(hold_s=10.0))
    api, gone, waiting = Api(server), ProtocolWorker(server, "w-gone"), ProtocolWorker(server, "w-waiting")
    with pytest.raises(requests.Timeout):
        requests.get(f"{gone.base}/job-take/w-gone", params={"job_in_progress": 0}, headers=gone.headers, timeout=0.3)
    taken: list[list[dict]] = []
    thread = threading.Thread(target=lambda: taken.append(waiting.take()))
    thread.start()
    time.sleep(0.3)
    job_id = api.submit({"n": 1})
    thread.join(timeout=10)
    assert [[job["id"] for job in jobs] for jobs in taken] == [[job_id]]
    assert api.status(job_id)["workerId"] == "w-waiting"


def test_progress_shows_while_running_and_gives_way_to_the_result(server) -> None:
    api, worker = Api(server), ProtocolWorker(server)
    job_id = api.submit({})
    worker.take()
    worker.done(job_id, {"status": "IN_PROGRESS", "output": {"completed": 1, "total": 2}})
    assert api.status(job_id)["output"] == {"completed": 1, "total": 2}
    worker.done(job_id, {"output": ["a", "b"]})
    worker.done(job_id, {"status": "IN_PROGRESS", "output": {"completed": 2, "total": 2}})  # a late progress post
    assert api.status(job_id)["output"] == ["a", "b"]


def test_a_result_posted_twice_is_recorded_once(server) -> None:
    """The SDK retries a result POST that failed; the job ends once, with the first result."""
    api, worker = Api(server), ProtocolWorker(server)
    job_id = api.submit({})
    worker.take()
    assert worker.done(job_id, {"output": ["first"]}).status_code == 200
    assert worker.done(job_id, {"output": ["again"]}).status_code == 200  # acknowledged, dropped
    assert api.status(job_id)["output"] == ["first"]
    health = api.call("GET", "health").json()
    assert health["jobs"]["completed"] == 1
    assert health["local"]["duplicateResults"] == 1


def test_an_error_result_fails_the_job_and_keeps_its_output(server) -> None:
    api, worker = Api(server), ProtocolWorker(server)
    job_id = api.submit({})
    worker.take()
    worker.done(job_id, {"output": {"partial": 1}, "error": "invalid_input: prompt: required"})
    body = api.status(job_id)
    assert (body["status"], body["error"], body["output"]) == ("FAILED", "invalid_input: prompt: required",
                                                               {"partial": 1})


def test_cancel_signals_the_worker_and_its_later_posts_are_dropped(server) -> None:
    api, worker = Api(server), ProtocolWorker(server)
    job_id = api.submit({})
    worker.take()
    assert api.call("POST", f"cancel/{job_id}").json() == {"id": job_id, "status": "CANCELLED"}
    assert worker.stops() == [job_id]
    assert worker.stops() == []  # once
    worker.stream(job_id, {"image": {}})
    worker.done(job_id, {"output": ["late"]})
    body = api.status(job_id)
    assert body["status"] == "CANCELLED" and "output" not in body
    assert api.call("GET", f"stream/{job_id}").json()["stream"] == []


def test_a_ping_that_still_lists_a_stopped_job_gets_the_stop_again(server) -> None:
    """The SDK drops a stop for a job it took but has not started; its ping shows it still holds it."""
    api, worker = Api(server), ProtocolWorker(server)
    job_id, other = api.submit({}), api.submit({})
    worker.take(batch_size=2)
    api.call("POST", f"cancel/{job_id}")
    assert worker.stops() == [job_id]
    worker.get(f"ping/{worker.worker_id}", job_id=f"{job_id},{other}", runpod_version="1.12.0")
    assert worker.stops() == [job_id]  # again; the running one is left alone
    worker.get(f"ping/{worker.worker_id}", job_id=other, runpod_version="1.12.0")
    assert worker.stops() == []


def test_execution_timeout_ends_the_job_and_signals_the_worker(server) -> None:
    api, worker = Api(server), ProtocolWorker(server)
    job_id = api.submit({}, policy={"executionTimeout": 200})
    worker.take()
    body = api.wait(job_id)
    assert (body["status"], body["error"]) == ("TIMED_OUT", "execution timeout exceeded")
    assert worker.stops() == [job_id]


def test_a_worker_that_vanishes_leaves_its_job_to_time_out_then_retry_runs_it_again(server) -> None:
    api, first = Api(server), ProtocolWorker(server, "w-first")
    job_id = api.submit({"n": 1}, policy={"executionTimeout": 500})
    first.take()
    server.on_loop(lambda: server.platform.worker_exited("w-first"))
    assert api.status(job_id)["status"] == "IN_PROGRESS"  # RunPod does not know yet either
    assert api.wait(job_id)["status"] == "TIMED_OUT"
    assert api.call("POST", f"retry/{job_id}").json() == {"id": job_id, "status": "IN_QUEUE"}
    second = ProtocolWorker(server, "w-second")
    [job] = second.take()
    assert job == {"id": job_id, "input": {"n": 1}}
    first.done(job_id, {"output": ["stale"]})  # the old worker's post: it no longer holds the job
    second.done(job_id, {"output": ["fresh"]})
    body = api.status(job_id)
    assert (body["status"], body["output"], body["workerId"]) == ("COMPLETED", ["fresh"], "w-second")
    assert server.platform.store.get(job_id).takes == 2
    assert api.call("GET", "health").json()["jobs"]["retried"] == 1


def test_stop_pod_drains_the_worker(server) -> None:
    """`refresh_worker` → the result carries stopPod: that worker gets no more jobs."""
    api, worker = Api(server), ProtocolWorker(server)
    job_id = api.submit({})
    worker.take()
    api.submit({})
    worker.done(job_id, {"output": [], "stopPod": True})
    assert worker.take() == []
    assert worker.stops() == []  # answered at once: nothing left for it to stop
    assert ProtocolWorker(server, "w-fresh").take() != []


def test_worker_routes_take_the_worker_key_only(start_endpoint: EndpointFactory) -> None:
    server = start_endpoint(workers=0, worker_api=SHORT_HOLD, api_key="client-key")
    for key in ("client-key", "", f"Bearer {server.endpoint.settings.worker_key}x"):
        response = ProtocolWorker(server, key=key).get("job-take/w", job_in_progress=0)
        assert response.status_code == 401, key
    assert ProtocolWorker(server).get("ping/w", job_id="a,b").status_code == 200
    client_with_worker_key = Api(server, key=server.endpoint.settings.worker_key)
    assert client_with_worker_key.call("GET", "health").status_code == 401


def test_bad_worker_posts_are_400_and_change_nothing(server) -> None:
    api, worker = Api(server), ProtocolWorker(server)
    job_id = api.submit({})
    worker.take()
    for raw in (b"{not json", b"[1, 2]", b"\xff", b"[" * 100_000):
        response = requests.post(f"{worker.base}/job-done/{worker.worker_id}/{job_id}", data=raw,
                                 headers=worker.headers, timeout=10)
        assert response.status_code == 400, raw[:10]
    assert api.status(job_id)["status"] == "IN_PROGRESS"


def test_long_polls_end_when_the_server_stops(start_endpoint: EndpointFactory) -> None:
    server = start_endpoint(workers=0, worker_api=WorkerApiSettings(hold_s=60.0))
    worker = ProtocolWorker(server)
    answers: list[int] = []
    thread = threading.Thread(target=lambda: answers.append(worker.get("job-stop/w").status_code))
    thread.start()
    time.sleep(0.2)
    server.on_loop(server.platform.close)
    thread.join(timeout=10)
    assert answers == [204]
