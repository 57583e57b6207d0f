"""The production loop for real: the local endpoint's job server, and a worker process running
handler.py's `main()` (the demo model) under the runpod SDK's own loop, nothing of the SDK patched.
The worker is tests/endpoint/gpu_fault_worker.py: handler.py plus one GPU failure that a test can
arm. Driven by the official runpod client, raw HTTP, the benchmark and the load test."""

from __future__ import annotations

import importlib
import json
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import runpod

from benchmark import cli
from endpoint.background import BackgroundEndpoint
from endpoint.jobs import FINAL_STATUSES
from endpoint.pool import PoolSettings
from tests.conftest import API_KEY, running_endpoint
from tests.endpoint import fake_worker
from tests.endpoint.gpu_fault_worker import GPU_FAULT_ENV
from tests.endpoint.http import ENDPOINT_ID, Api, exit_code, images_of

ROOT = Path(__file__).resolve().parents[2]
JOB = {"prompt": "a red kite over the sea", "num_images": 3, "width": 64, "height": 64, "steps": 2, "seed": 11,
       "output_format": "png"}
SLOW = {**JOB, "width": 128, "height": 128, "steps": 4}  # a batch takes long enough to watch it run
RECORD_FIELDS = {"submit_ms", "delay_ms", "execution_ms", "first_image_ms", "all_images_ms", "image_arrival_ms",
                 "images", "expected_images", "failures", "ok", "jobs_detail", "workflow", "mode", "steps",
                 "width", "height", "num_images", "vertical", "permutation", "scenario"}


@pytest.fixture(scope="module")
def gpu_fault_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu") / "fail-next-model-call"


@pytest.fixture(scope="module")
def endpoint(gpu_fault_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundEndpoint]:
    """One worker process for the module: it imports torch and builds the demo model (seconds). Its
    rows always join (BATCH_JOIN_COST=1): the tests count shared model calls, not how this machine
    times them (serving/scheduler.py)."""
    pool = PoolSettings(command=(sys.executable, "-m", "tests.endpoint.gpu_fault_worker"),
                        env={GPU_FAULT_ENV: str(gpu_fault_file), "BATCH_JOIN_COST": "1"},
                        log_dir=tmp_path_factory.mktemp("workers"))
    with running_endpoint(pool) as server:
        yield server


@pytest.fixture
def client(endpoint: BackgroundEndpoint, monkeypatch: pytest.MonkeyPatch) -> runpod.Endpoint:
    # What RUNPOD_ENDPOINT_BASE_URL does, read once at `import runpod` (docs/ENDPOINT.md).
    monkeypatch.setattr(runpod, "endpoint_url_base", endpoint.base_url)
    monkeypatch.setattr(runpod, "api_key", API_KEY)
    return runpod.Endpoint(ENDPOINT_ID)


