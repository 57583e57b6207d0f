"""Storage delivery through the real Worker on the demo model, against moto's S3 server on loopback.

One worker per module, configured from the environment (BUCKET_* pointing at a fault proxy in
front of moto, so every request the worker makes is counted), batch size 1 so a job's images
leave the GPU one by one, and a 1 MB result limit for the payload guard. Jobs' s3Config may
point at loopback here (JOB_STORAGE_ALLOW_PRIVATE=1: moto runs on 127.0.0.1). A third worker's
bucket is a server that accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config
from moto.server import ThreadedMotoServer

from serving.delivery import Delivery, PendingUpload, StorageIO
from serving.errors import JobError
from serving.local_run import collect
from serving.settings import load_settings
from serving.storage import ImageStore
from serving.storage_config import StorageConfig
from serving.worker import Worker
from tests.serving.conftest import (
    ACCESS_KEY,
    SECRET_KEY,
    FaultProxy,
    HungServer,
    running_fault_proxy,
    running_hung_server,
)

SMALL = {"width": 64, "height": 64, "steps": 2}
LIMIT_MB = 1
HUNG_DELIVERY_TIMEOUT_S = 10
IO = StorageIO(ThreadPoolExecutor(2, thread_name_prefix="test-storage"), delivery_timeout_s=5, lookup_timeout_s=1)


def client(endpoint: str):
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, config=Config(s3={"addressing_style": "path"}))


@pytest.fixture(scope="module")
def counting_proxy(moto_endpoint: str):
    with running_fault_proxy(moto_endpoint) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def main_bucket(moto_endpoint: str) -> str:
    name = f"main-{uuid.uuid4().hex[:10]}"
    client(moto_endpoint).create_bucket(Bucket=name)
    return name


def env_for(endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    return {"BUCKET_ENDPOINT_URL": endpoint, "BUCKET_ACCESS_KEY_ID": ACCESS_KEY,
            "BUCKET_SECRET_ACCESS_KEY": SECRET_KEY, "BUCKET_NAME": bucket, "MAX_BATCH": "1",
            "BATCH_WAIT_MS": "0", "MAX_RESPONSE_MB": str(LIMIT_MB), "JOB_TIMEOUT_S": "60",
            "JOB_STORAGE_ALLOW_PRIVATE": "1", **extra}


@pytest.fixture(scope="module")
def worker(counting_proxy: FaultProxy, main_bucket: str) -> Worker:
    started = Worker.start(load_settings(env_for(counting_proxy.url, main_bucket)))
    run(started, {"prompt": "warm-up", "steps": 1, "width": 64, "height": 64})  # first-call costs out of the timings
    return started


@pytest.fixture(scope="module")
def bare_worker() -> Worker:
    """No storage at all, the same small result limit."""
    return Worker.start(load_settings({"MAX_BATCH": "1", "BATCH_WAIT_MS": "0", "MAX_RESPONSE_MB": str(LIMIT_MB)}))


@pytest.fixture(scope="module")
def hung_server() -> HungServer:
    with running_hung_server() as server:
        yield server


@pytest.fixture(scope="module")
def hung_worker(hung_server: HungServer) -> Worker:
    """The deployment's bucket accepts connections and never answers."""
    env = env_for(hung_server.url, "hung", DELIVERY_TIMEOUT_S=str(HUNG_DELIVERY_TIMEOUT_S), CACHE_LOOKUP_TIMEOUT_S="1")
    started = Worker.start(load_settings(env))
    run(started, {"prompt": "warm-up", "steps": 1, "width": 64, "height": 64})
    return started


def run(worker: Worker, job_input: dict[str, Any], job_id: str | None = None, **top: Any) -> dict[str, Any]:
    job = {"id": job_id or f"job-{uuid.uuid4().hex[:8]}", "input": job_input, **top}
    return asyncio.run(collect(worker.run_job, job))


