"""The local endpoint over real HTTP: statuses, shapes, limits, concurrency, cancel, progress.

The module shares one endpoint whose worker is a real process running the fake worker under the
runpod SDK's loop (tests/conftest.py `endpoint`); tests of server settings start their own,
without workers where none is needed."""

from __future__ import annotations

import json
import re
import time
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from endpoint.background import BackgroundEndpoint
from endpoint.worker_api import WorkerApiSettings
from tests.conftest import API_KEY, EndpointFactory
from tests.endpoint.fake_worker import CONCURRENCY
from tests.endpoint.http import Api, images_of
from tests.endpoint.protocol import ProtocolWorker


@pytest.mark.parametrize("key", [None, "wrong"])
def test_wrong_or_missing_key_is_401(endpoint: BackgroundEndpoint, key: str | None) -> None:
    api = Api(endpoint, key=key)
    for method, path in [("POST", "run"), ("GET", "health"), ("GET", "status/x")]:
        response = api.call(method, path, {"input": {"prompt": "p"}})
        assert response.status_code == 401, path
        assert "error" in response.json()


def test_no_key_configured_means_open(start_endpoint: EndpointFactory) -> None:
    api = Api(start_endpoint(workers=0, api_key=None), key=None)
    assert api.call("GET", "health").status_code == 200


def test_runsync_returns_aggregate_output_and_timings(endpoint: BackgroundEndpoint) -> None:
    body = Api(endpoint).call("POST", "runsync", {"input": {"prompt": "p", "num_images": 3}}).json()
    assert body["status"] == "COMPLETED"
    assert set(body) >= {"id", "status", "delayTime", "executionTime", "workerId", "output"}
    assert images_of(body["output"]) == [0, 1, 2]
    assert "summary" in body["output"][-1]
    assert body["executionTime"] >= 3 * 20 * 0.9  # three images of 20 ms each


