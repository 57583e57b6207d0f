"""`--workers N`: N worker processes (the fake worker under the runpod SDK's loop) share one
queue, as RunPod's workers share an endpoint's; /health shows them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.conftest import EndpointFactory
from tests.endpoint.fake_worker import CONCURRENCY
from tests.endpoint.http import Api


def test_two_workers_share_the_queue(start_endpoint: EndpointFactory) -> None:
    server = start_endpoint(workers=2)
    api = Api(server)
    health = api.call("GET", "health").json()
    assert health["workers"] == {"idle": 2, "running": 0}
    assert [w["state"] for w in health["local"]["workers"]] == ["idle", "idle"]
    assert all(w["pid"] > 0 and w["rss_mb"] > 0 for w in health["local"]["workers"])
    jobs = 2 * CONCURRENCY  # more than one worker holds
    with ThreadPoolExecutor(jobs) as pool:
        ids = list(pool.map(lambda i: api.submit({"prompt": "p", "num_images": 1, "delay_s": 1.0}), range(jobs)))
    api.wait_for_status(ids[-1], "IN_PROGRESS", timeout_s=10)
    assert api.call("GET", "health").json()["workers"] == {"idle": 0, "running": 2}
    finals = [api.wait(job_id, timeout_s=30) for job_id in ids]
    assert {f["status"] for f in finals} == {"COMPLETED"}
    assert len({f["workerId"] for f in finals}) == 2
