"""serving.storage against a real S3 API (moto server on loopback), fetched over real HTTP."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from serving.storage import (
    CACHE_CONTROL,
    ImageStore,
    StorageConfig,
    StorageConfigError,
    StorageError,
    default_region,
    get_client,
    result_cache_key,
    storage_config_from_env,
    storage_config_from_job,
)
from tests.serving.conftest import ACCESS_KEY, FAST_RETRY, SECRET_KEY, FaultProxy

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(4096)


@pytest.fixture
def store(config: StorageConfig):
    with ImageStore(config, retry=FAST_RETRY) as s:
        yield s


def via(proxy: FaultProxy, config: StorageConfig) -> ImageStore:
    return ImageStore(replace(config, endpoint_url=proxy.url), retry=FAST_RETRY)


# ---- delivery -------------------------------------------------------------------------------

def test_put_returns_presigned_url_that_serves_the_bytes(store: ImageStore) -> None:
    key = store.job_key("job-1", 0, 42, "png")
    stored = store.put(key, PNG, "image/png")

    assert stored.key == "z-image/job-1/00-42.png"
    query = parse_qs(urlsplit(stored.url).query)
    assert query["X-Amz-Expires"] == ["3600"]
    assert "X-Amz-Signature" in query
    response = requests.get(stored.url, timeout=5)
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["Cache-Control"] == CACHE_CONTROL
    # the bucket is private: without the signature the same object is refused
    assert requests.get(stored.url.split("?")[0], timeout=5).status_code == 403


def test_object_metadata_via_head(store: ImageStore, s3, bucket: str) -> None:
    key = store.job_key("job-2", 3, 7, "webp")
    store.put(key, b"RIFF....WEBP", "image/webp")

    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentType"] == "image/webp"
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    assert head["ContentLength"] == len(b"RIFF....WEBP")


def test_public_base_url_is_plain_and_fetchable(config: StorageConfig, moto_endpoint: str, s3) -> None:
    s3.put_bucket_policy(Bucket=config.bucket, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                       "Resource": f"arn:aws:s3:::{config.bucket}/*"}]}))
    public = replace(config, public_base_url=f"{moto_endpoint}/{config.bucket}/")
    with ImageStore(public) as store:
        stored = store.put(store.job_key("job-3", 1, 5, "jpg"), b"\xff\xd8jpeg", "image/jpeg")

    assert stored.url == f"{moto_endpoint}/{config.bucket}/z-image/job-3/01-5.jpg"
    assert requests.get(stored.url, timeout=5).content == b"\xff\xd8jpeg"


def test_uploads_send_no_flexible_checksums_but_content_md5(proxy: FaultProxy, config: StorageConfig) -> None:
    """R2, GCS and B2 reject boto3's default CRC32 checksum headers/trailers. A host name (not
    an IP, for which botocore always uses paths) shows path-style addressing is chosen."""
    by_name = replace(config, endpoint_url=proxy.url.replace("127.0.0.1", "localhost"))
    with ImageStore(by_name, retry=FAST_RETRY) as store:
        store.put("k/one.png", PNG, "image/png")

    (put,) = [r for r in proxy.requests if r.method == "PUT"]
    names = {name.lower() for name in put.headers}
    assert not any(n.startswith("x-amz-checksum") or n == "x-amz-sdk-checksum-algorithm" for n in names)
    assert "x-amz-trailer" not in names
    assert "content-md5" in names
    assert put.path.startswith(f"/{config.bucket}/")  # path-style addressing on a custom endpoint


def test_submit_put_overlaps_uploads(proxy: FaultProxy, config: StorageConfig) -> None:
    proxy.delay_s = 0.3
    with via(proxy, replace(config, upload_workers=4)) as store:
        started = time.monotonic()
        futures = [store.submit_put(store.job_key("job-4", i, i, "png"), PNG, "image/png") for i in range(4)]
        results = [f.result(timeout=10) for f in futures]
        elapsed = time.monotonic() - started

    assert [r.key for r in results] == [f"z-image/job-4/{i:02d}-{i}.png" for i in range(4)]
    assert elapsed < 0.9, f"4 uploads of 0.3 s each took {elapsed:.2f} s: not overlapped"
    assert all(requests.get(r.url, timeout=5).content == PNG for r in results)


def test_per_job_s3config_writes_to_its_own_bucket(config: StorageConfig, make_bucket, s3,
                                                   moto_endpoint: str) -> None:
    other = make_bucket()
    defaults = replace(config, public_base_url="https://cdn.example.com", url_ttl_s=600)
    job_config = storage_config_from_job(
        {"accessId": "job-key", "accessSecret": "job-secret", "bucketName": other,
         "endpointUrl": moto_endpoint}, defaults)
    with ImageStore(job_config) as store:
        stored = store.put(store.job_key("job-5", 0, 1, "png"), PNG, "image/png")

    assert requests.get(stored.url, timeout=5).content == PNG
    assert stored.url.startswith(f"{moto_endpoint}/{other}/")  # not the default bucket's CDN
    assert "X-Amz-Expires=600" in stored.url
    assert s3.list_objects_v2(Bucket=other)["KeyCount"] == 1
    assert s3.list_objects_v2(Bucket=config.bucket)["KeyCount"] == 0
    assert job_config.result_cache is False


@pytest.mark.parametrize("missing", ["accessId", "accessSecret", "bucketName", "endpointUrl"])
def test_per_job_s3config_names_the_missing_field(missing: str, config: StorageConfig) -> None:
    job = {"accessId": "a", "accessSecret": "s", "bucketName": "bkt", "endpointUrl": "https://x.example"}
    job[missing] = ""
    with pytest.raises(StorageConfigError, match=f"s3Config.{missing}"):
        storage_config_from_job(job, config)
    del job[missing]
    with pytest.raises(StorageConfigError, match=f"s3Config.{missing}"):
        storage_config_from_job(job, None)


# ---- failures and retries -------------------------------------------------------------------

def test_transient_503_is_retried_then_succeeds(proxy: FaultProxy, config: StorageConfig) -> None:
    proxy.faults = [503, 500]
    with via(proxy, config) as store:
        stored = store.put("z-image/job-6/00-1.png", PNG, "image/png")

    assert proxy.count("PUT") == 3
    assert requests.get(stored.url.replace(proxy.url, config.endpoint_url), timeout=5).content == PNG


def test_dropped_connection_is_retried(proxy: FaultProxy, config: StorageConfig) -> None:
    proxy.faults = ["drop"]
    with via(proxy, config) as store:
        store.put("z-image/job-7/00-1.png", PNG, "image/png")
    assert proxy.count("PUT") == 2


def test_persistent_5xx_gives_up_with_transient_storage_error(proxy: FaultProxy, config: StorageConfig) -> None:
    proxy.faults = [503] * 10
    with via(proxy, config) as store:
        future = store.submit_put("z-image/job-8/00-1.png", PNG, "image/png")
        with pytest.raises(StorageError) as info:
            future.result(timeout=10)

    assert info.value.transient is True
    assert info.value.attempts == FAST_RETRY.max_attempts == proxy.count("PUT")
    assert info.value.key == "z-image/job-8/00-1.png"
    assert info.value.code == "SlowDown"


def test_403_is_not_retried(proxy: FaultProxy, config: StorageConfig) -> None:
    proxy.faults = [403, 403, 403]
    with via(proxy, config) as store, pytest.raises(StorageError) as info:
        store.put("z-image/job-9/00-1.png", PNG, "image/png")

    assert proxy.count("PUT") == 1
    assert (info.value.transient, info.value.attempts, info.value.code) == (False, 1, "AccessDenied")


def test_missing_bucket_is_not_retried(proxy: FaultProxy, config: StorageConfig) -> None:
    with via(proxy, replace(config, bucket="no-such-bucket-here"), ) as store:
        with pytest.raises(StorageError) as info:
            store.put("z-image/x.png", PNG, "image/png")
    assert proxy.count("PUT") == 1
    assert (info.value.transient, info.value.code) == (False, "NoSuchBucket")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_transient_after_retries(config: StorageConfig) -> None:
    down = replace(config, endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    with ImageStore(down, retry=FAST_RETRY) as store, pytest.raises(StorageError) as info:
        store.put("z-image/y.png", PNG, "image/png")
    assert info.value.transient is True
    assert info.value.attempts == FAST_RETRY.max_attempts


# ---- result cache ---------------------------------------------------------------------------

PARAMS = {
    "model": {"id": "Tongyi-MAI/Z-Image-Turbo", "revision": "abc123", "dtype": "bfloat16"},
    "prompt": "a red fox in snow",
    "negative_prompt": "",
    "width": 1024,
    "height": 1024,
    "steps": 8,
    "guidance_scale": 0.0,
    "sampler": "euler",
    "seed": 1234,
    "format": "webp",
    "quality": 90,
}


def _changed(value: object) -> object:
    if isinstance(value, dict):
        return {**value, "revision": "def456"}
    if isinstance(value, str):
        return value + "x"
    return value + 1  # type: ignore[operator]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_result_cache_key_changes_with_every_parameter(name: str) -> None:
    assert result_cache_key({**PARAMS, name: _changed(PARAMS[name])}) != result_cache_key(PARAMS)


def test_result_cache_key_ignores_order_and_number_spelling() -> None:
    reordered = {k: (dict(reversed(v.items())) if isinstance(v, dict) else v)
                 for k, v in reversed(PARAMS.items())}
    assert result_cache_key(reordered) == result_cache_key(PARAMS)
    assert result_cache_key({**PARAMS, "guidance_scale": 0}) == result_cache_key(PARAMS)
    assert len(result_cache_key(PARAMS)) == 64


def test_result_cache_key_refuses_ambiguous_values() -> None:
    with pytest.raises(TypeError):
        result_cache_key({**PARAMS, "extra": object()})
    with pytest.raises(ValueError):
        result_cache_key({**PARAMS, "guidance_scale": float("nan")})


def test_lookup_hit_and_miss(store: ImageStore) -> None:
    key = store.cache_key(PARAMS, "webp")
    assert key == f"z-image/cache/{result_cache_key(PARAMS)}.webp"
    assert store.lookup(key) is None

    store.put(key, b"webp-bytes", "image/webp")
    hit = store.lookup(key)
    assert hit is not None and hit.key == key
    assert requests.get(hit.url, timeout=5).content == b"webp-bytes"


def test_lookup_errors_are_a_logged_miss(proxy: FaultProxy, config: StorageConfig, caplog) -> None:
    with ImageStore(config) as direct:
        direct.put("z-image/cache/present.png", PNG, "image/png")
    proxy.faults = [500]
    caplog.set_level(logging.WARNING, logger="serving.storage")
    with via(proxy, config) as store:
        assert store.lookup("z-image/cache/present.png") is None
        assert store.lookup("z-image/cache/present.png") is not None  # the fault was one-off
    assert proxy.count("HEAD") == 2
    assert "HTTP 500" in caplog.text

    down = replace(config, endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    with ImageStore(down) as store:
        assert store.lookup("z-image/cache/present.png") is None


# ---- clients, secrets -----------------------------------------------------------------------

def test_one_client_per_connection_settings_shared_across_threads(config: StorageConfig) -> None:
    fresh = replace(config, access_key_id="AKIAUNIQUE" + str(time.monotonic_ns()))
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(get_client(fresh))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen}) == 1
    assert get_client(replace(fresh, bucket="another-bucket")) is seen[0]
    assert get_client(replace(fresh, secret_access_key="other")) is not seen[0]


def test_secrets_never_logged_nor_in_repr(proxy: FaultProxy, config: StorageConfig, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="serving.storage")
    proxy.faults = [503, 403, 500]
    with via(proxy, config) as store:
        with pytest.raises(StorageError) as info:
            store.put("z-image/s.png", PNG, "image/png")
        store.lookup("z-image/s.png")
        stored = store.put("z-image/s.png", PNG, "image/png")

    text = caplog.text + str(info.value) + repr(config)
    assert caplog.records, "expected the store to log its retries and uploads"
    for secret in (SECRET_KEY, ACCESS_KEY, urlsplit(stored.url).query, "X-Amz-Signature"):
        assert secret not in text


# ---- configuration from the environment ------------------------------------------------------

BASE_ENV = {"BUCKET_ENDPOINT_URL": "https://acc.r2.cloudflarestorage.com",
            "BUCKET_ACCESS_KEY_ID": "id", "BUCKET_SECRET_ACCESS_KEY": "secret", "BUCKET_NAME": "images"}


def test_env_unset_means_no_storage() -> None:
    assert storage_config_from_env({}) is None
    assert storage_config_from_env({"BUCKET_NAME": "  ", "OTHER": "x"}) is None


def test_env_defaults() -> None:
    config = storage_config_from_env(BASE_ENV)
    assert config == StorageConfig(bucket="images", access_key_id="id", secret_access_key="secret",
                                   endpoint_url="https://acc.r2.cloudflarestorage.com", region="auto",
                                   key_prefix="z-image", public_base_url=None, url_ttl_s=604800,
                                   result_cache=True, upload_workers=4)


def test_env_overrides() -> None:
    config = storage_config_from_env({
        **BASE_ENV, "BUCKET_REGION": "eu-west-1", "BUCKET_KEY_PREFIX": "/prod/img/",
        "BUCKET_PUBLIC_BASE_URL": "https://cdn.example.com", "BUCKET_URL_TTL_S": "3600",
        "RESULT_CACHE": "off", "BUCKET_UPLOAD_WORKERS": "8"})
    assert config is not None
    assert (config.region, config.key_prefix, config.public_base_url, config.url_ttl_s,
            config.result_cache, config.upload_workers) == (
        "eu-west-1", "prod/img", "https://cdn.example.com", 3600, False, 8)


@pytest.mark.parametrize(("env", "message"), [
    ({"BUCKET_ENDPOINT_URL": "https://minio:9000"},
     "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY, BUCKET_NAME"),
    ({**BASE_ENV, "BUCKET_NAME": "", "BUCKET_ENDPOINT_URL": "https://imgs.s3.us-west-2.amazonaws.com"},
     "names bucket 'imgs'"),
    ({**BASE_ENV, "BUCKET_URL_TTL_S": "604801"}, "url_ttl_s"),
    ({**BASE_ENV, "BUCKET_URL_TTL_S": "7d"}, "BUCKET_URL_TTL_S"),
    ({**BASE_ENV, "RESULT_CACHE": "maybe"}, "RESULT_CACHE"),
    ({**BASE_ENV, "BUCKET_PUBLIC_BASE_URL": "cdn.example.com"}, "public_base_url"),
])
def test_env_errors_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(StorageConfigError, match=message):
        storage_config_from_env(env)


@pytest.mark.parametrize(("endpoint", "region"), [
    (None, "us-east-1"),
    ("https://s3.eu-central-1.amazonaws.com", "eu-central-1"),
    ("https://s3.us-west-004.backblazeb2.com", "us-west-004"),
    ("https://0123abcd.r2.cloudflarestorage.com", "auto"),
    ("https://storage.googleapis.com", "auto"),
    ("http://minio.internal:9000", "us-east-1"),
])
def test_default_region_per_provider(endpoint: str | None, region: str) -> None:
    assert default_region(endpoint) == region
