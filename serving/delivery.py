"""How one job's encoded images leave the worker: inline base64 within RunPod's result limit, or
a bucket (docs/STORAGE.md). Called from the encode pool, so uploads overlap generation.

Nothing produced is silently dropped: an upload that fails falls back to base64 while the
response has room, and an image that fits nowhere becomes a per-image error naming the cause.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from serving.errors import JobError
from serving.outputs import CONTENT_TYPES, base64_entry, image_entry
from serving.storage import ImageStore, StorageError

# Lower bounds of encoded size per pixel for the up-front check (a job certain to overflow is
# refused before it runs); the real JSON size of every chunk is counted as it is produced.
MIN_BYTES_PER_PIXEL = {"png": 0.5, "webp": 0.05, "jpeg": 0.05}
SUMMARY_RESERVE_BYTES = 16 * 1024


@dataclass
class Delivered:
    entry: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None


class Delivery:
    """One job's delivery: where its images go and how much of the response they have used."""

    def __init__(self, method: str, store: ImageStore | None, limit_bytes: int, use_cache: bool) -> None:
        self.method = method
        self.store = store
        self.limit_bytes = limit_bytes
        self.use_cache = use_cache and store is not None and store.config.result_cache
        self.switched_to_url = False
        self._used = SUMMARY_RESERVE_BYTES
        self._lock = threading.Lock()

    @classmethod
    def plan(
        cls, method: str, store: ImageStore | None, limit_bytes: int, pixels: int, count: int, image_format: str
    ) -> "Delivery":
        """Refuse, or switch to url, when base64 is certain not to fit in the response."""
        if method == "url" and store is None:
            raise JobError("invalid_input", "url delivery needs storage: set BUCKET_* or send s3Config", field="delivery")
        floor = pixels * count * MIN_BYTES_PER_PIXEL[image_format] * 4 / 3
        delivery = cls(method, store, limit_bytes, use_cache=method == "url")
        if method == "base64" and floor + SUMMARY_RESERVE_BYTES > limit_bytes:
            if store is None:
                raise JobError(
                    "payload_too_large",
                    f"{count} {image_format} images need at least {floor / 2**20:.1f} MB of base64, over the "
                    f"{limit_bytes / 2**20:.0f} MB result limit: use delivery \"url\", fewer images or webp/jpeg",
                    field="delivery",
                )
            delivery.method, delivery.switched_to_url = "url", True
        return delivery

    def cached(self, cache_params: Mapping[str, Any], image_format: str) -> dict[str, Any] | None:
        """An earlier identical image already in the bucket (one HEAD), or None."""
        if not self.use_cache or self.method != "url":
            return None
        stored = self.store.lookup(self.store.cache_key(cache_params, image_format))
        return None if stored is None else {"url": stored.url, "key": stored.key, "cached": True}

    def deliver(
        self, job_id: str, index: int, seed: int, width: int, height: int, image_format: str, data: bytes,
        cache_params: Mapping[str, Any],
    ) -> Delivered:
        if self.method == "url":
            return self._upload(job_id, index, seed, width, height, image_format, data, cache_params)
        entry = base64_entry(index, seed, width, height, image_format, data)
        if self._reserve(entry):
            return Delivered(entry)
        if self.store is not None:
            self.switched_to_url = True
            return self._upload(job_id, index, seed, width, height, image_format, data, cache_params)
        return Delivered(error_code="payload_too_large", error_message=(
            f"the response would pass the {self.limit_bytes // 2**20} MB result limit: "
            'use delivery "url", fewer images or webp/jpeg'))

    def _upload(
        self, job_id: str, index: int, seed: int, width: int, height: int, image_format: str, data: bytes,
        cache_params: Mapping[str, Any],
    ) -> Delivered:
        key = (self.store.cache_key(cache_params, image_format) if self.use_cache
               else self.store.job_key(job_id, index, seed, image_format))
        try:
            stored = self.store.put(key, data, CONTENT_TYPES[image_format])
        except StorageError as err:
            fallback = base64_entry(index, seed, width, height, image_format, data)
            fallback["delivery_fallback"] = f"upload failed ({err.code or 'error'}): returned inline"
            if self._reserve(fallback):
                return Delivered(fallback)
            return Delivered(error_code="upload_failed", error_message=f"upload failed after {err.attempts} attempt(s)"
                             " and the image does not fit inline")
        return Delivered(image_entry(index, seed, width, height, image_format, url=stored.url, key=stored.key))

    def _reserve(self, entry: dict[str, Any]) -> bool:
        size = len(json.dumps({"image": entry, "progress": {"completed": 16, "total": 16}}))
        with self._lock:
            if self._used + size > self.limit_bytes:
                return False
            self._used += size
            return True
