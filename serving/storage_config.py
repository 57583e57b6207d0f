"""Where images go: one bucket's settings (`StorageConfig`), the deployment's or a job's.

A job's `s3Config` is the caller's own bucket and credentials, so its endpoint gets the same
public-address rule as a reference image URL (serving/public_fetch.py) unless the deployment allows
private endpoints (`JOB_STORAGE_ALLOW_PRIVATE`). Refusals name the `s3Config` field and say nothing
about internal hosts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from serving.public_fetch import check_public_address, resolve_checked

# SigV4 presigned URLs cannot live longer than 7 days on any S3-compatible service.
MAX_URL_TTL_S = 604800
PUBLIC_ONLY = "must resolve to public addresses only"


class StorageConfigError(ValueError):
    """Storage settings are missing or invalid. `field` names the setting or `s3Config` field."""

    def __init__(self, rule: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {rule}" if field else rule)
        self.field = field
        self.rule = rule


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
    try:
        resolve_checked(parts.hostname, parts.port or 443, check_public_address)
    except (OSError, ValueError):  # FetchError (no answer, not public) is a ValueError
        raise StorageConfigError(PUBLIC_ONLY, field="s3Config.endpointUrl") from None
