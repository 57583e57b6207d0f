"""S3-compatible delivery of generated images (AWS S3, Cloudflare R2, MinIO, Backblaze B2, GCS).

Configuration comes in as a `StorageConfig`: the deployment's, built once by `serving.settings`,
or a job's, built from RunPod's `s3Config` by `storage_config_from_job` (which applies the same
public-address rules as a reference image URL). Nothing here reads the environment.

Failure contract for the worker: `ImageStore.put` either returns a `StoredObject` or raises
`StorageError` (botocore's `standard` retry mode has retried what is transient by then), so one
failed upload becomes one per-image fallback, never a failed job. `ImageStore.lookup` never
raises. Both block: the worker runs them on its storage pool under a deadline (serving/delivery.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from cachetools import LRUCache, cached

from serving.errors import JobError
from serving.reference_image import check_public_address

log = logging.getLogger(__name__)

# SigV4 presigned URLs cannot live longer than 7 days on any S3-compatible service.
MAX_URL_TTL_S = 604800
CACHE_CONTROL = "public, max-age=31536000, immutable"
UNREACHABLE = "unreachable"  # one code for refused, timed out, DNS: a job learns nothing about ports
PUBLIC_ONLY = "must resolve to public addresses only"


class StorageConfigError(ValueError):
    """Storage settings are missing or invalid. `field` names the setting or `s3Config` field."""

    def __init__(self, rule: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {rule}" if field else rule)
        self.field = field
        self.rule = rule


class StorageError(Exception):
    """An upload failed for good: `code` is the S3 error code, or `unreachable` for any
    connection-level failure; `attempts` how many requests botocore made."""

    def __init__(self, message: str, *, key: str, attempts: int, code: str) -> None:
        super().__init__(message)
        self.key = key
        self.attempts = attempts
        self.code = code


@dataclass(frozen=True)
class StorageConfig:
    """Everything needed to reach one bucket. Secrets are excluded from repr so the config can
    be logged or appear in tracebacks safely."""

    bucket: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    endpoint_url: str | None = None
    region: str = "us-east-1"
    key_prefix: str = "z-image"
    public_base_url: str | None = None
    url_ttl_s: int = MAX_URL_TTL_S
    result_cache: bool = True
    upload_workers: int = 4
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        for name in ("bucket", "access_key_id", "secret_access_key", "region"):
            value = getattr(self, name)
            if not value:
                raise StorageConfigError("must not be empty", field=name)
            if _CONTROL.search(value):  # botocore would refuse the header on every request
                raise StorageConfigError("must not contain control characters", field=name)
        if not 1 <= self.url_ttl_s <= MAX_URL_TTL_S:
            raise StorageConfigError(f"must be in 1..{MAX_URL_TTL_S} (SigV4 limit)", field="url_ttl_s")
        for name in ("upload_workers", "max_attempts"):
            if getattr(self, name) < 1:
                raise StorageConfigError("must be at least 1", field=name)
        for name in ("endpoint_url", "public_base_url"):
            value = getattr(self, name)
            if value is not None and not _is_http_url(value):
                raise StorageConfigError("must be an http(s) URL with a host", field=name)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _is_http_url(value: str) -> bool:
    """http(s), a host and a valid port: what botocore needs to build a client at all."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed or out-of-range port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@dataclass(frozen=True)
class StoredObject:
    """A delivered object: its key in the bucket and the URL the client fetches it from."""

    key: str
    url: str


# --------------------------------------------------------------------------------------------
# configuration

_AWS_HOST = re.compile(r"^s3[.-](?P<region>[a-z0-9-]+)\.amazonaws\.com$")
_B2_HOST = re.compile(r"^s3\.(?P<region>[a-z0-9-]+)\.backblazeb2\.com$")


