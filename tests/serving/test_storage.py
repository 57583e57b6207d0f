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

from serving.storage import CACHE_CONTROL, ImageStore, StorageError, get_client, result_cache_key
from serving.storage_config import StorageConfig, StorageConfigError, default_region, storage_config_from_job
from tests.serving.conftest import ACCESS_KEY, SECRET_KEY, FaultProxy

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(4096)


@pytest.fixture
def store(config: StorageConfig) -> ImageStore:
    return ImageStore(config)


def via(proxy: FaultProxy, config: StorageConfig) -> ImageStore:
    return ImageStore(replace(config, endpoint_url=proxy.url))


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
    store = ImageStore(public)
    stored = store.put(store.job_key("job-3", 1, 5, "jpg"), b"\xff\xd8jpeg", "image/jpeg")

    assert stored.url == f"{moto_endpoint}/{config.bucket}/z-image/job-3/01-5.jpg"
    assert requests.get(stored.url, timeout=5).content == b"\xff\xd8jpeg"


def test_uploads_send_no_flexible_checksums_but_content_md5(proxy: FaultProxy, config: StorageConfig) -> None:
    """R2, GCS and B2 reject boto3's default CRC32 checksum headers/trailers. A host name (not
    an IP, for which botocore always uses paths) shows path-style addressing is chosen."""
    by_name = replace(config, endpoint_url=proxy.url.replace("127.0.0.1", "localhost"))
    ImageStore(by_name).put("k/one.png", PNG, "image/png")

    (put,) = [r for r in proxy.requests if r.method == "PUT"]
    names = {name.lower() for name in put.headers}
    assert not any(n.startswith("x-amz-checksum") or n == "x-amz-sdk-checksum-algorithm" for n in names)
    assert "x-amz-trailer" not in names
    assert "content-md5" in names
    assert put.path.startswith(f"/{config.bucket}/")  # path-style addressing on a custom endpoint


def test_per_job_s3config_writes_to_its_own_bucket(config: StorageConfig, make_bucket, s3,
                                                   moto_endpoint: str) -> None:
    other = make_bucket()
    defaults = replace(config, public_base_url="https://cdn.example.com", url_ttl_s=600)
    job_config = storage_config_from_job(
        {"accessId": "job-key", "accessSecret": "job-secret", "bucketName": other,
         "endpointUrl": moto_endpoint}, defaults, allow_private=True)  # moto is on loopback
    store = ImageStore(job_config)
    stored = store.put(store.job_key("job-5", 0, 1, "png"), PNG, "image/png")

    assert requests.get(stored.url, timeout=5).content == PNG
    assert stored.url.startswith(f"{moto_endpoint}/{other}/")  # not the default bucket's CDN
    assert "X-Amz-Expires=600" in stored.url
    assert s3.list_objects_v2(Bucket=other)["KeyCount"] == 1
    assert s3.list_objects_v2(Bucket=config.bucket)["KeyCount"] == 0
    assert job_config.result_cache is False


JOB = {"accessId": "a", "accessSecret": "s", "bucketName": "bkt", "endpointUrl": "https://x.example"}


@pytest.mark.parametrize("missing", ["accessId", "accessSecret", "bucketName", "endpointUrl"])
def test_per_job_s3config_names_the_missing_field(missing: str, config: StorageConfig) -> None:
    with pytest.raises(StorageConfigError) as info:
        storage_config_from_job({**JOB, missing: " "}, config, allow_private=True)
    assert (info.value.field, info.value.rule) == (f"s3Config.{missing}", "is missing or empty")
    with pytest.raises(StorageConfigError, match=f"^s3Config.{missing}: is missing"):
        storage_config_from_job({k: v for k, v in JOB.items() if k != missing}, None, allow_private=True)


@pytest.mark.parametrize(("value", "rule"), [
    (12345, "must be a string"), (["s"], "must be a string"),
    ("key\r\nX-Injected: 1", "must not contain control characters"),
])
def test_per_job_s3config_rejects_non_strings_and_header_breaking_values(value, rule) -> None:
    for name in ("accessId", "accessSecret", "bucketName"):
        with pytest.raises(StorageConfigError) as info:
            storage_config_from_job({**JOB, name: value}, None, allow_private=True)
        assert (info.value.field, info.value.rule) == (f"s3Config.{name}", rule)


@pytest.mark.parametrize("endpoint", [
    "http://127.0.0.1:9000", "http://localhost:9000", "http://10.0.0.5", "http://192.168.1.10:9000",
    "http://172.16.0.1", "http://169.254.169.254", "http://[::1]:9000", "http://[::ffff:127.0.0.1]:9000",
    "http://[::ffff:169.254.169.254]", "http://[fe80::1]", "http://0.0.0.0:9000", "http://100.64.0.1",
    "http://no-such-host.invalid",
])
def test_job_endpoint_must_resolve_to_public_addresses(endpoint: str) -> None:
    with pytest.raises(StorageConfigError) as info:
        storage_config_from_job({**JOB, "endpointUrl": endpoint}, None)
    # one message for private and unresolvable: nothing about the host, nothing to map a network with
    assert (info.value.field, info.value.rule) == ("s3Config.endpointUrl", "must resolve to public addresses only")
    assert storage_config_from_job({**JOB, "endpointUrl": endpoint}, None, allow_private=True).endpoint_url == endpoint