def chunks_of(worker: Worker, job: dict[str, Any], on_chunk=lambda chunk: None) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        out = []
        async for chunk in worker.run_job(job):
            out.append(chunk)
            on_chunk(chunk)
        return out

    return asyncio.run(go())


def fetch(url: str) -> bytes:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.status_code
    return response.content


def b64(entry: dict[str, Any]) -> bytes:
    return base64.b64decode(entry["base64"])


def engine_calls(worker: Worker) -> int:
    cache = worker.engine.prompt_cache
    return cache.hits + cache.misses  # every engine.generate encodes its prompts through this cache


def test_url_delivery_serves_the_same_bytes_as_base64_and_a_repeat_is_a_cache_hit(
    worker, counting_proxy, moto_endpoint, main_bucket
):
    job = {"prompt": "a red fox", "num_images": 2, "seed": 41, **SMALL}
    inline = run(worker, job)
    assert inline["settings"]["delivery"] == "base64" and "url" not in inline["images"][0]

    first = run(worker, {**job, "delivery": "url"})
    assert first["errors"] == [] and first["images_completed"] == 2 and first["images_from_cache"] == 0
    assert first["batch_sizes"] == [1, 1] and first["settings"]["delivery"] == "url"
    for stored, expected in zip(first["images"], inline["images"]):
        assert "base64" not in stored and "cached" not in stored
        assert stored["key"].startswith("z-image/cache/") and stored["key"].endswith(".webp")  # the default
        assert fetch(stored["url"]) == b64(expected)  # over HTTP, byte for byte
        head = client(moto_endpoint).head_object(Bucket=main_bucket, Key=stored["key"])
        assert head["ContentType"] == "image/webp"

    counting_proxy.requests.clear()
    calls = engine_calls(worker)
    again = run(worker, {**job, "delivery": "url"})
    assert again["images_from_cache"] == 2 and again["images_completed"] == 2
    assert again["batch_sizes"] == [] and again["timings_ms"]["denoising"] == 0
    assert engine_calls(worker) == calls  # the model was never called
    assert counting_proxy.count("HEAD") == 2 and counting_proxy.count("PUT") == 0
    assert [i["key"] for i in again["images"]] == [i["key"] for i in first["images"]]
    assert all(i["cached"] is True for i in again["images"])
    assert fetch(again["images"][1]["url"]) == b64(inline["images"][1])


def test_cache_key_covers_seed_and_prompt(worker):
    job = {"prompt": "a blue heron", "seed": 900, **SMALL, "delivery": "url"}
    first = run(worker, job)
    assert first["images_from_cache"] == 0
    shifted = run(worker, {**job, "seed": 901, "num_images": 2})  # seeds 901, 902: neither stored yet
    assert shifted["images_from_cache"] == 0 and shifted["batch_sizes"] == [1, 1]
    overlap = run(worker, {**job, "seed": 900, "num_images": 3})  # 900, 901, 902 all stored now
    assert overlap["images_from_cache"] == 3 and overlap["batch_sizes"] == []
    other_prompt = run(worker, {**job, "prompt": "a grey heron"})
    assert other_prompt["images_from_cache"] == 0 and other_prompt["batch_sizes"] == [1]
    assert other_prompt["images"][0]["key"] != first["images"][0]["key"]


def test_streaming_yields_each_image_once_it_is_stored(worker, moto_endpoint, main_bucket):
    s3 = client(moto_endpoint)
    seen: list[int] = []

    def on_chunk(chunk: dict[str, Any]) -> None:
        if "image" in chunk:  # at the moment the client sees it, the object is already in the bucket
            s3.head_object(Bucket=main_bucket, Key=chunk["image"]["key"])
            seen.append(chunk["image"]["index"])

    job = {
        "id": "stream-1",
        "input": {"prompt": "a kite over hills", "num_images": 4, "seed": 7, "delivery": "url", **SMALL},
    }
    chunks = chunks_of(worker, job, on_chunk)
    assert [c["progress"]["completed"] for c in chunks if "image" in c] == [1, 2, 3, 4]
    assert "summary" in chunks[-1] and all("summary" not in c for c in chunks[:-1])
    summary = chunks[-1]["summary"]
    assert summary["batch_sizes"] == [1, 1, 1, 1] and sorted(seen) == [0, 1, 2, 3]
    # one image per batch: the first is out long before the job is done
    assert summary["timings_ms"]["first_image"] < 0.75 * summary["timings_ms"]["total"]