def submit_together(api: Api, inputs: list[dict[str, Any]]) -> list[str]:
    """One thread per job, released at once: the jobs reach the server within milliseconds."""
    ids: list[str] = [""] * len(inputs)
    start = threading.Barrier(len(inputs))

    def submit(i: int) -> None:
        start.wait()
        ids[i] = api.submit(inputs[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ids


def test_three_concurrent_jobs_on_an_idle_worker_run_as_one_model_call(endpoint: BackgroundEndpoint) -> None:
    """The wizard's 3 base images: the SDK takes all three at once and the scheduler waits for the
    ones it took but has not started, so each job reports one model call, shared by 3 images.
    Rounds start at random moments against the SDK's 0.1 s run-loop tick."""
    api = Api(endpoint)
    for round_ in range(3):
        time.sleep(random.uniform(0.2, 0.4))
        ids = submit_together(api, [{**JOB, "num_images": 1, "seed": 10 * round_ + i} for i in range(3)])
        bodies = [api.wait(job_id, timeout_s=120) for job_id in ids]
        assert [b["status"] for b in bodies] == ["COMPLETED"] * 3
        assert [b["output"][-1]["summary"]["batch_sizes"] for b in bodies] == [[3]] * 3, f"round {round_}"


def test_a_running_job_streams_each_image_before_its_result_and_shows_progress(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    job_id = api.submit({**SLOW, "num_images": 8})  # two model calls at the CPU's batch of 4
    streamed: list[dict[str, Any]] = []
    live_images = 0
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
            live_images += len(images_of(chunks))
        if body["status"] in FINAL_STATUSES:
            break
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.02)
    final = api.status(job_id)
    assert final["status"] == "COMPLETED"
    assert streamed == final["output"] and sorted(images_of(streamed)) == list(range(8))
    assert live_images >= 1, "no image was streamed before the job ended"
    record = endpoint.platform.store.get(job_id)
    assert record.streamed == len(final["output"])  # each chunk posted to job-stream once
    assert record.chunks_after_end == 0  # and before job-done
    assert progress, "no progress in /status while the job ran"
    assert all(p["total"] == 8 and 0 <= p["completed"] <= 8 for p in progress), progress
    assert any(0 < p["completed"] < 8 for p in progress), progress  # seen part way, not only 0/8


def test_a_stop_signal_ends_one_job_while_the_others_complete(endpoint: BackgroundEndpoint) -> None:
    api = Api(endpoint)
    big, *others = submit_together(api, [{**SLOW, "num_images": 16, "seed": 1},
                                         {**SLOW, "num_images": 2, "seed": 2}, {**SLOW, "num_images": 2, "seed": 3}])
    deadline = time.monotonic() + 300
    while not images_of([item["output"] for item in api.call("GET", f"stream/{big}").json()["stream"]]):
        assert time.monotonic() < deadline and api.status(big)["status"] == "IN_PROGRESS"
        time.sleep(0.02)
    assert api.call("POST", f"cancel/{big}").json() == {"id": big, "status": "CANCELLED"}
    cancelled_at = time.monotonic()
    for job_id in others:
        final = api.wait(job_id, timeout_s=300)
        assert final["status"] == "COMPLETED" and sorted(images_of(final["output"])) == [0, 1]
    # The stop reaches the worker on its own channel: a ping after the cancel without the job says
    # the SDK's task for it has ended (its rows leave then), whatever this machine's timing.
    seat = endpoint.platform.workers[endpoint.platform.store.get(big).worker_id]
    while not (seat.last_ping and seat.last_ping > cancelled_at and big not in seat.pinged_jobs):
        assert time.monotonic() < deadline, "the worker still holds the cancelled job"
        time.sleep(0.05)
    # The cancelled job's images left the scheduler: a new job's model calls hold only its own
    # images (a queued image of the old job would share them, the scheduler interleaves jobs).
    after = api.wait(api.submit({**SLOW, "num_images": 2, "seed": 4}), timeout_s=300)
    assert after["output"][-1]["summary"]["batch_sizes"] == [2]
    assert api.status(big)["status"] == "CANCELLED"


def test_fake_worker_capabilities_have_the_real_shape(endpoint: BackgroundEndpoint) -> None:
    [real_caps] = Api(endpoint).call("POST", "runsync", {"input": {"action": "capabilities"}}).json()["output"]
    fake = fake_worker.CAPABILITIES
    assert set(fake) == set(real_caps)
    assert set(fake["limits"]) == set(real_caps["limits"])
    for kind in ("workflows", "modes"):
        assert [e["name"] for e in fake[kind]] == [e["name"] for e in real_caps[kind]]
        assert all(set(f) == set(r) for f, r in zip(fake[kind], real_caps[kind]))
    for name in ("num_images", "side", "steps"):
        assert len(fake["limits"][name]) == len(real_caps["limits"][name]) == 2
    assert real_caps["batching"]["concurrency"] == 8  # what concurrency_modifier reports by default


def test_official_client_run_sync_and_run_status_stream_output(client: runpod.Endpoint) -> None:
    output = client.run_sync({"input": JOB}, timeout=120)
    assert sorted(images_of(output)) == [0, 1, 2]
    summary = output[-1]["summary"]
    assert summary["images_completed"] == 3 and summary["settings"]["width"] == 64
    assert all(chunk["image"]["base64"] for chunk in output[:-1])

    job = client.run({**JOB, "seed": 12})
    assert job.status() in {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    streamed = list(job.stream())
    final = job.output(timeout=120)
    assert job.status() == "COMPLETED"
    assert streamed == final  # every chunk, images and summary, in order: what /status keeps
    assert sorted((c["image"]["index"], c["image"]["seed"]) for c in final[:3]) == [(0, 12), (1, 13), (2, 14)]
    assert final[-1]["summary"]["images_completed"] == 3


def test_bad_input_fails_with_invalid_input(client: runpod.Endpoint, endpoint: BackgroundEndpoint) -> None:
    cases = (({**JOB, "width": 100}, "width"), ({**JOB, "num_images": 17}, "num_images"),
             ({**JOB, "prompt": ""}, "prompt"))
    jobs = [client.run(bad) for bad, _ in cases]
    for job, (_, field) in zip(jobs, cases):
        assert job.output(timeout=60) is None
        body = Api(endpoint).status(job.job_id)
        assert body["status"] == "FAILED"
        assert body["error"].startswith(f"invalid_input: {field}: "), body["error"]
        assert "Traceback" not in body["error"]
    assert images_of(client.run_sync({"input": {**JOB, "num_images": 1}}, timeout=120)) == [0]


def test_s3_config_reaches_the_worker(endpoint: BackgroundEndpoint) -> None:
    """The top-level s3Config goes to the worker as RunPod passes it; the worker judges its fields."""
    api = Api(endpoint)
    body = api.call("POST", "runsync", {"input": {**JOB, "num_images": 1}, "s3Config": {"bucketName": "b"}}).json()
    assert body["status"] == "FAILED"
    assert body["error"].startswith("invalid_input: s3Config.accessId: "), body["error"]  # the first field it lacks
    assert api.call("POST", "run", {"input": JOB, "s3Config": "b"}).status_code == 400  # not an object


def test_smoke_benchmark_against_the_real_loop(
    endpoint: BackgroundEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    rc = cli.main(["--config", str(ROOT / "benchmarks" / "smoke.json"), "--base-url", f"{endpoint.base_url}/local",
                   "--out-dir", str(tmp_path), "--no-progress", "--repetitions", "1"])
    assert rc == 0
    [report_path] = tmp_path.glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["capabilities"]["limits"]["num_images"] == [1, 16]
    assert report["skipped"] == []  # the demo worker offers both workflows and fast mode
    runs = report["runs"]
    assert report["config"]["repetitions"] == 1  # --repetitions overrides the config's 2
    assert len(runs) == 11  # 2 workflows x 2 sizes of job x 2 concurrencies + 3 wizard steps
    [from_base] = [run for run in runs if run["scenario"] == "wizard_profile_from_base"]
    assert from_base["base"]["ok"] and all(  # 8 variations of the first base image, by its hash
        job["summary"]["settings"]["strength"] == 0.6 and len(job["summary"]["init_image"]["sha256"]) == 64
        for job in from_base["jobs_detail"])
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


def test_load_test_script_against_the_real_loop(
    endpoint: BackgroundEndpoint, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    load_test = importlib.import_module("scripts.load_test")
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    # 12 jobs, 4 in flight: jobs 3, 7, 11 have bad inputs, 4 and 9 are cancelled, 7 are good.
    rc = load_test.main(["--base-url", f"{endpoint.base_url}/local", "--jobs", "12", "--concurrency", "4",
                         "--bad-every", "4", "--cancel-every", "5"])
    out = capsys.readouterr().out
    report = json.loads(out[out.rindex("\n{\n") + 1:] if not out.startswith("{\n") else out)  # after any log lines
    assert rc == 0 and report["ok"], report["problems"]
    counts = report["counts"]
    assert counts["submitted"] == 12 and counts["problems"] == 0
    assert counts["good_completed"] == 7
    assert counts["bad_failed_cleanly"] == 3
    assert counts["cancelled"] + counts["cancel_lost_race"] == 2
    assert report["health"]["jobs"]["inQueue"] == report["health"]["jobs"]["inProgress"] == 0


def test_refresh_worker_after_a_device_failure(endpoint: BackgroundEndpoint, gpu_fault_file: Path) -> None:
    """A fatal CUDA error: the job ends with its images failed (device_failure), the SDK posts it
    with stopPod and exits, a fresh worker replaces it and the next job succeeds there."""
    api = Api(endpoint)
    gpu_fault_file.touch()
    failed = api.call("POST", "runsync", {"input": {**JOB, "num_images": 2}}).json()
    assert failed["status"] == "COMPLETED"  # the job ran; its images failed
    errors = [chunk["image_error"]["code"] for chunk in failed["output"] if "image_error" in chunk]
    assert errors == ["device_failure", "device_failure"]
    assert not gpu_fault_file.exists()
    assert exit_code(endpoint, failed["workerId"], timeout_s=60) == 0  # it exits after its job, cleanly
    after = api.wait(api.submit({**JOB, "num_images": 1}), timeout_s=300)  # queued until the new worker is up
    assert after["status"] == "COMPLETED" and images_of(after["output"]) == [0]
    assert after["workerId"] != failed["workerId"]