def test_runsync_wait_expiry_returns_the_running_job(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    response = api.call("POST", "runsync?wait=1000", {"input": {"prompt": "p", "num_images": 2, "delay_s": 0.6}})
    body = response.json()
    assert body == {"id": body["id"], "status": "IN_PROGRESS"}
    assert images_of(api.wait(body["id"])["output"]) == [0, 1]


def test_bad_input_chunk_fails_the_job_with_its_message(endpoint: BackgroundEndpoint) -> None:
    body = Api(endpoint).call("POST", "runsync", {"input": {"prompt": "p", "width": 100}}).json()
    assert body["status"] == "FAILED"
    assert body["error"] == "invalid_input: width: multiple of 16 in 16..2048"
    assert "output" not in body


def test_handler_exception_fails_the_job_after_streaming_what_it_made(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    job_id = api.submit({"prompt": "p", "num_images": 3, "fault": "raise"})
    final = api.wait(job_id)
    assert final["status"] == "FAILED"
    assert final["error"].startswith("handler: fixture fault")
    stream = api.call("GET", f"stream/{job_id}").json()
    assert images_of([c["output"] for c in stream["stream"]]) == [0]


def test_stream_returns_each_chunk_once_while_running(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    job_id = api.submit({"prompt": "p", "num_images": 4, "delay_s": 0.15})
    seen, statuses = [], []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        body = api.call("GET", f"stream/{job_id}").json()
        statuses.append(body["status"])
        seen.extend(chunk["output"] for chunk in body["stream"])
        if body["status"] == "COMPLETED" and not body["stream"]:
            break
        time.sleep(0.05)
    assert images_of(seen) == [0, 1, 2, 3]
    assert "summary" in seen[-1]
    assert seen == api.status(job_id)["output"]
    assert "IN_PROGRESS" in statuses  # chunks came while it ran, not only at the end


def test_status_shows_latest_progress_while_running(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    job_id = api.submit({"prompt": "p", "num_images": 3, "delay_s": 0.4})
    api.wait_for_status(job_id, "IN_PROGRESS")
    deadline = time.monotonic() + 5
    while (body := api.status(job_id)).get("output") is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert body["status"] == "IN_PROGRESS"
    assert body["output"]["total"] == 3 and 1 <= body["output"]["completed"] <= 3
    assert isinstance(api.wait(job_id)["output"], list)  # progress gives way to the result


def test_concurrency_comes_from_the_handler_module(endpoint: BackgroundEndpoint) -> None:
    """The SDK asks the module's concurrency_modifier how many jobs to hold."""
    api = Api(endpoint)
    before = api.call("GET", "health").json()["jobs"]
    ids = [api.submit({"prompt": "p", "num_images": 1, "delay_s": 1.5}) for _ in range(CONCURRENCY + 2)]
    api.wait_for_status(ids[CONCURRENCY - 1], "IN_PROGRESS")
    health = api.call("GET", "health").json()
    assert health["jobs"]["inProgress"] == CONCURRENCY
    assert health["jobs"]["inQueue"] == 2
    assert health["workers"] == {"idle": 0, "running": 1}
    assert api.status(ids[-1])["status"] == "IN_QUEUE"
    finals = [api.wait(job_id) for job_id in ids]
    assert all(f["status"] == "COMPLETED" for f in finals)
    assert max(f["delayTime"] for f in finals) >= 1000  # the last two waited for a slot
    health = api.call("GET", "health").json()
    assert health["jobs"]["completed"] - before["completed"] == len(ids)
    assert (health["jobs"]["inProgress"], health["jobs"]["inQueue"]) == (0, 0)


def test_cancel_running_and_queued_jobs(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    ids = [api.submit({"prompt": "p", "num_images": 5, "delay_s": 1.0}) for _ in range(CONCURRENCY + 1)]
    api.wait_for_status(ids[0], "IN_PROGRESS")
    queued = ids[-1]
    assert api.status(queued)["status"] == "IN_QUEUE"
    for job_id in (queued, ids[0]):  # the queued one first, or the freed slot would start it
        assert api.call("POST", f"cancel/{job_id}").json() == {"id": job_id, "status": "CANCELLED"}
    assert api.status(queued).get("workerId") is None  # it never started
    assert api.status(ids[0])["status"] == "CANCELLED"
    assert "output" not in api.status(ids[0])
    assert api.status(ids[1])["status"] == "IN_PROGRESS"  # the others go on
    for job_id in ids[1:-1]:
        api.call("POST", f"cancel/{job_id}")
    assert api.call("GET", "health").json()["jobs"]["inProgress"] == 0


def test_execution_timeout_policy(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    body = api.call("POST", "runsync", {"input": {"prompt": "p", "num_images": 3, "delay_s": 1.0},
                                        "policy": {"executionTimeout": 300}}).json()
    assert body["status"] == "TIMED_OUT"
    assert body["executionTime"] >= 250  # not before its 300 ms limit (no upper bound: a slow machine is late)
    bad = api.call("POST", "run", {"input": {}, "policy": {"executionTimeout": "soon"}})
    assert bad.status_code == 400


def test_payload_limits_per_route(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    big = {"input": {"prompt": "x" * 11_000_000}}
    too_big = api.call("POST", "run", big)
    assert too_big.status_code == 413 and "payload too large" in too_big.json()["error"]
    assert api.call("POST", "runsync?wait=1000", big).status_code == 200  # 20 MB limit there
    assert api.call("POST", "runsync", {"input": {"prompt": "x" * 21_000_000}}).status_code == 413


def test_request_errors(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    assert api.call("POST", "run", {"prompt": "no input field"}).status_code == 400
    assert api.call("POST", "run", data=b"{not json").status_code == 400
    missing = api.call("GET", "status/nope")
    assert missing.status_code == 404 and missing.json() == {"error": "request does not exist"}


def test_results_are_forgotten_after_retention(start_endpoint: EndpointFactory) -> None:
    server = start_endpoint(workers=0, retention_s=0.3)
    api, worker = Api(server), ProtocolWorker(server)
    job_id = api.submit({"prompt": "p"})
    worker.take()
    worker.done(job_id, {"output": []})
    assert api.status(job_id)["status"] == "COMPLETED"
    time.sleep(0.4)
    assert api.call("GET", f"status/{job_id}").status_code == 404


def test_queue_is_bounded(start_endpoint: EndpointFactory) -> None:
    api = Api(start_endpoint(workers=0, max_queued=1))  # no worker: the first job stays queued
    api.submit({"prompt": "p"})
    response = api.call("POST", "run", {"input": {"prompt": "p"}})
    assert response.status_code == 429 and "queue full" in response.json()["error"]


@pytest.mark.parametrize("body", [
    b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # json.loads would raise RecursionError
    b'{"input": {"prompt": NaN}}',
    b'{"input": {"steps": 1e999}}',  # a float out of range: Python would make it infinity
    b'{"input": {"seed": 1' + b"0" * 5000 + b"}}",  # an integer longer than Python parses
    b'{"input": {}, "s3Config": "bucket"}',
    b'{"input": {}, "s3Config": []}',
    b"\xff\xfe{}",
])
def test_malformed_bodies_are_400(endpoint: BackgroundEndpoint, body: bytes) -> None:
    response = Api(endpoint).call("POST", "run", data=body)
    assert response.status_code == 400 and response.json()["error"]


def test_huge_execution_timeout_is_clamped(endpoint: BackgroundEndpoint) -> None:
    body = b'{"input": {"prompt": "p"}, "policy": {"executionTimeout": 1' + b"0" * 400 + b"}}"  # overflows a float
    response = Api(endpoint).call("POST", "runsync", data=body)
    assert response.status_code == 200 and response.json()["status"] == "COMPLETED"


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe", b"Bearer t\xc3\xa9st-key", b"\xe2\x82\xac"])
def test_non_ascii_authorization_is_401(endpoint: BackgroundEndpoint, value: bytes) -> None:
    response = Api(endpoint, key=None).call("GET", "health", headers={"Authorization": value})
    assert response.status_code == 401


def test_bare_key_is_accepted_as_runpod_examples_send_it(endpoint: BackgroundEndpoint) -> None:
    assert Api(endpoint, key=None).call("GET", "health", headers={"Authorization": API_KEY}).status_code == 200


def test_s3_config_reaches_the_worker_as_runpod_passes_it(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    s3 = {"accessId": "a", "accessSecret": "s", "bucketName": "b", "endpointUrl": "https://s3.example.com"}
    body = api.call("POST", "runsync", {"input": {"prompt": "p"}, "s3Config": s3}).json()
    summary = body["output"][-1]["summary"]  # the fake worker echoes what its job held
    assert (summary["s3Config"], summary["job_keys"]) == (s3, ["id", "input", "s3Config"])
    assert "accessSecret" not in json.dumps({k: v for k, v in body.items() if k != "output"})
    for absent in ({"input": {"prompt": "p"}}, {"input": {"prompt": "p"}, "s3Config": None}):
        summary = api.call("POST", "runsync", absent).json()["output"][-1]["summary"]
        assert (summary["s3Config"], summary["job_keys"]) == (None, ["id", "input"])


def test_retry_requeues_a_failed_job_under_its_id_and_input(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    retried = api.call("GET", "health").json()["jobs"]["retried"]
    job_input = {"prompt": "p", "num_images": 2, "fault": "fail_first_attempt"}
    job_id = api.submit(job_input)
    failed = api.wait(job_id)
    assert (failed["status"], failed["error"]) == ("FAILED", "fixture: first attempt fails")
    assert api.call("POST", f"retry/{job_id}").json() == {"id": job_id, "status": "IN_QUEUE"}
    final = api.wait(job_id)
    assert (final["status"], "error" in final) == ("COMPLETED", False)
    assert images_of(final["output"]) == [0, 1]
    assert api.call("GET", "health").json()["jobs"]["retried"] == retried + 1
    done = api.call("POST", f"retry/{job_id}")  # COMPLETED: RunPod retries FAILED and TIMED_OUT only
    assert done.status_code == 400 and "COMPLETED" in done.json()["error"]
    assert api.call("POST", "retry/nope").status_code == 404


def test_retry_a_timed_out_job(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    body = api.call(
        "POST", "runsync", {"input": {"prompt": "p", "delay_s": 0.4}, "policy": {"executionTimeout": 200}}
    ).json()
    assert body["status"] == "TIMED_OUT"
    api.call("POST", f"retry/{body['id']}")
    assert api.wait(body["id"])["status"] == "TIMED_OUT"  # same input, same policy


def test_purge_queue_cancels_queued_jobs_only(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    ids = [api.submit({"prompt": "p", "num_images": 2, "delay_s": 1.5}) for _ in range(CONCURRENCY + 3)]
    api.wait_for_status(ids[CONCURRENCY - 1], "IN_PROGRESS")
    assert api.call("POST", "purge-queue").json() == {"removed": 3, "status": "completed"}
    assert [api.status(job_id)["status"] for job_id in ids[CONCURRENCY:]] == ["CANCELLED"] * 3
    assert all(api.wait(job_id)["status"] == "COMPLETED" for job_id in ids[:CONCURRENCY])
    assert api.call("POST", "purge-queue").json() == {"removed": 0, "status": "completed"}


ROUTES = ["run", "runsync", "status/{id}", "stream/{id}", "cancel/{id}", "retry/{id}", "purge-queue", "health",
          "job-take/{id}", "job-take-batch/{id}", "job-done/w/{id}", "job-stream/w/{id}", "job-stop/{id}", "ping/{id}"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
top_level = st.fixed_dictionaries({}, optional={
    "input": json_values, "policy": json_values | st.fixed_dictionaries({"executionTimeout": json_values}),
    "s3Config": json_values, "webhook": json_values | st.just("http://127.0.0.1:9/hook"),
})
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    top_level.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda depth: b'{"input": ' + b"[" * depth + b"]" * depth + b"}"),
)
# what a client can send at all: no CR/LF, no leading whitespace (requests refuses those itself)
header_bytes = st.binary(max_size=40).filter(lambda b: re.fullmatch(rb"(\S[^\r\n]*)?", b) is not None)


def test_fuzzed_requests_never_get_a_5xx(start_endpoint: EndpointFactory) -> None:
    """Odd methods, paths, ids, query strings, headers and bodies, on the client and the worker
    routes: always a 2xx-4xx answer."""
    server = start_endpoint(workers=0, runsync_wait_bounds_ms=(1000, 1000),
                            worker_api=WorkerApiSettings(hold_s=0.05))
    api = Api(server)
    worker_key = server.endpoint.settings.worker_key
    known_id = api.submit({"prompt": ""})

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
        route=st.sampled_from(ROUTES) | st.text(min_size=1, max_size=30),
        job_id=st.just(known_id) | st.text(max_size=30),
        query=st.dictionaries(st.sampled_from(["wait", "ttl", "x"]), st.text(max_size=12), max_size=2),
        auth=st.just(f"Bearer {API_KEY}".encode()) | st.just(worker_key.encode()) | header_bytes,
        content_type=st.none() | header_bytes,
        body=st.none() | bodies,
    )
    def check(method: str, route: str, job_id: str, query: dict, auth: bytes, content_type: bytes | None,
              body: bytes | None) -> None:
        headers = {"Authorization": auth} | ({"Content-Type": content_type} if content_type is not None else {})
        path = route.replace("{id}", quote(job_id, safe="")) if "{id}" in route else quote(route)
        response = api.call(method, path, headers=headers, params=query, data=body)
        assert response.status_code < 500, (response.status_code, response.text[:300])

    check()