def test_per_job_s3config_goes_to_the_callers_bucket_without_the_cache(worker, moto_endpoint, main_bucket):
    s3 = client(moto_endpoint)
    second = f"second-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=second)
    s3_config = {"accessId": ACCESS_KEY, "accessSecret": SECRET_KEY, "bucketName": second, "endpointUrl": moto_endpoint}
    job = {"prompt": "a lighthouse", "num_images": 2, "seed": 300, "delivery": "url", **SMALL}
    inline = run(worker, {**job, "delivery": "base64"})
    before = {o["Key"] for o in s3.list_objects_v2(Bucket=main_bucket).get("Contents", [])}

    result = run(worker, job, job_id="caller-job", s3Config=s3_config)
    assert result["errors"] == [] and result["images_from_cache"] == 0
    assert [i["key"] for i in result["images"]] == ["z-image/caller-job/00-300.webp", "z-image/caller-job/01-301.webp"]
    stored = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=second)["Contents"])
    assert stored == ["z-image/caller-job/00-300.webp", "z-image/caller-job/01-301.webp"]
    after = {o["Key"] for o in s3.list_objects_v2(Bucket=main_bucket).get("Contents", [])}
    assert after == before  # nothing written to the deployment's bucket
    for image, expected in zip(result["images"], inline["images"]):
        assert second in image["url"] and fetch(image["url"]) == b64(expected)

    again = run(worker, job, job_id="caller-job-2", s3Config=s3_config)
    assert again["images_from_cache"] == 0 and again["batch_sizes"] == [1, 1]  # no cache in the caller's bucket


@pytest.mark.parametrize(
    ("s3_config", "expected"),
    [
        ("bucket", "invalid_input: s3Config: must be an object"),
        ({"accessId": "a", "accessSecret": "b", "endpointUrl": "http://127.0.0.1:1"},
         "invalid_input: s3Config.bucketName: is missing or empty"),
        ({"accessId": "a", "accessSecret": 12345, "bucketName": "c", "endpointUrl": "http://127.0.0.1:1"},
         "invalid_input: s3Config.accessSecret: must be a string"),
        ({"accessId": "a\r\nX: y", "accessSecret": "b", "bucketName": "c", "endpointUrl": "http://127.0.0.1:1"},
         "invalid_input: s3Config.accessId: must not contain control characters"),
        ({"accessId": "a", "accessSecret": "b", "bucketName": "c", "endpointUrl": "http://"},
         "invalid_input: s3Config.endpointUrl: must be an http(s) URL with a host"),
        ({"accessId": "a", "accessSecret": "b", "bucketName": "c", "endpointUrl": "https://[::1"},
         "invalid_input: s3Config.endpointUrl: must be an http(s) URL with a host"),
    ],
)
def test_bad_s3config_is_an_input_error(worker, s3_config, expected):
    result = run(worker, {"prompt": "x", "delivery": "url", **SMALL}, s3Config=s3_config)
    assert result["error"] == expected


@pytest.mark.parametrize("endpoint", [
    "http://127.0.0.1:9000", "http://localhost:9000", "http://10.1.2.3:9000", "http://169.254.169.254",
    "http://[::ffff:127.0.0.1]:9000", "http://[fe80::1]:9000", "http://metadata.invalid",
])
def test_job_storage_on_internal_addresses_is_refused_unless_allowed(bare_worker, endpoint):
    s3_config = {"accessId": "a", "accessSecret": "b", "bucketName": "c", "endpointUrl": endpoint}
    result = run(bare_worker, {"prompt": "x", "delivery": "url", **SMALL}, s3Config=s3_config)
    # names s3Config, says nothing about the host: the same words for private and unresolvable
    assert result == {"error": "invalid_input: s3Config.endpointUrl: must resolve to public addresses only"}


