"""serving.settings: one pydantic-settings model, read once, and docs/CONFIGURATION.md kept equal to it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from serving.settings import REPO_ROOT, Settings, SettingsError, load_settings
from serving.storage_config import StorageConfig

DOC = (REPO_ROOT / "docs" / "CONFIGURATION.md").read_text()
ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", re.MULTILINE)


def documented() -> dict[str, str]:
    """Each table row's variable and its default as written: the first `code` in the cell, or unset."""
    rows = {}
    for name, cell in ROW.findall(DOC):
        code = re.search(r"`([^`]*)`", cell)
        rows[name] = "unset" if cell.strip().startswith("unset") else code.group(1) if code else cell.strip()
    return rows


def reads_auto_as_none(field: FieldInfo) -> bool:
    try:
        annotated = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        return TypeAdapter(annotated).validate_python("auto") is None
    except ValidationError:
        return False


def spelled(field: FieldInfo) -> str:
    """A default as the docs write it: the value to put in the environment."""
    default = field.default
    if default is None:  # "auto" where the variable takes it (left to the device), else unset
        return "auto" if reads_auto_as_none(field) else "unset"
    if isinstance(default, bool):
        return "1" if default else "0"
    if isinstance(default, Path):
        return str(default.relative_to(REPO_ROOT))
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def test_configuration_doc_lists_exactly_the_models_variables_and_defaults() -> None:
    expected = {name.upper(): spelled(field) for name, field in Settings.model_fields.items()}
    assert documented() == expected


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.storage is None and settings.uses_demo_model
    assert (settings.max_batch, settings.concurrency, settings.encode_threads) == (0, 8, 4)
    assert settings.max_response_bytes == 10 * 2**20 and settings.max_chunk_bytes == 1_000_000
    assert (settings.delivery_timeout_s, settings.cache_lookup_timeout_s, settings.job_storage_allow_private) == (
        30.0, 2.0, False)


def test_values_are_stripped_empty_ones_are_unset_and_choices_case_insensitive() -> None:
    settings = load_settings({"MAX_BATCH": " 3 ", "MODEL_DIR": "", "BUCKET_NAME": "  ", "DEVICE": "CPU",
                              "COMPILE": "Auto", "FP8": "on", "RESULT_CACHE": "off", "UNRELATED": "x"})
    assert (settings.max_batch, settings.model_dir, settings.storage, settings.device) == (3, None, None, "cpu")
    assert (settings.compile, settings.fp8, settings.result_cache) == (None, True, False)


def test_only_the_given_mapping_is_read(monkeypatch) -> None:
    monkeypatch.setenv("MAX_BATCH", "7")
    assert load_settings({}).max_batch == 0
    assert load_settings().max_batch == 7


@pytest.mark.parametrize(("env", "message"), [
    ({"MAX_BATCH": "65"}, "MAX_BATCH: Input should be less than or equal to 64, got '65'"),
    ({"CONCURRENCY": "four"}, "CONCURRENCY: "),
    ({"DEVICE": "tpu"}, "DEVICE: "),
    ({"DELIVERY_TIMEOUT_S": "0"}, "DELIVERY_TIMEOUT_S: "),
    ({"MAX_CHUNK_BYTES": "1000"}, "MAX_CHUNK_BYTES: "),
    ({"JOB_STORAGE_ALLOW_PRIVATE": "maybe"}, "JOB_STORAGE_ALLOW_PRIVATE: "),
])
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert str(info.value).startswith(message)


BASE_ENV = {"BUCKET_ENDPOINT_URL": "https://acc.r2.cloudflarestorage.com",
            "BUCKET_ACCESS_KEY_ID": "id", "BUCKET_SECRET_ACCESS_KEY": "secret", "BUCKET_NAME": "images"}


def test_storage_defaults() -> None:
    assert load_settings(BASE_ENV).storage == StorageConfig(
        bucket="images", access_key_id="id", secret_access_key="secret",
        endpoint_url="https://acc.r2.cloudflarestorage.com", region="auto", key_prefix="z-image",
        public_base_url=None, url_ttl_s=604800, result_cache=True, upload_workers=4, connect_timeout_s=3.0,
        read_timeout_s=10.0, max_attempts=3)


def test_storage_overrides() -> None:
    settings = load_settings({
        **BASE_ENV, "BUCKET_REGION": "eu-west-1", "BUCKET_KEY_PREFIX": "/prod/img/",
        "BUCKET_PUBLIC_BASE_URL": "https://cdn.example.com", "BUCKET_URL_TTL_S": "3600",
        "RESULT_CACHE": "off", "BUCKET_UPLOAD_WORKERS": "8", "STORAGE_READ_TIMEOUT_S": "2.5",
        "STORAGE_MAX_ATTEMPTS": "1"})
    config = settings.storage
    assert (config.region, config.key_prefix, config.public_base_url, config.url_ttl_s, config.result_cache,
            config.upload_workers, config.read_timeout_s, config.max_attempts) == (
        "eu-west-1", "prod/img", "https://cdn.example.com", 3600, False, 8, 2.5, 1)
    assert settings.bucket_upload_workers == 8  # also the worker's storage pool size


@pytest.mark.parametrize(("env", "message"), [
    ({"BUCKET_ENDPOINT_URL": "https://minio:9000"},
     "storage settings incomplete: missing BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY, BUCKET_NAME"),
    ({**BASE_ENV, "BUCKET_NAME": "", "BUCKET_ENDPOINT_URL": "https://imgs.s3.us-west-2.amazonaws.com"},
     "storage settings incomplete: missing BUCKET_NAME (BUCKET_ENDPOINT_URL names bucket 'imgs'"),
    ({**BASE_ENV, "BUCKET_URL_TTL_S": "604801"}, "BUCKET_URL_TTL_S: "),
    ({**BASE_ENV, "BUCKET_URL_TTL_S": "7d"}, "BUCKET_URL_TTL_S: "),
    ({**BASE_ENV, "RESULT_CACHE": "maybe"}, "RESULT_CACHE: "),
    ({**BASE_ENV, "BUCKET_PUBLIC_BASE_URL": "cdn.example.com"}, "BUCKET_PUBLIC_BASE_URL: must be an http(s) URL"),
    ({**BASE_ENV, "BUCKET_ENDPOINT_URL": "https://[::1"}, "BUCKET_ENDPOINT_URL: must be an http(s) URL"),
    ({**BASE_ENV, "BUCKET_SECRET_ACCESS_KEY": "se\r\ncret"}, "BUCKET_SECRET_ACCESS_KEY: must not contain control"),
])
def test_storage_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert str(info.value).startswith(message)
    assert "secret" not in str(info.value).replace("SECRET", "")  # never the value of a secret


def test_secrets_are_not_in_the_repr() -> None:
    settings = load_settings({**BASE_ENV, "BUCKET_SECRET_ACCESS_KEY": "s3cr3t-value", "BUCKET_ACCESS_KEY_ID": "AKIAX"})
    assert "s3cr3t-value" not in repr(settings) + repr(settings.storage)
    assert "AKIAX" not in repr(settings) + repr(settings.storage)
