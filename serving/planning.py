"""A validated request → a `JobPlan`: the seed drawn once, the mode's engine and spec, one item per
image, where the images go, and which of them an identical earlier request already stored.

The plan is the one object the rest of the job reads: nothing writes back into the request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from dataclasses import dataclass, field
from typing import Any

from pipelines.engine import Engine, ImageItem
from serving.delivery import Delivery, StorageIO, open_job_store
from serving.errors import JobError
from serving.init_image import InitInput
from serving.modes import ModeChoice, Modes
from serving.outputs import effective_quality, image_entry
from serving.schema import MAX_SEED, GenerateRequest
from serving.settings import Settings
from serving.storage import ImageStore
from serving.storage_config import StorageConfigError


def spec_fields(spec: Any) -> dict[str, Any]:
    """A spec's settings as the summary echoes them and the result cache keys them (fields that
    take part in its equality: an identity's tensors do not, its reference's hash does), less the
    ones this spec leaves unset (the simple workflow has no eta)."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
            if f.compare and getattr(spec, f.name) is not None}


def model_fields(engine: Engine) -> dict[str, Any]:
    """What serves, and the numerics that change its pixels (dtype, FP8): workers that differ
    there never share cached images."""
    identity = engine.identity
    return {"id": identity.id, "revision": identity.revision, "demo": identity.demo, **engine.numerics()}


@dataclass
class JobPlan:
    """A validated job, resolved: what runs, where the images go, which are already stored."""

    request: GenerateRequest
    seed: int
    mode: ModeChoice
    items: list[ImageItem]
    delivery: Delivery
    fallback_reason: str | None = None
    cached_entries: dict[int, dict[str, Any]] = field(default_factory=dict)
    init: InitInput | None = None  # image-to-image's init image and mask, loaded

    @property
    def size_notes(self) -> list[str]:
        """Why the images' size is not what the request literally said, if it is not."""
        return [note for note in (self.request.size_note, self.init and self.init.size_note) if note]

    @property
    def engine(self) -> Engine:
        return self.mode.engine

    @property
    def spec(self) -> Any:
        return self.mode.spec

    def cache_params(self, item: ImageItem) -> dict[str, Any]:
        """Everything that decides an image's pixels and bytes: the result cache's key."""
        request, spec = self.request, self.spec
        params = {
            "model": model_fields(self.engine), "mode": self.mode.name, **spec_fields(spec),
            "prompt": item.prompt, "negative_prompt": item.negative_prompt if spec.cfg else "", "seed": item.seed,
            "format": request.output_format,
            "quality": effective_quality(request.output_format, request.output_quality),
        }
        if item.loras:  # each LoRA by its content, in order: a renamed file still hits
            params["loras"] = [[adapter.sha256, scale] for adapter, scale in item.loras]
        if self.init is not None:  # by content: the same image by URL or base64 still hits
            params["init_image"] = self.init.sha256
            params["mask_image"] = self.init.mask_sha256
        return params


async def job_store(s3_config: Any, settings: Settings, default: ImageStore | None, io: StorageIO) -> ImageStore | None:
    """The deployment's store, or the job's own RunPod `s3Config`, checked (a DNS lookup) and built
    on the storage pool: neither may block the event loop."""
    if s3_config is None:
        return default
    try:
        return await open_job_store(s3_config, settings.storage, io, allow_private=settings.job_storage_allow_private,
                                    resolve_timeout_s=settings.storage_connect_timeout_s)
    except StorageConfigError as err:
        raise JobError("invalid_input", err.rule, field=err.field) from None


async def plan_job(request: GenerateRequest, s3_config: Any, modes: Modes, settings: Settings,
                   store: ImageStore | None, io: StorageIO) -> JobPlan:
    if not request.size_from_init_image and request.width * request.height > settings.max_pixels:
        raise JobError("invalid_input", f"width x height must be at most {settings.max_pixels} pixels", field="width")
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
    job_bucket = await job_store(s3_config, settings, store, io)
    init = await modes.fast.init_images.load(request)  # before delivery: it may decide the size
    pixels = request.width * request.height if init is None else init.width * init.height
    delivery = Delivery.plan(request.delivery, job_bucket, settings.max_response_bytes, pixels, request.num_images,
                             request.output_format, io=io, chunk_limit_bytes=settings.max_chunk_bytes)
    mode, fallback_reason = await modes.choose(request, init)
    items = [ImageItem(request.prompt, request.negative_prompt, (seed + i) % (MAX_SEED + 1), mode.loras,
                       None if init is None else init.image)
             for i in range(request.num_images)]
    plan = JobPlan(request, seed, mode, items, delivery, fallback_reason, init=init)
    await find_cached(plan)
    return plan


async def find_cached(plan: JobPlan) -> None:
    """Images already in the bucket from an identical request: found by HEAD (bounded by
    CACHE_LOOKUP_TIMEOUT_S on the storage pool), never regenerated."""
    if not plan.delivery.use_cache:
        return
    lookups = [plan.delivery.cached(plan.cache_params(item), plan.request.output_format) for item in plan.items]
    for index, (item, found) in enumerate(zip(plan.items, await asyncio.gather(*lookups))):
        if found is not None:
            plan.cached_entries[index] = image_entry(index, item.seed, plan.spec.width, plan.spec.height,
                                                     plan.request.output_format, **found)
