"""The REAL handler (`handler:handler`, demo model) behind the local endpoint, driven by the official
runpod client, raw HTTP, the benchmark and the load test. The handler module is the session's one
import (`handler_module`); the endpoint's loader imports `handler` by name and gets that same module.
"""

from __future__ import annotations

import importlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest
import runpod

from benchmark import cli
from endpoint.background import BackgroundEndpoint
from endpoint.loader import load_handler
from tests.conftest import API_KEY, EndpointFactory
from tests.endpoint import fake_worker
from tests.endpoint.http import ENDPOINT_ID, Api

ROOT = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
JOB = {"prompt": "a red kite over the sea", "num_images": 3, "width": 64, "height": 64, "steps": 2, "seed": 11,
       "output_format": "png"}
RECORD_FIELDS = {"submit_ms", "delay_ms", "execution_ms", "first_image_ms", "all_images_ms", "image_arrival_ms",
                 "images", "expected_images", "failures", "ok", "jobs_detail", "workflow", "mode", "steps",
                 "width", "height", "num_images", "vertical", "permutation", "scenario"}


@pytest.fixture
def real(handler_module: Any, start_endpoint: EndpointFactory) -> BackgroundEndpoint:
    loaded = load_handler("handler:handler")
    assert loaded.handler is handler_module.handler  # the session's import, not a second model
    return start_endpoint(loaded)


@pytest.fixture
def client(real: BackgroundEndpoint, monkeypatch: pytest.MonkeyPatch) -> runpod.Endpoint:
    # What RUNPOD_ENDPOINT_BASE_URL does, read once at `import runpod` (docs/ENDPOINT.md).
    monkeypatch.setattr(runpod, "endpoint_url_base", real.base_url)
    monkeypatch.setattr(runpod, "api_key", API_KEY)
    return runpod.Endpoint(ENDPOINT_ID)


@pytest.fixture
def one_image_batches(handler_module: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """MAX_BATCH=1 for this test: a multi-image job then runs image after image (slow enough to watch)."""
    worker = handler_module.WORKER
    monkeypatch.setattr(worker, "settings", worker.settings.model_copy(update={"max_batch": 1}))
    yield
    assert worker.engine_loop.queued_images() == 0  # nothing of the test's jobs left on the "GPU"


def _images(output: list[dict[str, Any]]) -> list[int]:
    """Image indices in the order they were yielded (finished images stream in any order)."""
    return [chunk["image"]["index"] for chunk in output if "image" in chunk]


def test_fake_worker_capabilities_have_the_real_shape(handler_module: Any) -> None:
    real_caps = handler_module.WORKER.capabilities()
    fake = fake_worker.CAPABILITIES
    assert set(fake) == set(real_caps)
    assert set(fake["limits"]) == set(real_caps["limits"])
    for kind in ("workflows", "modes"):
        assert [e["name"] for e in fake[kind]] == [e["name"] for e in real_caps[kind]]
        assert all(set(f) == set(r) for f, r in zip(fake[kind], real_caps[kind]))
    for name in ("num_images", "side", "steps"):
        assert len(fake["limits"][name]) == len(real_caps["limits"][name]) == 2


def test_official_client_run_sync_and_run_status_stream_output(client: runpod.Endpoint) -> None:
    output = client.run_sync({"input": JOB}, timeout=60)
    assert sorted(_images(output)) == [0, 1, 2]
    summary = output[-1]["summary"]
    assert summary["images_completed"] == 3 and summary["settings"]["width"] == 64
    assert all(chunk["image"]["base64"] for chunk in output[:-1])

    job = client.run({**JOB, "seed": 12})
    assert job.status() in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    streamed = list(job.stream())
    final = job.output(timeout=60)
    assert job.status() == "COMPLETED"
    assert streamed == final  # every chunk, images and summary, in order: what /status keeps
    assert sorted((c["image"]["index"], c["image"]["seed"]) for c in final[:3]) == [(0, 12), (1, 13), (2, 14)]
    assert final[-1]["summary"]["images_completed"] == 3


def test_stream_is_live_and_progress_has_the_real_total(real: BackgroundEndpoint, one_image_batches: None) -> None:
    api = Api(real)
    job_id = api.submit({**JOB, "steps": 8})
    streamed: list[dict[str, Any]] = []
    live_images = 0  # image chunks handed out by /stream while the job still ran
    progress: list[Any] = []
    deadline = time.monotonic() + 300  # a hang guard: a shared 2-core CPU may take minutes
    while True:
        status = api.status(job_id)
        if status["status"] == "IN_PROGRESS" and "output" in status:
            progress.append(status["output"])
        body = api.call("POST", f"stream/{job_id}").json()
        chunks = [item["output"] for item in body["stream"]]
        streamed += chunks
        if body["status"] == "IN_PROGRESS":
            live_images += len(_images(chunks))
        if body["status"] in FINAL:
            break
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.02)
    final = api.status(job_id)
    assert final["status"] == "COMPLETED"
    assert streamed == final["output"] and sorted(_images(streamed)) == [0, 1, 2]
    assert live_images >= 1, "no image was streamed before the job ended"
    assert progress, "no progress in /status while the job ran"
    assert all(p["total"] == 3 and 0 <= p["completed"] <= 3 for p in progress), progress
    completed = [p["completed"] for p in progress]
    assert completed == sorted(completed)


