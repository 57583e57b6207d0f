"""`{"action": "capabilities"}`: what this worker can serve, read from the loaded engines, the
settings and the input schema (limits are stated once, there)."""

from __future__ import annotations

import dataclasses
import platform
from importlib import metadata
from typing import Any

import torch

from pipelines.z_image import BatchSpec
from serving import init_image
from serving.modes import Modes
from serving.schema import input_limits
from serving.settings import Settings
from serving.startup_timing import StartupTimer
from serving.storage import ImageStore


def capabilities(settings: Settings, modes: Modes, store: ImageStore | None, startup: StartupTimer,
                 max_batch_1024: int) -> dict[str, Any]:
    engine = modes.fast.engine
    identity = engine.identity
    return {
        "model": {"id": identity.id, "revision": identity.revision, "demo": identity.demo},
        "workflows": modes.fast.workflows(),
        "modes": modes.describe(),
        "loras": modes.fast.loras.describe(),
        "image_to_image": init_image.describe(settings.max_pixels),
        "delivery": {"base64": True, "url": store is not None, "url_with_job_s3Config": True,
                     "result_cache": bool(store and store.config.result_cache)},
        "limits": {**input_limits(), "max_pixels": settings.max_pixels, "job_timeout_s": settings.job_timeout_s,
                   "max_response_bytes": settings.max_response_bytes},
        "batching": {"max_batch_1024": max_batch_1024, "wait_ms": settings.batch_wait_ms,
                     "concurrency": settings.concurrency, "unit": "model call",
                     "join_cost": settings.batch_join_cost, "work_weight": settings.work_weight,
                     "priority_offset_s": settings.priority_offset_s,
                     "decode_megapixels": settings.decode_megapixels},
        "device": str(engine.device),
        "gpu": torch.cuda.get_device_name(0) if engine.device.type == "cuda" else None,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "load_seconds": round(engine.load_seconds, 3),
        "startup_ms": startup.as_dict(),
        "acceleration": dataclasses.asdict(engine.acceleration),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{name: _version(name) for name in ("diffusers", "transformers", "runpod")}},
    }


def _version(distribution: str) -> str | None:
    """Read from the installed metadata: no import (the GPU check's machine has no runpod SDK)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def max_batch_spec() -> BatchSpec:
    """The spec capabilities' `max_batch_1024` is computed for: the default 1024², 8 steps, no CFG."""
    return BatchSpec(1024, 1024, 8, 0.0, "z-image-simple")
