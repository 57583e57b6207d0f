"""S3-compatible delivery of generated images (AWS S3, Cloudflare R2, MinIO, Backblaze B2, GCS).

Configuration comes in as a `StorageConfig` (serving/storage_config.py): the deployment's, built
once by `serving.settings`, or a job's, from RunPod's `s3Config`. Nothing here reads the environment.

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
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import quote

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from cachetools import LRUCache, cached

from serving.storage_config import StorageConfig

log = logging.getLogger(__name__)

CACHE_CONTROL = "public, max-age=31536000, immutable"
UNREACHABLE = "unreachable"  # one code for refused, timed out, DNS: a job learns nothing about ports


class StorageError(Exception):
    """An upload failed for good: `code` is the S3 error code, or `unreachable` for any
    connection-level failure; `attempts` how many requests botocore made."""

    def __init__(self, message: str, *, key: str, attempts: int, code: str) -> None:
        super().__init__(message)
        self.key = key
        self.attempts = attempts
        self.code = code


@dataclass(frozen=True)
class StoredObject:
    """A delivered object: its key in the bucket and the URL the client fetches it from."""

    key: str
    url: str


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