def _hostname(url: str) -> str:
    """The lower-case host of a URL, "" when it has none or is malformed (validated later)."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def default_region(endpoint_url: str | None) -> str:
    """The SigV4 signing region when BUCKET_REGION is not set.

    AWS and B2 validate the region, and it is in their endpoint host, so it is taken from there.
    R2 and GCS document "auto". Anything else (MinIO, Ceph, moto, ...) gets "us-east-1": it is
    MinIO's default region and the one every S3-compatible server accepts when none is
    configured, whereas "auto" is refused by a MinIO that has a region set. With no endpoint
    (plain AWS) "us-east-1" is only right for buckets there: set BUCKET_REGION otherwise.
    """
    if not endpoint_url:
        return "us-east-1"
    host = _hostname(endpoint_url)
    match = _AWS_HOST.match(host) or _B2_HOST.match(host)
    if match:
        return match["region"]
    if host.endswith(".r2.cloudflarestorage.com") or host == "storage.googleapis.com":
        return "auto"
    return "us-east-1"


_JOB_FIELDS = ("accessId", "accessSecret", "bucketName", "endpointUrl")


def storage_config_from_job(
    s3_config: Any, defaults: StorageConfig | None, *, allow_private: bool = False
) -> StorageConfig:
    """Config for RunPod's per-job `s3Config`: the caller's own bucket and credentials.

    The endpoint must resolve to public addresses only (`allow_private` lifts that for a
    deployment whose clients use a private MinIO). Key prefix, URL lifetime, pool and timeouts
    come from `defaults`. Not inherited: the region (derived from the job's endpoint, it may be
    another provider), the public base URL (it serves the deployment's bucket, not this one) and
    the result cache (we write only the images the caller asked for into the caller's bucket).
    Errors carry the `s3Config.<field>` they blame and say nothing about the host.
    """
    if not isinstance(s3_config, Mapping):
        raise StorageConfigError("must be an object", field="s3Config")
    values = {}
    for name in _JOB_FIELDS:
        value = s3_config.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise StorageConfigError("is missing or empty", field=f"s3Config.{name}")
        if not isinstance(value, str):
            raise StorageConfigError("must be a string", field=f"s3Config.{name}")
        if _CONTROL.search(value.strip()):
            raise StorageConfigError("must not contain control characters", field=f"s3Config.{name}")
        values[name] = value.strip()
    endpoint_url = values["endpointUrl"]
    if not _is_http_url(endpoint_url):
        raise StorageConfigError("must be an http(s) URL with a host", field="s3Config.endpointUrl")
    if not allow_private:
        _check_public_endpoint(endpoint_url)
    base = defaults or StorageConfig(bucket="-", access_key_id="-", secret_access_key="-")
    return replace(
        base,
        bucket=values["bucketName"],
        access_key_id=values["accessId"],
        secret_access_key=values["accessSecret"],
        endpoint_url=endpoint_url,
        region=default_region(endpoint_url),
        public_base_url=None,
        result_cache=False,
    )


def _check_public_endpoint(endpoint_url: str) -> None:
    """Every address the host resolves to must be public (reference_image's rules: loopback,
    private, link-local, reserved and IPv4-mapped/translated forms are refused). One message for
    "does not resolve" and "not public", so a job cannot map internal names either.

    Residual risk: botocore resolves the name again when it connects, so a DNS server that
    answers public here and private a moment later (rebinding) is not stopped by this check.
    """
    parts = urlsplit(endpoint_url)
    refusal = StorageConfigError(PUBLIC_ONLY, field="s3Config.endpointUrl")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
        for info in infos:
            check_public_address(info[4][0])
    except (OSError, UnicodeError, ValueError, JobError):
        raise refusal from None


# --------------------------------------------------------------------------------------------
# clients

def _botocore_config(config: StorageConfig, attempts: int) -> Config:
    """One config that works on AWS, R2, MinIO, B2 and GCS interop.

    - checksums "when_required": boto3 >= 1.36 otherwise adds CRC32 trailers/headers that R2,
      GCS, B2 and older MinIO reject.
    - path-style addressing with a custom endpoint: virtual hosts would prepend the bucket to
      the endpoint host, which breaks IP/loopback endpoints and MinIO without wildcard DNS;
      R2, B2 and GCS accept both. Plain AWS (no endpoint) keeps virtual hosting, which AWS
      requires for new buckets.
    - one connection per storage thread (`upload_workers` sizes the worker's storage pool).
    - botocore's `standard` retries: 5xx, throttling codes and connection errors/timeouts, with
      jittered exponential backoff; 4xx answers are not retried.
    """
    s3: dict[str, Any] = {"addressing_style": "path" if config.endpoint_url else "auto"}
    return Config(
        region_name=config.region,
        signature_version="s3v4",
        s3=s3,
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        max_pool_connections=config.upload_workers,
        retries={"mode": "standard", "total_max_attempts": attempts},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        tcp_keepalive=True,
    )


def _client_key(config: StorageConfig, attempts: int) -> tuple[Any, ...]:
    return (config.endpoint_url, config.region, config.access_key_id, config.secret_access_key,
            config.upload_workers, config.connect_timeout_s, config.read_timeout_s, attempts)


@cached(LRUCache(maxsize=16), key=_client_key, lock=threading.Lock())
def get_client(config: StorageConfig, attempts: int) -> BaseClient:
    """The shared client for this config's connection settings and attempt count.

    Keyed on what the connection depends on, so stores for different buckets with the same
    credentials share one connection pool. Bounded LRU: per-job credentials must not make the
    cache grow without limit. A private session per client: boto3's default one is not
    thread-safe.
    """
    return boto3.session.Session().client(
        "s3",
        endpoint_url=config.endpoint_url,
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        config=_botocore_config(config, attempts),
    )


# --------------------------------------------------------------------------------------------
# keys

_SAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._-]")
_EXT = re.compile(r"^[a-z0-9]{1,8}$")


def _canonical(value: Any) -> Any:
    """JSON-ready value with one spelling per meaning: integral floats become ints (1.0 and 1
    give the same image), mapping keys must be strings, unknown types are refused rather than
    str()-ed (a repr may contain memory addresses and break determinism)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"result_cache_key: non-finite number {value!r}")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("result_cache_key: mapping keys must be strings")
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    raise TypeError(f"result_cache_key: unsupported value type {type(value).__name__}")


def result_cache_key(params: Mapping[str, Any]) -> str:
    """sha256 hex digest identifying one image: pass the model identity, every generation
    parameter, the seed and the output format/quality. Anything left out is a parameter that
    can change the image without changing the key, i.e. a wrong cache hit."""
    canonical = json.dumps(_canonical(params), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _check_ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    if not _EXT.match(ext):
        raise ValueError(f"invalid file extension {ext!r}")
    return ext


# --------------------------------------------------------------------------------------------
# the store

_CONNECTION_ERRORS = (BotoConnectionError, HTTPClientError)


def _error_code(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, S3 error code) of an answer; (0, "unreachable") for every connection-level
    failure (refused, reset, timed out, DNS): the exception class would tell a job which it was;
    (0, "error") for a local one (a request botocore refuses to build), which is not retried."""
    if isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status, str(exc.response.get("Error", {}).get("Code") or status)
    return 0, UNREACHABLE if isinstance(exc, _CONNECTION_ERRORS) else "error"


def _attempts(exc: BaseException, config: StorageConfig) -> int:
    """Requests made: botocore counts the retries of an answered request; a connection-level
    failure is retried to the limit in `standard` mode; a local error is not retried."""
    if isinstance(exc, ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts") or 0) + 1
    return config.max_attempts if isinstance(exc, _CONNECTION_ERRORS) else 1


class ImageStore:
    """Puts images into one bucket and hands back URLs. Blocking calls: run them off the loop."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self._client = get_client(config, config.max_attempts)
        self._prefix = config.key_prefix.strip("/")

    @cached_property
    def _lookup_client(self) -> BaseClient:
        """A lookup is an optimisation on the job's critical path: one attempt, as a false miss
        only costs a regeneration. Made on first use: per-job stores never look up."""
        return get_client(self.config, 1)

    # keys -----------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self._prefix, *parts) if p)

    def job_key(self, job_id: str, index: int, seed: int, ext: str) -> str:
        """`{prefix}/{job_id}/{index:02d}-{seed}.{ext}`: unique per job and image, so objects are
        never overwritten and may be cached as immutable."""
        safe_job = _SAFE_SEGMENT.sub("_", job_id) or "_"
        return self._key(safe_job, f"{index:02d}-{seed}.{_check_ext(ext)}")

    def cache_key(self, params: Mapping[str, Any], ext: str) -> str:
        """`{prefix}/cache/{sha256}.{ext}`: content-addressed by `result_cache_key(params)`."""
        return self._key("cache", f"{result_cache_key(params)}.{_check_ext(ext)}")

    # URLs -----------------------------------------------------------------------------------

    def url_for(self, key: str) -> str:
        """`{public_base}/{key}` when the bucket is served publicly, else a presigned GET valid
        for `url_ttl_s` (signed locally, no request)."""
        if self.config.public_base_url:
            return f"{self.config.public_base_url.rstrip('/')}/{quote(key)}"
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.config.bucket, "Key": key},
            ExpiresIn=self.config.url_ttl_s)

    # operations -----------------------------------------------------------------------------

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Upload `data` under `key` (botocore retries what is transient); raises `StorageError`."""
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")
        started = time.monotonic()
        try:
            self._client.put_object(
                Bucket=self.config.bucket, Key=key, Body=data, ContentType=content_type,
                CacheControl=CACHE_CONTROL,
                # The one integrity check every S3-compatible store honours; boto sends no
                # checksum of its own with request_checksum_calculation="when_required".
                ContentMD5=md5,
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes the one StorageError contract
            status, code = _error_code(exc)
            attempts = _attempts(exc, self.config)
            described = f"{code} (HTTP {status})" if status else code
            log.warning("upload of %s to %s failed after %d attempt(s): %s", key, self.config.bucket, attempts,
                        described)
            raise StorageError(f"upload of {key} failed after {attempts} attempt(s): {described}",
                               key=key, attempts=attempts, code=code) from None
        log.info("stored %s in %s (%d bytes, %.0f ms)", key, self.config.bucket, len(data),
                 (time.monotonic() - started) * 1000)
        return StoredObject(key=key, url=self.url_for(key))

    def lookup(self, key: str) -> StoredObject | None:
        """HEAD `key`: the stored object on a hit, None on a miss or any error.

        404 is a quiet miss; anything else is a logged miss, 403 included (S3 answers 403 rather
        than 404 for missing keys when the credentials cannot list the bucket).
        """
        try:
            self._lookup_client.head_object(Bucket=self.config.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - a lookup must never fail the job
            status, code = _error_code(exc)
            if status != 404:
                log.warning("cache lookup of %s in %s failed: %s; treating as a miss", key, self.config.bucket,
                            f"{code} (HTTP {status})" if status else code)
            return None
        return StoredObject(key=key, url=self.url_for(key))
