"""S3-compatible delivery of generated images (AWS S3, Cloudflare R2, MinIO, Backblaze B2, GCS).

Self-contained: configuration comes in as a `StorageConfig` (built once from the environment by
`storage_config_from_env`, or per job from RunPod's `s3Config` by `storage_config_from_job`);
nothing here reads the environment or imports other serving modules.

Failure contract for the worker: `ImageStore.put` either returns a `StoredObject` or raises
`StorageError` (after retrying transient failures), so one failed upload becomes one per-image
fallback, never a failed job. `ImageStore.lookup` never raises.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)

log = logging.getLogger(__name__)

# SigV4 presigned URLs cannot live longer than 7 days on any S3-compatible service.
MAX_URL_TTL_S = 604800
CACHE_CONTROL = "public, max-age=31536000, immutable"


class StorageConfigError(ValueError):
    """Storage settings are missing or invalid; the message names the setting or field."""


class StorageError(Exception):
    """An upload failed for good. `transient` says whether the last failure looked temporary
    (5xx, throttling, connection) so the worker can tell an outage from a misconfiguration."""

    def __init__(self, message: str, *, key: str, transient: bool, attempts: int,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.transient = transient
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
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("bucket", "access_key_id", "secret_access_key", "region"):
            if not getattr(self, name):
                raise StorageConfigError(f"storage: {name} must not be empty")
        if not 1 <= self.url_ttl_s <= MAX_URL_TTL_S:
            raise StorageConfigError(
                f"storage: url_ttl_s must be in 1..{MAX_URL_TTL_S} (SigV4 limit), got {self.url_ttl_s}")
        if self.upload_workers < 1:
            raise StorageConfigError("storage: upload_workers must be at least 1")
        for name in ("endpoint_url", "public_base_url"):
            value = getattr(self, name)
            if value is not None and not _is_http_url(value):
                raise StorageConfigError(f"storage: {name} must be an http(s) URL with a host")


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


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures. Retries live here rather than in
    botocore so attempts and delays are explicit, testable and not multiplied by two layers."""

    max_attempts: int = 4
    base_delay_s: float = 0.25
    max_delay_s: float = 4.0

    def delay(self, attempt: int) -> float:
        """Sleep before retry number `attempt` (1-based): half fixed, half random, so parallel
        uploads that failed together do not retry in lockstep."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return ceiling * (0.5 + random.random() / 2)


# --------------------------------------------------------------------------------------------
# configuration

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_AWS_HOST = re.compile(r"^s3[.-](?P<region>[a-z0-9-]+)\.amazonaws\.com$")
_B2_HOST = re.compile(r"^s3\.(?P<region>[a-z0-9-]+)\.backblazeb2\.com$")
_AWS_VHOST = re.compile(r"^(?P<bucket>[^.]+)\.s3([.-][a-z0-9-]+)?\.amazonaws\.com$")


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


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise StorageConfigError(f"{name} must be one of on/off, true/false, 1/0; got {value!r}")


def _parse_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise StorageConfigError(f"{name} must be an integer; got {value!r}") from None


def storage_config_from_env(environ: Mapping[str, str]) -> StorageConfig | None:
    """Build the deployment's storage config once at start-up, or None when no bucket setting
    is present (images are then returned inline). A partial configuration raises, naming the
    missing variables: silently falling back to base64 would hide a broken deployment."""

    def get(name: str) -> str | None:
        value = environ.get(name, "").strip()
        return value or None

    core = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "BUCKET_NAME")
    if not any(get(name) for name in core):
        return None
    missing = [name for name in core[1:] if not get(name)]
    if missing:
        hint = ""
        endpoint = get("BUCKET_ENDPOINT_URL")
        if "BUCKET_NAME" in missing and endpoint:
            vhost = _AWS_VHOST.match(_hostname(endpoint))
            if vhost:
                hint = (f" (BUCKET_ENDPOINT_URL names bucket {vhost['bucket']!r} in its host: set "
                        "BUCKET_NAME to it and BUCKET_ENDPOINT_URL to the service endpoint)")
        raise StorageConfigError(f"storage settings incomplete: missing {', '.join(missing)}{hint}")

    endpoint_url = get("BUCKET_ENDPOINT_URL")
    ttl = get("BUCKET_URL_TTL_S")
    workers = get("BUCKET_UPLOAD_WORKERS")
    cache = get("RESULT_CACHE")
    return StorageConfig(
        bucket=get("BUCKET_NAME") or "",
        access_key_id=get("BUCKET_ACCESS_KEY_ID") or "",
        secret_access_key=get("BUCKET_SECRET_ACCESS_KEY") or "",
        endpoint_url=endpoint_url,
        region=get("BUCKET_REGION") or default_region(endpoint_url),
        key_prefix=(get("BUCKET_KEY_PREFIX") or "z-image").strip("/"),
        public_base_url=get("BUCKET_PUBLIC_BASE_URL"),
        url_ttl_s=_parse_int("BUCKET_URL_TTL_S", ttl) if ttl else MAX_URL_TTL_S,
        result_cache=_parse_bool("RESULT_CACHE", cache) if cache else True,
        upload_workers=_parse_int("BUCKET_UPLOAD_WORKERS", workers) if workers else 4,
    )


_JOB_FIELDS = ("accessId", "accessSecret", "bucketName", "endpointUrl")


def storage_config_from_job(s3_config: Mapping[str, Any], defaults: StorageConfig | None) -> StorageConfig:
    """Config for RunPod's per-job `s3Config`: the caller's own bucket and credentials.

    Key prefix, URL lifetime, upload pool and timeouts come from `defaults`. Not inherited: the
    region (derived from the job's endpoint, it may be another provider), the public base URL
    (it serves the deployment's bucket, not this one) and the result cache (we write only the
    images the caller asked for into the caller's bucket).
    """
    if not isinstance(s3_config, Mapping):
        raise StorageConfigError("s3Config must be an object")
    for name in _JOB_FIELDS:
        value = s3_config.get(name)
        if not isinstance(value, str) or not value.strip():
            raise StorageConfigError(f"s3Config.{name} is missing or empty")
    endpoint_url = s3_config["endpointUrl"].strip()
    base = defaults or StorageConfig(bucket="-", access_key_id="-", secret_access_key="-")
    try:
        return replace(
            base,
            bucket=s3_config["bucketName"].strip(),
            access_key_id=s3_config["accessId"].strip(),
            secret_access_key=s3_config["accessSecret"].strip(),
            endpoint_url=endpoint_url,
            region=default_region(endpoint_url),
            public_base_url=None,
            result_cache=False,
        )
    except StorageConfigError as exc:
        raise StorageConfigError(f"s3Config: {exc}") from None


# --------------------------------------------------------------------------------------------
# clients

_CLIENT_CACHE_SIZE = 16
_clients: OrderedDict[tuple[Any, ...], BaseClient] = OrderedDict()
_clients_lock = threading.Lock()


def _botocore_config(config: StorageConfig) -> Config:
    """One config that works on AWS, R2, MinIO, B2 and GCS interop.

    - checksums "when_required": boto3 >= 1.36 otherwise adds CRC32 trailers/headers that R2,
      GCS, B2 and older MinIO reject.
    - path-style addressing with a custom endpoint: virtual hosts would prepend the bucket to
      the endpoint host, which breaks IP/loopback endpoints and MinIO without wildcard DNS;
      R2, B2 and GCS accept both. Plain AWS (no endpoint) keeps virtual hosting, which AWS
      requires for new buckets.
    - the connection pool matches the upload pool, plus headroom for cache lookups running
      on other threads at the same time.
    - botocore's own retries are off: `ImageStore` retries with its explicit `RetryPolicy`.
    """
    s3: dict[str, Any] = {"addressing_style": "path" if config.endpoint_url else "auto"}
    return Config(
        region_name=config.region,
        signature_version="s3v4",
        s3=s3,
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        max_pool_connections=config.upload_workers + 2,
        retries={"mode": "standard", "total_max_attempts": 1},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        tcp_keepalive=True,
    )


def get_client(config: StorageConfig) -> BaseClient:
    """The shared client for this config's connection settings (created once, thread-safe).

    Keyed on what the connection depends on, so stores for different buckets with the same
    credentials share one connection pool. Bounded LRU: per-job credentials must not make the
    cache grow without limit.
    """
    cache_key = (config.endpoint_url, config.region, config.access_key_id, config.secret_access_key,
                 config.upload_workers, config.connect_timeout_s, config.read_timeout_s)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is not None:
            _clients.move_to_end(cache_key)
            return client
        # A private session per client: boto3's default session is not thread-safe.
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            config=_botocore_config(config),
        )
        _clients[cache_key] = client
        if len(_clients) > _CLIENT_CACHE_SIZE:
            _clients.popitem(last=False)
        return client


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

def _error_code(exc: ClientError) -> tuple[int, str]:
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return status, str(exc.response.get("Error", {}).get("Code") or status)


# S3 error codes that mean "try again" even when they come with a 4xx status.
_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown",
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "InternalError", "ServiceUnavailable",
}


def is_transient(exc: BaseException) -> bool:
    """5xx, 429/throttling and connection-level failures are worth retrying; 4xx answers
    (auth, missing bucket, bad request) and local errors will not change on retry."""
    if isinstance(exc, ClientError):
        status, code = _error_code(exc)
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    if isinstance(exc, SSLError):
        return False  # certificate problems do not heal by retrying
    return isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError))


def _describe(exc: BaseException) -> str:
    """A log/exception-safe description: the error code, never request details."""
    if isinstance(exc, ClientError):
        status, code = _error_code(exc)
        return f"{code} (HTTP {status})"
    return type(exc).__name__


class ImageStore:
    """Puts images into one bucket and hands back URLs.

    Uploads run on a bounded thread pool (`submit_put`) so they overlap with generation; pass a
    shared `executor` when building short-lived per-job stores, so one pool serves them all.
    """

    def __init__(self, config: StorageConfig, *, retry: RetryPolicy | None = None,
                 executor: ThreadPoolExecutor | None = None) -> None:
        self.config = config
        self.retry = retry or RetryPolicy()
        self._client = get_client(config)
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=config.upload_workers, thread_name_prefix="image-upload")
        self._prefix = config.key_prefix.strip("/")

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._executor

    def close(self) -> None:
        """Wait for queued uploads; shuts the pool down only if this store created it."""
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
        """Upload `data` under `key`, retrying transient failures; raises `StorageError`."""
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")

        def attempt() -> None:
            self._client.put_object(
                Bucket=self.config.bucket, Key=key, Body=data, ContentType=content_type,
                CacheControl=CACHE_CONTROL,
                # The one integrity check every S3-compatible store honours; boto sends no
                # checksum of its own with request_checksum_calculation="when_required".
                ContentMD5=md5,
            )

        started = time.monotonic()
        self._retrying(attempt, key)
        log.info("stored %s in %s (%d bytes, %.0f ms)", key, self.config.bucket, len(data),
                 (time.monotonic() - started) * 1000)
        return StoredObject(key=key, url=self.url_for(key))

    def submit_put(self, key: str, data: bytes, content_type: str) -> Future[StoredObject]:
        """`put` on the upload pool; the Future raises `StorageError` on failure."""
        return self._executor.submit(self.put, key, data, content_type)

    def lookup(self, key: str) -> StoredObject | None:
        """HEAD `key`: the stored object on a hit, None on a miss or any error.

        One attempt, no retries: a cache lookup is an optimisation on the job's critical path,
        and a false miss only costs a regeneration. 403 is a miss too (S3 answers 403 rather
        than 404 for missing keys when the credentials cannot list the bucket).
        """
        try:
            self._client.head_object(Bucket=self.config.bucket, Key=key)
        except ClientError as exc:
            status, _ = _error_code(exc)
            if status != 404:
                log.warning("cache lookup of %s in %s failed: %s; treating as a miss", key,
                            self.config.bucket, _describe(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - a lookup must never fail the job
            log.warning("cache lookup of %s in %s failed: %s; treating as a miss", key,
                        self.config.bucket, _describe(exc))
            return None
        return StoredObject(key=key, url=self.url_for(key))

    def _retrying(self, operation: Callable[[], None], key: str) -> None:
        attempts = 0
        while True:
            attempts += 1
            try:
                return operation()
            except (ClientError, BotoCoreError) as exc:
                transient = is_transient(exc)
                code = _error_code(exc)[1] if isinstance(exc, ClientError) else type(exc).__name__
                if not transient or attempts >= self.retry.max_attempts:
                    log.warning("upload of %s to %s failed after %d attempt(s): %s", key,
                                self.config.bucket, attempts, _describe(exc))
                    raise StorageError(
                        f"upload of {key} to bucket {self.config.bucket} failed after {attempts} "
                        f"attempt(s): {_describe(exc)}",
                        key=key, transient=transient, attempts=attempts, code=code) from exc
                delay = self.retry.delay(attempts)
                log.info("upload of %s: %s, retry %d in %.2f s", key, _describe(exc), attempts, delay)
                time.sleep(delay)