def test_url_without_storage_is_an_input_error(bare_worker):
    result = run(bare_worker, {"prompt": "x", "delivery": "url", **SMALL})
    assert result["error"] == 'invalid_input: delivery: url delivery needs storage: set BUCKET_* or send s3Config'


def test_server_stopped_mid_job_loses_no_image(worker):
    """A second S3 server, reached through the job's s3Config, goes away after the first image."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client(endpoint).create_bucket(Bucket="doomed")
    s3_config = {"accessId": ACCESS_KEY, "accessSecret": SECRET_KEY, "bucketName": "doomed", "endpointUrl": endpoint}
    job_input = {"prompt": "a storm at sea", "num_images": 4, "seed": 500, **SMALL}
    stopped = []

    def stop_after_first_image(chunk: dict[str, Any]) -> None:
        if "image" in chunk and not stopped:
            server.stop()
            stopped.append(chunk["image"]["index"])

    chunks = chunks_of(worker, {"id": "doomed-job", "input": {**job_input, "delivery": "url"}, "s3Config": s3_config},
                       stop_after_first_image)
    inline = run(worker, job_input)
    images = {c["image"]["index"]: c["image"] for c in chunks if "image" in c}
    errors = {c["image_error"]["index"]: c["image_error"] for c in chunks if "image_error" in c}
    assert sorted([*images, *errors]) == [0, 1, 2, 3] and not set(images) & set(errors)  # every index, once
    summary = chunks[-1]["summary"]
    assert summary["images_completed"] + summary["images_failed"] == 4
    assert "url" in images[stopped[0]]  # stored before the server went away
    fallbacks = [i for i in images.values() if "delivery_fallback" in i]
    assert fallbacks, "the images after the stop must come back inline"
    assert images[3].get("delivery_fallback") or 3 in errors  # the last image cannot have been uploaded
    for entry in fallbacks:
        assert "url" not in entry and entry["delivery_fallback"] == "upload failed (unreachable): returned inline"
        assert b64(entry) == b64(inline["images"][entry["index"]])  # the very image, not a placeholder
    for error in errors.values():
        assert error["code"] and error["message"]


def test_transient_upload_failures_are_retried(worker, counting_proxy):
    counting_proxy.requests.clear()
    counting_proxy.faults = [503, "drop"]  # the first HEAD (cache lookup) answers 503: a miss, not an error
    result = run(worker, {"prompt": "a quiet pond", "seed": 77, "delivery": "url", **SMALL})
    assert counting_proxy.faults == []
    assert result["errors"] == [] and "url" in result["images"][0] and "delivery_fallback" not in result["images"][0]
    assert counting_proxy.count("PUT") == 2  # dropped once, retried, stored
    assert fetch(result["images"][0]["url"])[:4] == b"RIFF"


# -- the payload guard -------------------------------------------------------------------------
BIG = {"prompt": "static", "width": 256, "height": 256, "steps": 1, "num_images": 5, "seed": 1,
       "output_format": "png"}  # ~210 KB each in base64


def response_bytes(chunks: list[dict[str, Any]]) -> int:
    return len(json.dumps(chunks))  # what /runsync returns for a streaming handler: the list of chunks


def test_payload_guard_without_storage_names_url_delivery(bare_worker):
    chunks = chunks_of(bare_worker, {"id": "big", "input": BIG})
    assert response_bytes(chunks) <= LIMIT_MB * 2**20
    images = [c["image"] for c in chunks if "image" in c]
    errors = [c["image_error"] for c in chunks if "image_error" in c]
    assert len(images) + len(errors) == 5 and errors, "5 noise images of 256² cannot fit in 1 MB"
    for error in errors:
        assert error["code"] == "payload_too_large" and 'use delivery "url"' in error["message"]


def test_payload_guard_with_storage_switches_to_url(worker):
    chunks = chunks_of(worker, {"id": "big-stored", "input": BIG})
    assert response_bytes(chunks) <= LIMIT_MB * 2**20
    images = [c["image"] for c in chunks if "image" in c]
    assert len(images) == 5 and not any("image_error" in c for c in chunks)
    inline = [i for i in images if "base64" in i]
    stored = [i for i in images if "url" in i]
    assert inline and stored and len(inline) + len(stored) == 5
    assert "uploaded instead" in chunks[-1]["summary"]["delivery_note"]
    assert all(fetch(i["url"])[:4] == b"\x89PNG" for i in stored)


def test_payload_guard_refuses_up_front_or_switches_when_base64_cannot_fit(bare_worker, worker):
    too_big = {"prompt": "x", "num_images": 16, "width": 1024, "height": 1024, "output_format": "png"}
    result = run(bare_worker, too_big)
    assert result["error"].startswith("payload_too_large: delivery: 16 png images need at least")
    assert 'use delivery "url"' in result["error"]
    plan = Delivery.plan("base64", worker.store, LIMIT_MB * 2**20, 1024 * 1024, 16, "png", io=IO,
                         chunk_limit_bytes=1_000_000)
    assert plan.method == "url" and plan.switched_to_url


def test_upload_failure_that_does_not_fit_inline_is_a_named_image_error():
    dead = StorageConfig(bucket="b", access_key_id="a", secret_access_key="s", endpoint_url="http://127.0.0.1:9",
                         connect_timeout_s=0.5, max_attempts=2)
    delivery = Delivery("url", ImageStore(dead), limit_bytes=17 * 1024, use_cache=False, io=IO,
                        chunk_limit_bytes=1_000_000)
    small = delivery.deliver("j", 0, 5, 64, 64, "png", b"\x89PNG" + bytes(100), {})
    assert isinstance(small, PendingUpload)  # handed to the storage pool, not uploaded on this thread
    small = asyncio.run(delivery.settle(small))
    assert "delivery_fallback" in small.entry and small.entry["base64"]
    large = asyncio.run(delivery.settle(delivery.deliver("j", 1, 6, 64, 64, "png", b"\x89PNG" + bytes(4000), {})))
    assert large.entry is None and large.error_code == "upload_failed"
    assert large.error_message == "upload failed (unreachable) and the image does not fit inline"


def test_url_delivery_needs_a_store():
    with pytest.raises(JobError, match="url delivery needs storage"):
        Delivery.plan("url", None, 2**20, 64 * 64, 1, "png", io=IO, chunk_limit_bytes=1_000_000)


# -- RunPod's 1 MB stream chunk -----------------------------------------------------------------
def test_an_image_certain_to_pass_the_chunk_limit_is_refused_before_the_gpu_or_sent_to_storage(bare_worker, worker):
    calls = engine_calls(bare_worker)
    result = run(bare_worker, {"prompt": "x", "width": 2048, "height": 2048, "output_format": "png"})
    assert result["error"].startswith("payload_too_large: delivery: one png image of 4194304 pixels needs at least")
    assert "stream chunk limit (MAX_CHUNK_BYTES)" in result["error"]
    assert engine_calls(bare_worker) == calls  # decided before any GPU work
    plan = Delivery.plan("base64", worker.store, 10 * 2**20, 2048 * 2048, 1, "png", io=IO, chunk_limit_bytes=1_000_000)
    assert plan.method == "url" and plan.switched_to_url
    # the default format at the largest size fits: its lower bound is far under one chunk
    assert Delivery.plan("base64", None, 10 * 2**20, 2048 * 2048, 1, "webp", io=IO,
                         chunk_limit_bytes=1_000_000).method == "base64"


def test_a_real_chunk_over_the_limit_goes_to_storage_or_is_a_named_image_error(worker):
    noise = os.urandom(120_000)  # 160 KB of base64: over a 100 KB chunk limit, well within the result limit
    bare = Delivery("base64", None, 10 * 2**20, use_cache=False, io=IO, chunk_limit_bytes=100_000)
    refused = bare.deliver("j", 0, 1, 64, 64, "png", noise, {})
    assert refused.error_code == "payload_too_large" and "100000" not in refused.error_message
    assert refused.error_message.startswith("this image would pass the 0.1 MB stream chunk limit")
    assert bare.deliver("j", 1, 2, 64, 64, "png", noise[:50_000], {}).entry["base64"]  # a smaller one is inline
    stored = Delivery("base64", worker.store, 10 * 2**20, use_cache=False, io=IO, chunk_limit_bytes=100_000)
    uploaded = asyncio.run(stored.settle(stored.deliver("chunky", 0, 1, 64, 64, "png", noise, {})))
    assert uploaded.entry["key"] == "z-image/chunky/00-1.png" and fetch(uploaded.entry["url"]) == noise
    assert uploaded.switched_to_url and not stored.switched_to_url  # per image, not written back


# -- a storage endpoint that accepts connections and never answers ------------------------------
async def timed(worker: Worker, job: dict[str, Any], origin: float) -> tuple[dict[str, Any], float]:
    result = await collect(worker.run_job, job)
    return result, time.monotonic() - origin


def test_hung_storage_holds_neither_encoding_nor_other_jobs(hung_worker, hung_server):
    """Four uploads in flight to a hung bucket (as many as the encode threads: once they ran there),
    then a plain job: it is not held by them, and the url job ends by its deadline, every image
    inline. The bucket is the job's s3Config, so no cache lookup comes first."""
    s3_config = {"accessId": ACCESS_KEY, "accessSecret": SECRET_KEY, "bucketName": "b", "endpointUrl": hung_server.url}
    url_job = {"id": "on-hung", "input": {"prompt": "a hung bucket", "num_images": 4, "seed": 5, "delivery": "url",
                                           **SMALL}, "s3Config": s3_config}
    plain_job = {"id": "plain", "input": {"prompt": "a plain job", "seed": 6, **SMALL}}
    assert hung_worker.settings.encode_threads == 4

    async def both():
        origin = time.monotonic()
        held = len(hung_server.held)
        url_task = asyncio.create_task(timed(hung_worker, url_job, origin))
        while len(hung_server.held) < held + 4:  # every image's upload holds a connection (and a thread)
            await asyncio.sleep(0.02)
        submitted = time.monotonic()
        plain, _ = await timed(hung_worker, plain_job, origin)
        plain_s = time.monotonic() - submitted
        return plain, plain_s, await url_task

    plain, plain_s, (hung, hung_s) = asyncio.run(both())
    print(f"\nplain job took {plain_s:.2f} s with 4 uploads hung; url job on hung storage {hung_s:.2f} s")
    assert plain["errors"] == [] and plain["images"][0]["base64"]
    assert plain_s < HUNG_DELIVERY_TIMEOUT_S  # not held until the hung uploads' deadline
    assert hung["images_completed"] == 4
    for image in hung["images"]:
        assert image["delivery_fallback"] == (
            f"upload not done within DELIVERY_TIMEOUT_S={HUNG_DELIVERY_TIMEOUT_S} s: returned inline")
    # ended by the delivery deadline (the fallback says so), not by JOB_TIMEOUT_S
    assert HUNG_DELIVERY_TIMEOUT_S <= hung_s < 60