def test_cancel_running_job_then_the_worker_serves_the_next(
    client: runpod.Endpoint, real: BackgroundEndpoint, one_image_batches: None
) -> None:
    api = Api(real)
    job = client.run({**JOB, "num_images": 6, "steps": 20})
    deadline = time.monotonic() + 60
    while not ((body := api.status(job.job_id))["status"] == "IN_PROGRESS"
               and (body.get("output") or {}).get("completed", 0) >= 1):
        assert body["status"] not in FINAL, f"job ended {body['status']} before it could be cancelled"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
    assert job.status() == "CANCELLED"
    assert "output" not in api.status(job.job_id)
    assert client.health()["workers"] == {"idle": 1, "running": 0}
    after = client.run_sync({"input": {**JOB, "num_images": 1}}, timeout=60)
    assert _images(after) == [0] and after[-1]["summary"]["images_completed"] == 1


def test_bad_input_fails_with_invalid_input(client: runpod.Endpoint, real: BackgroundEndpoint) -> None:
    for bad, field in (({**JOB, "width": 100}, "width"), ({**JOB, "num_images": 17}, "num_images"),
                       ({**JOB, "prompt": ""}, "prompt")):
        job = client.run(bad)
        assert job.output(timeout=30) is None
        body = Api(real).status(job.job_id)
        assert body["status"] == "FAILED"
        assert body["error"].startswith(f"invalid_input: {field}: "), body["error"]
        assert "Traceback" not in body["error"]
    assert _images(client.run_sync({"input": {**JOB, "num_images": 1}}, timeout=60)) == [0]


def test_concurrent_jobs_complete_and_share_batches(real: BackgroundEndpoint) -> None:
    api = Api(real)
    # Same size, steps and prompt length: one batch group. Submitted together, 2 images each; with
    # the CPU's max batch of 4, a batch that takes images of several jobs is bigger than 2.
    inputs = [{**JOB, "prompt": f"a red kite over the sea, take {i}", "num_images": 2, "width": 128,
               "height": 128, "steps": 4, "seed": 100 + i} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(api.submit, inputs))
    bodies = [api.wait(job_id, timeout_s=90) for job_id in ids]
    assert [b["status"] for b in bodies] == ["COMPLETED"] * 4
    for body, job_input in zip(bodies, inputs):
        seed = job_input["seed"]
        indices_seeds = sorted((c["image"]["index"], c["image"]["seed"]) for c in body["output"][:2])
        assert indices_seeds == [(0, seed), (1, seed + 1)]
    batch_sizes = [b["output"][-1]["summary"]["batch_sizes"] for b in bodies]
    assert max(max(sizes) for sizes in batch_sizes) > 2, batch_sizes


def test_smoke_benchmark_against_the_real_handler(
    real: BackgroundEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    rc = cli.main(["--config", str(ROOT / "benchmarks" / "smoke.json"), "--base-url", f"{real.base_url}/local",
                   "--out-dir", str(tmp_path), "--no-progress", "--repetitions", "1"])
    assert rc == 0
    [report_path] = tmp_path.glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["capabilities"]["limits"]["num_images"] == [1, 16]
    assert report["skipped"] == []  # the demo worker offers both workflows and fast mode
    runs = report["runs"]
    assert report["config"]["repetitions"] == 1  # --repetitions overrides the config's 2
    assert len(runs) == 10  # 2 workflows x 2 sizes of job x 2 concurrencies + 2 wizard steps
    for run in runs:
        assert RECORD_FIELDS <= set(run)
        assert run["failures"] == [] and run["ok"]
        assert (
            run["images"] == run["expected_images"] == run["jobs"] * run["num_images"] == len(run["image_arrival_ms"])
        )
        assert run["submit_ms"] <= run["first_image_ms"] <= run["all_images_ms"]
        assert all(job["status"] == "COMPLETED" and job["summary"]["model"]["demo"] for job in run["jobs_detail"])
        assert sum(job["summary"]["images_completed"] for job in run["jobs_detail"]) == run["images"]
    assert {row["permutation"] for row in report["summary"]} == {run["permutation"] for run in runs}
    assert all(row["failed_runs"] == 0 for row in report["summary"])
    assert '"base64":' not in json.dumps(runs)  # image data never lands in the report


def test_load_test_script_against_the_real_handler(handler_module: Any, capsys: pytest.CaptureFixture[str]) -> None:
    load_test = importlib.import_module("scripts.load_test")
    # 12 jobs, 4 in flight: jobs 3, 7, 11 have bad inputs, 4 and 9 are cancelled, 7 are good.
    rc = load_test.main(["--jobs", "12", "--concurrency", "4", "--bad-every", "4", "--cancel-every", "5"])
    out = capsys.readouterr().out
    report = json.loads(out[out.rindex("\n{\n") + 1:] if not out.startswith("{\n") else out)  # after any log lines
    assert rc == 0 and report["ok"], report["problems"]
    counts = report["counts"]
    assert counts["submitted"] == 12 and counts["problems"] == 0
    assert counts["good_completed"] == 7
    assert counts["bad_failed_cleanly"] == 3
    assert counts["cancelled"] + counts["cancel_lost_race"] == 2
    assert report["health"]["jobs"]["inQueue"] == report["health"]["jobs"]["inProgress"] == 0


def test_s3_config_reaches_the_worker(real: BackgroundEndpoint) -> None:
    """The top-level s3Config goes to the worker as RunPod passes it; the worker judges its fields."""
    api = Api(real)
    body = api.call("POST", "runsync", {"input": {**JOB, "num_images": 1}, "s3Config": {"bucketName": "b"}}).json()
    assert body["status"] == "FAILED"
    assert body["error"].startswith("invalid_input: s3Config.accessId: "), body["error"]  # the first field it lacks
    assert api.call("POST", "run", {"input": JOB, "s3Config": "b"}).status_code == 400  # not an object
