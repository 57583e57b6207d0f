"""The official runpod client (runpod.Endpoint) works unchanged against the local endpoint (its
worker a process running the fake worker under the runpod SDK's loop)."""

from __future__ import annotations

import pytest
import requests
import runpod

from endpoint.background import BackgroundEndpoint
from tests.conftest import API_KEY
from tests.endpoint.fake_worker import CONCURRENCY
from tests.endpoint.http import ENDPOINT_ID, Api


@pytest.fixture
def client(endpoint: BackgroundEndpoint, monkeypatch: pytest.MonkeyPatch) -> runpod.Endpoint:
    # runpod reads RUNPOD_ENDPOINT_BASE_URL once, at import, into runpod.endpoint_url_base;
    # the client looks that attribute up when it is built.
    monkeypatch.setattr(runpod, "endpoint_url_base", endpoint.base_url)
    monkeypatch.setattr(runpod, "api_key", API_KEY)
    return runpod.Endpoint(ENDPOINT_ID)


def test_run_status_output(client: runpod.Endpoint) -> None:
    job = client.run({"prompt": "p", "num_images": 2})
    assert job.status() in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    output = job.output(timeout=10)
    assert [c["image"]["index"] for c in output if "image" in c] == [0, 1]
    assert job.status() == "COMPLETED"


def test_run_sync(client: runpod.Endpoint) -> None:
    output = client.run_sync({"input": {"prompt": "p", "num_images": 1}}, timeout=10)
    assert output[0]["image"]["index"] == 0 and "summary" in output[-1]


def test_stream_is_live(client: runpod.Endpoint, endpoint: BackgroundEndpoint) -> None:
    job = client.run({"prompt": "p", "num_images": 3, "delay_s": 0.7})
    chunks, status_at_first_chunk = [], None
    for chunk in job.stream():
        if status_at_first_chunk is None:
            status_at_first_chunk = Api(endpoint).status(job.job_id)["status"]
        chunks.append(chunk)
    assert status_at_first_chunk == "IN_PROGRESS"
    assert [c["image"]["index"] for c in chunks if "image" in c] == [0, 1, 2]
    assert "summary" in chunks[-1]


def test_cancel_and_health(client: runpod.Endpoint) -> None:
    job = client.run({"prompt": "p", "num_images": 4, "delay_s": 1.0})
    assert client.health()["jobs"]["inProgress"] + client.health()["jobs"]["inQueue"] == 1
    assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
    assert job.status() == "CANCELLED"
    assert client.health()["workers"] == {"idle": 1, "running": 0}


def test_wrong_key_raises_the_clients_unauthorized_error(
    client: runpod.Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runpod, "api_key", "wrong")
    with pytest.raises(RuntimeError, match="401 Unauthorized"):
        runpod.Endpoint(ENDPOINT_ID).health()


def test_failed_job_surfaces_error(client: runpod.Endpoint, endpoint: BackgroundEndpoint) -> None:
    job = client.run({"prompt": ""})
    assert job.output(timeout=10) is None
    assert job.status() == "FAILED"
    body = requests.get(
        f"{endpoint.base_url}/{ENDPOINT_ID}/status/{job.job_id}",
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5,
    ).json()
    assert body["error"] == "invalid_input: prompt: required non-empty string"


def test_purge_queue(client: runpod.Endpoint, endpoint: BackgroundEndpoint) -> None:
    running = [client.run({"prompt": "p", "num_images": 2, "delay_s": 3.0}) for _ in range(CONCURRENCY)]
    for job in running:
        Api(endpoint).wait_for_status(job.job_id, "IN_PROGRESS")
    queued = client.run({"prompt": "p"})
    assert client.purge_queue() == {"removed": 1, "status": "completed"}
    assert queued.status() == "CANCELLED"
    for job in running:
        job.cancel()