def test_hung_deployment_bucket_lookups_are_misses_and_the_job_ends_in_bounded_time(hung_worker):
    started = time.monotonic()
    result = run(hung_worker, {"prompt": "a hung cache", "num_images": 2, "seed": 9, "delivery": "url", **SMALL})
    elapsed = time.monotonic() - started
    print(f"\nurl job on the hung deployment bucket: {elapsed:.2f} s")
    assert result["images_from_cache"] == 0 and result["images_completed"] == 2  # lookups: misses after 1 s
    assert all(i["delivery_fallback"].startswith("upload not done within") for i in result["images"])
    # CACHE_LOOKUP_TIMEOUT_S + generation + DELIVERY_TIMEOUT_S, below JOB_TIMEOUT_S=60
    assert 1 + HUNG_DELIVERY_TIMEOUT_S <= elapsed < 60


def test_webp_is_the_default_and_png_ignores_output_quality_in_cache_key_and_echo(worker):
    default = run(worker, {"prompt": "a quiet harbour", "seed": 1200, **SMALL})
    assert (default["settings"]["output_format"], default["settings"]["output_quality"]) == ("webp", 90)
    assert b64(default["images"][0])[:4] == b"RIFF"
    job = {"prompt": "a quiet harbour", "seed": 1200, "delivery": "url", "output_format": "png", **SMALL}
    first = run(worker, {**job, "output_quality": 40})
    assert first["settings"]["output_quality"] is None and first["images_from_cache"] == 0
    again = run(worker, {**job, "output_quality": 95})  # PNG is lossless: the same image, the same key
    assert again["images_from_cache"] == 1 and again["images"][0]["key"] == first["images"][0]["key"]
    assert run(worker, {**job, "output_format": "webp", "output_quality": 40})["images_from_cache"] == 0


