"""Every setting of the worker, read once from the environment at start.

One pydantic-settings model: each field is the environment variable of the same name in upper
case (`max_batch` ← `MAX_BATCH`), with its default and bounds declared once. docs/CONFIGURATION.md
lists the same fields (a test compares them), so a setting means the same thing everywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, PrivateAttr, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from serving.storage_config import MAX_URL_TTL_S, StorageConfig, StorageConfigError, default_region

REPO_ROOT = Path(__file__).resolve().parent.parent
_AWS_VHOST = re.compile(r"^(?P<bucket>[^.]+)\.s3([.-][a-z0-9-]+)?\.amazonaws\.com$")
_BUCKET_CORE = ("bucket_endpoint_url", "bucket_access_key_id", "bucket_secret_access_key", "bucket_name")
_STORAGE_ENV = {"bucket": "BUCKET_NAME", "access_key_id": "BUCKET_ACCESS_KEY_ID",
                "secret_access_key": "BUCKET_SECRET_ACCESS_KEY", "endpoint_url": "BUCKET_ENDPOINT_URL",
                "region": "BUCKET_REGION", "public_base_url": "BUCKET_PUBLIC_BASE_URL"}


class SettingsError(ValueError):
    """A setting in the environment has a value the worker cannot use."""


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _auto(value: Any) -> Any:
    """"auto" leaves a switch to the device: it reads as None."""
    return None if isinstance(value, str) and value.lower() == "auto" else value


def _choice(*values: str) -> Any:
    return Annotated[Literal[values], BeforeValidator(_lower)]  # type: ignore[valid-type]


AutoBool = Annotated[bool | None, BeforeValidator(_auto)]
Secret = Annotated[str | None, Field(repr=False)]


class Settings(BaseSettings):
    """The worker's configuration; see docs/CONFIGURATION.md for each field."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    # models
    model_dir: Path | None = None
    demo_model_dir: Path = REPO_ROOT / ".cache" / "demo-models"
    device: _choice("auto", "cuda", "cpu") = "auto"
    danrisi_enabled: bool = True
    auto_workflow: _choice("z-image-danrisi", "z-image-simple") = "z-image-danrisi"
    pulid_enabled: bool = True
    pulid_model_dir: Path | None = None
    pulid_identity_cache: int = Field(32, ge=1, le=10_000)
    pulid_start_step: int = Field(4, ge=0, le=50)
    # scheduling and limits
    concurrency: int = Field(8, ge=1, le=64)
    max_batch: int = Field(0, ge=0, le=64)
    batch_wait_ms: int = Field(15, ge=0, le=1000)
    batch_join_cost: float = Field(0.5, ge=0, le=1)
    work_weight: float = Field(4.0, ge=1, le=100)
    priority_offset_s: float = Field(30.0, ge=0, le=3600)
    decode_megapixels: float = Field(0.25, ge=0.01, le=16)
    prompt_cache_size: int = Field(256, ge=0, le=100_000)
    encode_threads: int = Field(4, ge=1, le=64)
    max_pixels: int = Field(2048 * 2048, ge=64 * 64, le=4096 * 4096)
    job_timeout_s: int = Field(600, ge=1, le=86_400)
    max_response_mb: int = Field(10, ge=1, le=20)
    max_chunk_bytes: int = Field(1_000_000, ge=65_536, le=20 * 2**20)
    # LoRA per request (docs/LORA.md)
    lora_dir: Path | None = None
    lora_allow_urls: bool = True
    lora_max_mb: int = Field(512, ge=1, le=4096)
    lora_fetch_timeout_s: float = Field(60.0, gt=0, le=600)
    lora_cache_dir: Path | None = REPO_ROOT / ".cache" / "loras"
    lora_cache_mb: int = Field(10_240, ge=0, le=1_000_000)
    lora_adapter_cache: int = Field(16, ge=1, le=1024)
    # storage (docs/STORAGE.md)
    bucket_endpoint_url: str | None = None
    bucket_access_key_id: Secret = None
    bucket_secret_access_key: Secret = None
    bucket_name: str | None = None
    bucket_region: str | None = None
    bucket_key_prefix: str = "z-image"
    bucket_public_base_url: str | None = None
    bucket_url_ttl_s: int = Field(MAX_URL_TTL_S, ge=1, le=MAX_URL_TTL_S)
    bucket_upload_workers: int = Field(4, ge=1, le=64)
    result_cache: bool = True
    storage_connect_timeout_s: float = Field(3.0, gt=0, le=60)
    storage_read_timeout_s: float = Field(10.0, gt=0, le=300)
    storage_max_attempts: int = Field(3, ge=1, le=10)
    delivery_timeout_s: float = Field(30.0, gt=0, le=600)
    cache_lookup_timeout_s: float = Field(2.0, gt=0, le=60)
    job_storage_allow_private: bool = False
    # CUDA speed switches (docs/PERFORMANCE.md); None means "decided by the device".
    attention_backend: _choice("auto", "flash3", "flash", "sdpa", "native") = "auto"
    compile: AutoBool = None
    compile_cache_dir: Path = REPO_ROOT / ".cache" / "torch-compile"
    fp8: bool = False
    fp8_keep_last_blocks: int = Field(4, ge=0, le=64)
    fp8_min_psnr_db: int = Field(30, ge=0, le=100)
    text_encoder_device: _choice("auto", "gpu", "cpu") = "auto"
    warmup: AutoBool = None

    _storage: StorageConfig | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        **_: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only what `load_settings` read: no .env file, no second look at os.environ."""
        return (init_settings,)

    def model_post_init(self, context: Any) -> None:
        self._storage = self._storage_config()

    @property
    def uses_demo_model(self) -> bool:
        return self.model_dir is None

    @property
    def max_response_bytes(self) -> int:
        return self.max_response_mb * 2**20

    @property
    def storage(self) -> StorageConfig | None:
        """The deployment's bucket, or None when no BUCKET_* core setting is present."""
        return self._storage

    def _storage_config(self) -> StorageConfig | None:
        """A partial bucket configuration stops the start, naming what is missing: silently
        returning base64 would hide a broken deployment."""
        if not any(getattr(self, name) for name in _BUCKET_CORE):
            return None
        missing = [name.upper() for name in _BUCKET_CORE[1:] if not getattr(self, name)]
        if missing:
            hint = ""
            vhost = _AWS_VHOST.match(_host(self.bucket_endpoint_url))
            if "BUCKET_NAME" in missing and vhost:
                hint = (f" (BUCKET_ENDPOINT_URL names bucket {vhost['bucket']!r} in its host: set "
                        "BUCKET_NAME to it and BUCKET_ENDPOINT_URL to the service endpoint)")
            raise StorageConfigError(f"storage settings incomplete: missing {', '.join(missing)}{hint}")
        try:
            return self._build_storage_config()
        except StorageConfigError as err:  # name the variable, not StorageConfig's field
            raise StorageConfigError(err.rule, field=_STORAGE_ENV.get(err.field or "", err.field)) from None

    def _build_storage_config(self) -> StorageConfig:
        return StorageConfig(
            bucket=self.bucket_name or "",
            access_key_id=self.bucket_access_key_id or "",
            secret_access_key=self.bucket_secret_access_key or "",
            endpoint_url=self.bucket_endpoint_url,
            region=self.bucket_region or default_region(self.bucket_endpoint_url),
            key_prefix=self.bucket_key_prefix.strip("/"),
            public_base_url=self.bucket_public_base_url,
            url_ttl_s=self.bucket_url_ttl_s,
            result_cache=self.result_cache,
            upload_workers=self.bucket_upload_workers,
            connect_timeout_s=self.storage_connect_timeout_s,
            read_timeout_s=self.storage_read_timeout_s,
            max_attempts=self.storage_max_attempts,
        )


def _host(url: str | None) -> str:
    try:
        return (urlsplit(url or "").hostname or "").lower()
    except ValueError:
        return ""


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (os.environ, or a test's dict).
    Values are stripped and empty ones count as unset, as a deployment's template leaves them."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = {name.lower(): value.strip() for name, value in environ.items() if value.strip()}
        super().__init__(settings_cls, case_sensitive=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._environ


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings once; raise SettingsError naming the variable on a bad value."""
    values = _MappingSource(Settings, os.environ if env is None else env)()
    try:
        return Settings(**values)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, StorageConfigError):  # from the bucket settings taken together
            raise SettingsError(str(cause)) from None
        name = str(first["loc"][0]).upper()
        got = "" if "SECRET" in name or "KEY_ID" in name else f", got {first.get('input')!r}"
        raise SettingsError(f"{name}: {first['msg']}{got}") from None