def test_job_endpoint_on_a_public_address_is_accepted() -> None:
    config = storage_config_from_job({**JOB, "endpointUrl": "https://93.184.215.14:9000"}, None)
    assert (config.endpoint_url, config.region, config.result_cache) == (
        "https://93.184.215.14:9000", "us-east-1", False
    )


# ---- failures and retries (botocore's standard mode) -------------------------------------------

def test_transient_503_is_retried_then_succeeds(proxy: FaultProxy, config: StorageConfig) -> None:
    proxy.faults = [503, 500]
    stored = via(proxy, config).put("z-image/job-6/00-1.png", PNG, "image/png")

    assert proxy.count("PUT") == 3
    assert requests.get(stored.url.replace(proxy.url, config.endpoint_url), timeout=5).content == PNG


def test_dropped_connection_is_retried(proxy: FaultProxy, config: StorageConfig) -> None:
    proxy.faults = ["drop"]
    via(proxy, config).put("z-image/job-7/00-1.png", PNG, "image/png")
    assert proxy.count("PUT") == 2


def test_persistent_5xx_gives_up_after_max_attempts(proxy: FaultProxy, config: StorageConfig) -> None:
    proxy.faults = [503] * 10
    with pytest.raises(StorageError) as info:
        via(proxy, replace(config, max_attempts=2)).put("z-image/job-8/00-1.png", PNG, "image/png")

    assert info.value.attempts == 2 == proxy.count("PUT")
    assert (info.value.key, info.value.code) == ("z-image/job-8/00-1.png", "SlowDown")


def test_403_is_not_retried(proxy: FaultProxy, config: StorageConfig) -> None:
    proxy.faults = [403, 403, 403]
    with pytest.raises(StorageError) as info:
        via(proxy, config).put("z-image/job-9/00-1.png", PNG, "image/png")

    assert proxy.count("PUT") == 1
    assert (info.value.attempts, info.value.code) == (1, "AccessDenied")


def test_missing_bucket_is_not_retried(proxy: FaultProxy, config: StorageConfig) -> None:
    with pytest.raises(StorageError) as info:
        via(proxy, replace(config, bucket="no-such-bucket-here")).put("z-image/x.png", PNG, "image/png")
    assert proxy.count("PUT") == 1
    assert info.value.code == "NoSuchBucket"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_refused_and_hung_endpoints_fail_alike_within_the_timeouts(config: StorageConfig, hung_endpoint: str) -> None:
    """No port probing through the error: refused and never-answering give the same code."""
    codes = []
    for endpoint in (f"http://127.0.0.1:{_closed_port()}", hung_endpoint):
        store = ImageStore(replace(config, endpoint_url=endpoint, connect_timeout_s=0.3, read_timeout_s=0.3,
                                   max_attempts=2))
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            store.put("z-image/y.png", PNG, "image/png")
        # two attempts of at most connect 0.3 s + botocore's 1 s wait for "100 Continue" + read 0.3 s,
        # and one non-throttling backoff of at most 0.05 s: 3.25 s, with room for a loaded CI machine
        assert time.monotonic() - started < 8
        assert info.value.attempts == 2
        assert endpoint.split(":")[-1] not in str(info.value)
        codes.append(info.value.code)
    assert codes == ["unreachable", "unreachable"]


def test_a_hung_lookup_is_one_bounded_attempt(config: StorageConfig, hung_endpoint: str) -> None:
    store = ImageStore(replace(config, endpoint_url=hung_endpoint, connect_timeout_s=0.3, read_timeout_s=0.5))
    store._lookup_client  # noqa: B018 - made before the clock starts: building a client takes a while
    started = time.monotonic()
    assert store.lookup("z-image/cache/x.png") is None
    assert time.monotonic() - started < 4  # one attempt of 0.3 + 0.5 s: lookups are not retried


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
    ImageStore(config).put("z-image/cache/present.png", PNG, "image/png")
    proxy.faults = [500]
    caplog.set_level(logging.WARNING, logger="serving.storage")
    store = via(proxy, config)
    assert store.lookup("z-image/cache/present.png") is None  # one attempt, no retry of the 500
    assert store.lookup("z-image/cache/present.png") is not None  # the fault was one-off
    assert proxy.count("HEAD") == 2
    assert "HTTP 500" in caplog.text

    down = replace(config, endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    assert ImageStore(down).lookup("z-image/cache/present.png") is None


# ---- clients, secrets -----------------------------------------------------------------------

def test_one_client_per_connection_settings_shared_across_threads(config: StorageConfig) -> None:
    fresh = replace(config, access_key_id="AKIAUNIQUE" + str(time.monotonic_ns()))
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(get_client(fresh, 3))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen}) == 1
    assert get_client(replace(fresh, bucket="another-bucket"), 3) is seen[0]
    assert get_client(replace(fresh, secret_access_key="other"), 3) is not seen[0]
    assert get_client(fresh, 1) is not seen[0]


def test_secrets_never_logged_nor_in_repr(proxy: FaultProxy, config: StorageConfig, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="serving.storage")
    proxy.faults = [503, 403, 500]
    store = via(proxy, config)
    with pytest.raises(StorageError) as info:
        store.put("z-image/s.png", PNG, "image/png")
    store.lookup("z-image/s.png")
    stored = store.put("z-image/s.png", PNG, "image/png")

    text = caplog.text + str(info.value) + repr(config)
    assert caplog.records, "expected the store to log its retries and uploads"
    for secret in (SECRET_KEY, ACCESS_KEY, urlsplit(stored.url).query, "X-Amz-Signature"):
        assert secret not in text


# ---- regions ---------------------------------------------------------------------------------

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