def test_an_encode_or_delivery_crash_is_that_images_error_not_a_hung_job(worker, monkeypatch):
    import serving.job_runner as worker_module

    real, calls, lock = worker_module.encode_image, [], threading.Lock()

    def flaky(*args, **kwargs):
        with lock:
            calls.append(1)
            if len(calls) == 2:
                raise MemoryError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_module, "encode_image", flaky)
    result = run(worker, {"prompt": "a paper boat", "num_images": 3, "seed": 60, "delivery": "url", **SMALL})
    assert len(result["images"]) == 2 and len(result["errors"]) == 1
    (error,) = result["errors"]
    assert error["code"] == "internal_error" and "MemoryError" in error["message"]  # not "timeout" after JOB_TIMEOUT_S
    assert result["timings_ms"]["total"] < 30_000


def test_cache_key_covers_the_numerics_that_change_pixels(worker, monkeypatch):
    job = {"prompt": "a tin robot", "seed": 1000, "delivery": "url", **SMALL}
    assert run(worker, job)["images_from_cache"] == 0
    assert run(worker, job)["images_from_cache"] == 1
    # the same model with FP8 weights makes other pixels: it must not be served this worker's images
    monkeypatch.setattr(worker.engine.acceleration, "fp8_layers", 12)
    assert run(worker, job)["images_from_cache"] == 0
    monkeypatch.setattr(worker.engine.acceleration, "fp8_layers", 0)
    monkeypatch.setattr(worker.engine, "dtype", __import__("torch").bfloat16)
    assert run(worker, job)["images_from_cache"] == 0


def png_b64(rgb) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def face(seed: int):
    """Mid-grey noise: the demo face detector finds exactly one face in it."""
    import numpy as np

    return np.random.default_rng(seed).integers(60, 200, size=(96, 128, 3), dtype=np.uint8)


def test_consistent_mode_images_are_cached_per_reference(worker):
    job = {"prompt": "portrait", "mode": "consistent", "reference_image": png_b64(face(42)), "seed": 5,
           "delivery": "url", "width": 64, "height": 64, "steps": 2, "guidance_scale": 3.5}
    first = run(worker, job)
    assert first["mode"] == "consistent" and first["images_from_cache"] == 0 and first["batch_sizes"] == [1]
    again = run(worker, job)
    assert again["images_from_cache"] == 1 and again["batch_sizes"] == [] and again["identity_cache_hit"] is True
    assert again["images"][0]["key"] == first["images"][0]["key"]
    other = run(worker, {**job, "reference_image": png_b64(face(43))})
    assert other["images_from_cache"] == 0 and other["images"][0]["key"] != first["images"][0]["key"]
    weaker = run(worker, {**job, "id_weight": 0.5})
    assert weaker["images_from_cache"] == 0
