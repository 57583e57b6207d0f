"""Webhooks: the final /status body POSTed with RunPod's retries, bounded, never holding jobs.

No worker process: the test plays the worker over the protocol (tests/endpoint/protocol.py)."""

from __future__ import annotations

import time
from itertools import pairwise

import pytest

from endpoint.background import BackgroundEndpoint
from endpoint.webhook import WebhookPolicy, check_webhook_url
from endpoint.worker_api import WorkerApiSettings
from tests.conftest import EndpointFactory
from tests.endpoint.http import Api
from tests.endpoint.protocol import ProtocolWorker
from tests.endpoint.receiver import WebhookReceiver

FAST_RETRIES = WebhookPolicy(retry_delay_s=0.3, attempt_timeout_s=1.0, allow_private=True)
CHUNKS = [{"image": {"index": 0}}, {"image": {"index": 1}}, {"summary": {}}]


def serve(start_endpoint: EndpointFactory, policy: WebhookPolicy) -> BackgroundEndpoint:
    return start_endpoint(workers=0, webhook=policy, worker_api=WorkerApiSettings(hold_s=0.3))


def run_one(server: BackgroundEndpoint, result: dict) -> None:
    """Take the next job and post `result` for it, as a worker does."""
    worker = ProtocolWorker(server)
    [job] = worker.take()
    worker.done(job["id"], result)


def test_final_status_body_is_posted_and_retried_until_200(start_endpoint: EndpointFactory) -> None:
    server = serve(start_endpoint, FAST_RETRIES)
    api = Api(server)
    with WebhookReceiver(statuses=(500, 404)) as receiver:
        job_id = api.submit({"prompt": "p", "num_images": 2}, webhook=receiver.url)
        run_one(server, {"output": CHUNKS})
        final = api.wait(job_id)
        calls = receiver.wait_for_calls(3)
        time.sleep(0.5)  # a 4th call would come 0.3 s after the 3rd
        assert len(receiver.calls) == 3  # the 200 ended it
    assert all(body == final for _, body in calls)  # the same body /status returns
    assert final["status"] == "COMPLETED" and len(final["output"]) == 3
    gaps = [later - earlier for (earlier, _), (later, _) in pairwise(calls)]
    assert all(gap >= 0.3 for gap in gaps), gaps


def test_gives_up_after_three_attempts_and_a_hung_receiver_holds_no_job(start_endpoint: EndpointFactory) -> None:
    server = serve(start_endpoint, WebhookPolicy(retry_delay_s=0.1, attempt_timeout_s=1.0, allow_private=True))
    api = Api(server)
    with WebhookReceiver(delay_s=5.0) as receiver:  # never answers within an attempt's time
        failed = api.submit({"prompt": ""}, webhook=receiver.url)
        run_one(server, {"error": "invalid_input: prompt: required non-empty string"})
        assert api.wait(failed)["status"] == "FAILED"
        receiver.wait_for_calls(1)
        after = api.submit({"prompt": "p"})
        run_one(server, {"output": CHUNKS})
        assert api.wait(after)["status"] == "COMPLETED"
        assert len(receiver.calls) < 3, "the next job waited for the webhook's attempts"
        receiver.wait_for_calls(3)
        time.sleep(1.5)
        assert len(receiver.calls) == 3
    assert receiver.calls[0][1]["error"] == "invalid_input: prompt: required non-empty string"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_private_targets_are_refused_unless_allowed(
    start_endpoint: EndpointFactory, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(start_endpoint, WebhookPolicy(retry_delay_s=0.05))  # RunPod's rule: public only
    api = Api(server)
    with WebhookReceiver() as receiver:
        url = receiver.url.replace("127.0.0.1", host)
        job_id = api.submit({"prompt": "p"}, webhook=url)
        run_one(server, {"output": CHUNKS})
        assert api.wait(job_id)["status"] == "COMPLETED"
        time.sleep(0.3)
        assert receiver.calls == []
    assert f"webhook to {host.strip('[]')} refused: webhook must point to a public address" in caplog.text


def test_a_cancelled_job_calls_the_webhook_too(start_endpoint: EndpointFactory) -> None:
    server = serve(start_endpoint, FAST_RETRIES)
    api = Api(server)
    with WebhookReceiver() as receiver:
        job_id = api.submit({"prompt": "p", "num_images": 3}, webhook=receiver.url)
        ProtocolWorker(server).take()
        api.call("POST", f"cancel/{job_id}")
        assert receiver.wait_for_calls(1)[0][1] == {**api.status(job_id), "status": "CANCELLED"}


@pytest.mark.parametrize("value", [
    42, "", "ftp://example.com/x", "https://", "http://example.com:99999/", "example.com/hook", "h" * 3000,
])
def test_bad_webhook_values_are_400(start_endpoint: EndpointFactory, value: object) -> None:
    response = Api(start_endpoint(workers=0)).call("POST", "run", {"input": {"prompt": "p"}, "webhook": value})
    assert response.status_code == 400 and "webhook" in response.json()["error"]


def test_webhook_url_shape() -> None:
    assert check_webhook_url(None) is None
    assert check_webhook_url("https://hooks.example.com/x?token=1") == "https://hooks.example.com/x?token=1"
