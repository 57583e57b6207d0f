"""Every setting of the worker, read once from the environment at start.

docs/CONFIGURATION.md lists them with their defaults; this module is the only place that reads
them, so a setting means the same thing everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from serving.storage import StorageConfig, StorageConfigError, storage_config_from_env

REPO_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """A setting in the environment has a value the worker cannot use."""


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, "").strip() or default


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as err:
        raise SettingsError(f"{name}: must be an integer, got {raw!r}") from err
    if not low <= value <= high:
        raise SettingsError(f"{name}: must be between {low} and {high}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}: must be a boolean (1/0, true/false), got {raw!r}")


def _auto_bool(env: Mapping[str, str], name: str) -> bool | None:
    """A boolean that may also be left to the device: empty or "auto" gives None."""
    if env.get(name, "").strip().lower() in ("", "auto"):
        return None
    return _bool(env, name, False)


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _text(env, name, default).lower()
    if value not in choices:
        raise SettingsError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """The worker's configuration; see docs/CONFIGURATION.md for each field."""

    model_dir: Path | None
    demo_model_dir: Path
    device: str
    danrisi_enabled: bool
    auto_workflow: str
    max_batch: int
    batch_wait_ms: int
    concurrency: int
    prompt_cache_size: int
    encode_threads: int
    max_pixels: int
    job_timeout_s: int
    max_response_bytes: int
    storage: StorageConfig | None
    pulid_enabled: bool
    pulid_model_dir: Path | None
    pulid_identity_cache: int
    pulid_start_step: int
    # CUDA speed switches (docs/PERFORMANCE.md); None means "decided by the device".
    attention_backend: str
    compile: bool | None
    compile_cache_dir: Path
    fp8: bool
    fp8_keep_last_blocks: int
    fp8_min_psnr_db: int
    text_encoder_device: str
    warmup: bool | None

    @property
    def uses_demo_model(self) -> bool:
        return self.model_dir is None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings once; raise SettingsError naming the variable on a bad value."""
    env = os.environ if env is None else env
    model_dir = _text(env, "MODEL_DIR", "")
    return Settings(
        model_dir=Path(model_dir) if model_dir else None,
        demo_model_dir=Path(_text(env, "DEMO_MODEL_DIR", str(REPO_ROOT / ".cache" / "demo-models"))),
        device=_choice(env, "DEVICE", "auto", ("auto", "cuda", "cpu")),
        danrisi_enabled=_bool(env, "DANRISI_ENABLED", True),
        auto_workflow=_choice(env, "AUTO_WORKFLOW", "z-image-danrisi", ("z-image-danrisi", "z-image-simple")),
        max_batch=_int(env, "MAX_BATCH", 0, 0, 64),
        batch_wait_ms=_int(env, "BATCH_WAIT_MS", 15, 0, 1000),
        concurrency=_int(env, "CONCURRENCY", 4, 1, 64),
        prompt_cache_size=_int(env, "PROMPT_CACHE_SIZE", 256, 0, 100_000),
        encode_threads=_int(env, "ENCODE_THREADS", 4, 1, 64),
        max_pixels=_int(env, "MAX_PIXELS", 2048 * 2048, 64 * 64, 4096 * 4096),
        job_timeout_s=_int(env, "JOB_TIMEOUT_S", 600, 1, 86_400),
        max_response_bytes=_int(env, "MAX_RESPONSE_MB", 10, 1, 20) * 2**20,
        storage=_storage(env),
        pulid_enabled=_bool(env, "PULID_ENABLED", True),
        pulid_model_dir=Path(pulid_dir) if (pulid_dir := _text(env, "PULID_MODEL_DIR", "")) else None,
        pulid_identity_cache=_int(env, "PULID_IDENTITY_CACHE", 32, 1, 10_000),
        pulid_start_step=_int(env, "PULID_START_STEP", 4, 0, 50),
        attention_backend=_choice(env, "ATTENTION_BACKEND", "auto", ("auto", "flash3", "flash", "sdpa", "native")),
        compile=_auto_bool(env, "COMPILE"),
        compile_cache_dir=Path(_text(env, "COMPILE_CACHE_DIR", str(REPO_ROOT / ".cache" / "torch-compile"))),
        fp8=_bool(env, "FP8", False),
        fp8_keep_last_blocks=_int(env, "FP8_KEEP_LAST_BLOCKS", 4, 0, 64),
        fp8_min_psnr_db=_int(env, "FP8_MIN_PSNR_DB", 30, 0, 100),
        text_encoder_device=_choice(env, "TEXT_ENCODER_DEVICE", "auto", ("auto", "gpu", "cpu")),
        warmup=_auto_bool(env, "WARMUP"),
    )


def _storage(env: Mapping[str, str]) -> StorageConfig | None:
    try:
        return storage_config_from_env(env)
    except StorageConfigError as err:
        raise SettingsError(str(err)) from err
