"""How one job's encoded images leave the worker: inline base64 within RunPod's limits, or a bucket
(docs/STORAGE.md).

Two RunPod limits bound inline images: the job's whole result (MAX_RESPONSE_MB) and one streamed
chunk (MAX_CHUNK_BYTES, RunPod documents 1 MB). Both are checked before any GPU work from a lower
bound of the encoded size, and again on the real size of every chunk.

Storage I/O never runs on the encode pool and never holds a job past its deadlines: uploads and
cache lookups run on the worker's own storage pool; a lookup that has not answered within
CACHE_LOOKUP_TIMEOUT_S is a miss, and an upload not done within DELIVERY_TIMEOUT_S of being handed
over falls back inline when it fits, else becomes that image's `upload_timeout` error.

Nothing produced is silently dropped: an image that fits nowhere is a per-image error naming why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from serving.errors import JobError
from serving.outputs import CONTENT_TYPES, base64_entry, image_entry
from serving.storage import ImageStore, StorageError, StoredObject
from serving.storage_config import PUBLIC_ONLY, StorageConfig, StorageConfigError, storage_config_from_job

log = logging.getLogger(__name__)
# Lower bounds of encoded size per pixel for the up-front checks (a job certain to overflow is
# refused or sent to storage before it runs); the real size of every chunk is counted as produced.
MIN_BYTES_PER_PIXEL = {"png": 0.5, "webp": 0.05, "jpeg": 0.05}
SUMMARY_RESERVE_BYTES = 16 * 1024
CHUNK_OVERHEAD_BYTES = 256  # an image chunk's JSON around the base64: index, seed, size, progress
_SMALLER = 'use delivery "url", fewer or smaller images, or webp/jpeg'


@dataclass(frozen=True)
class StorageIO:
    """What every job's delivery shares: the storage pool (BUCKET_UPLOAD_WORKERS threads, apart
    from the encode pool) and the two deadlines."""

    pool: Executor
    delivery_timeout_s: float
    lookup_timeout_s: float


async def open_job_store(s3_config: Any, defaults: StorageConfig | None, io: StorageIO, *, allow_private: bool,
                         resolve_timeout_s: float) -> ImageStore:
    """A job's own store from its `s3Config`, checked on the storage pool within
    `resolve_timeout_s` (a host whose DNS does not answer in time is refused like a private one:
    the same words, nothing to learn), then built there too (making a client takes a while)."""
    loop = asyncio.get_running_loop()
    check = loop.run_in_executor(io.pool, partial(storage_config_from_job, s3_config, defaults,
                                                  allow_private=allow_private))
    try:
        async with asyncio.timeout(resolve_timeout_s):  # not wait_for: it drops a cancel on 3.11
            config = await check
    except TimeoutError:
        raise StorageConfigError(PUBLIC_ONLY, field="s3Config.endpointUrl") from None
    return await loop.run_in_executor(io.pool, ImageStore, config)


@dataclass
class Delivered:
    """One image's final answer: its chunk entry, or an error; `switched_to_url` when it went to
    the bucket because base64 would not fit."""

    entry: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    switched_to_url: bool = False


@dataclass
class PendingUpload:
    """An upload handed to the storage pool; `Delivery.settle` waits for it up to `deadline`."""

    future: Future[StoredObject]
    deadline: float
    meta: dict[str, Any]
    image_format: str
    data: bytes
    switched_to_url: bool = False


def _chunk_bytes(entry: dict[str, Any]) -> int:
    return len(json.dumps({"image": entry, "progress": {"completed": 16, "total": 16}}))


class Delivery:
    """One job's delivery: where its images go and how much of the response they have used."""

    def __init__(self, method: str, store: ImageStore | None, limit_bytes: int, use_cache: bool, io: StorageIO,
                 chunk_limit_bytes: int) -> None:
        self.method = method
        self.store = store
        self.limit_bytes = limit_bytes
        self.chunk_limit_bytes = chunk_limit_bytes
        self.io = io
        self.use_cache = use_cache and store is not None and store.config.result_cache
        self.switched_to_url = False  # decided by `plan`, before any image; per image: Delivered's
        self._used = SUMMARY_RESERVE_BYTES
        self._lock = threading.Lock()

    @classmethod
    def plan(
        cls, method: str, store: ImageStore | None, limit_bytes: int, pixels: int, count: int, image_format: str,
        *, io: StorageIO, chunk_limit_bytes: int,
    ) -> Delivery:
        """Refuse, or switch to url, when base64 is certain not to fit the response or one chunk."""
        if method == "url" and store is None:
            raise JobError(
                "invalid_input", "url delivery needs storage: set BUCKET_* or send s3Config", field="delivery"
            )
        floor = pixels * MIN_BYTES_PER_PIXEL[image_format] * 4 / 3  # base64 of one image, at least
        delivery = cls(method, store, limit_bytes, method == "url", io, chunk_limit_bytes)
        if method != "base64":
            return delivery
        if floor + CHUNK_OVERHEAD_BYTES > chunk_limit_bytes:
            reason = (f"one {image_format} image of {pixels} pixels needs at least {floor / 1e6:.1f} MB of base64, "
                      f"over the {chunk_limit_bytes / 1e6:g} MB stream chunk limit (MAX_CHUNK_BYTES)")
        elif floor * count + SUMMARY_RESERVE_BYTES > limit_bytes:
            reason = (f"{count} {image_format} images need at least {floor * count / 2**20:.1f} MB of base64, "
                      f"over the {limit_bytes / 2**20:.0f} MB result limit")
        else:
            return delivery
        if store is None:
            raise JobError("payload_too_large", f"{reason}: {_SMALLER}", field="delivery")
        delivery.method, delivery.switched_to_url = "url", True
        return delivery

    async def cached(self, cache_params: Mapping[str, Any], image_format: str) -> dict[str, Any] | None:
        """An earlier identical image already in the bucket (one HEAD), or None: also when the
        lookup has not answered within CACHE_LOOKUP_TIMEOUT_S (the thread finishes on its own)."""
        if not self.use_cache or self.method != "url":
            return None
        key = self.store.cache_key(cache_params, image_format)
        lookup = asyncio.get_running_loop().run_in_executor(self.io.pool, self.store.lookup, key)
        try:
            async with asyncio.timeout(self.io.lookup_timeout_s):
                stored = await lookup
        except TimeoutError:
            return None
        return None if stored is None else {"url": stored.url, "key": stored.key, "cached": True}

    def deliver(
        self, job_id: str, index: int, seed: int, width: int, height: int, image_format: str, data: bytes,
        cache_params: Mapping[str, Any],
    ) -> Delivered | PendingUpload:
        """Inline now, or an upload handed to the storage pool: never waits on storage (this runs
        on the encode pool)."""
        if self.method == "url":
            return self._upload(job_id, index, seed, width, height, image_format, data, cache_params)
        entry = base64_entry(index, seed, width, height, image_format, data)
        size = _chunk_bytes(entry)
        if size <= self.chunk_limit_bytes and self._reserve(size):
            return Delivered(entry)
        if self.store is not None:
            return self._upload(job_id, index, seed, width, height, image_format, data, cache_params, switched=True)
        limit = ("result limit" if size <= self.chunk_limit_bytes
                 else f"{self.chunk_limit_bytes / 1e6:g} MB stream chunk limit")
        return Delivered(error_code="payload_too_large",
                         error_message=f"this image would pass the {limit}: {_SMALLER}")

    async def settle(self, delivered: Delivered | PendingUpload | None) -> Delivered | None:
        """The final answer for one image: a pending upload is waited for until its deadline."""
        if not isinstance(delivered, PendingUpload):
            return delivered
        wait = max(0.0, delivered.deadline - time.monotonic())
        try:
            # on timeout the wrapped future is cancelled: an upload still queued never starts
            async with asyncio.timeout(wait):
                stored = await asyncio.wrap_future(delivered.future)
        except TimeoutError:
            return self._fallback(delivered, "upload_timeout",
                                  f"upload not done within DELIVERY_TIMEOUT_S={self.io.delivery_timeout_s:g} s")
        except StorageError as err:
            return self._fallback(delivered, "upload_failed", f"upload failed ({err.code})")
        except Exception:  # a bug here is this image's failure, never a silent loss
            log.exception("settling the upload of image %d failed", delivered.meta["index"])
            return self._fallback(delivered, "upload_failed", "upload failed (error)")
        return Delivered(image_entry(**delivered.meta, url=stored.url, key=stored.key),
                         switched_to_url=delivered.switched_to_url)

    def _upload(
        self, job_id: str, index: int, seed: int, width: int, height: int, image_format: str, data: bytes,
        cache_params: Mapping[str, Any], switched: bool = False,
    ) -> PendingUpload:
        key = (self.store.cache_key(cache_params, image_format) if self.use_cache
               else self.store.job_key(job_id, index, seed, image_format))
        future = self.io.pool.submit(self.store.put, key, data, CONTENT_TYPES[image_format])
        meta = {"index": index, "seed": seed, "width": width, "height": height, "image_format": image_format}
        return PendingUpload(future, time.monotonic() + self.io.delivery_timeout_s, meta, image_format, data, switched)

    def _fallback(self, pending: PendingUpload, code: str, reason: str) -> Delivered:
        entry = base64_entry(**pending.meta, data=pending.data)
        entry["delivery_fallback"] = f"{reason}: returned inline"
        size = _chunk_bytes(entry)
        if size <= self.chunk_limit_bytes and self._reserve(size):
            return Delivered(entry)
        return Delivered(error_code=code, error_message=f"{reason} and the image does not fit inline")

    def _reserve(self, size: int) -> bool:
        with self._lock:
            if self._used + size > self.limit_bytes:
                return False
            self._used += size
            return True
