"""What the device can take and what its failures mean: the row limit of a call from free GPU
memory, and which errors a call survives (out of memory: split it) or the process does not (a
broken CUDA context: ask RunPod for a fresh worker)."""

from __future__ import annotations

from typing import Any

import torch

from pipelines.engine import Engine
from pipelines.startup import free_gpu_bytes
from serving.schema import MAX_IMAGES
from serving.settings import Settings

CPU_MAX_BATCH = 4
_FATAL_MARKERS = (
    "CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure", "ECC error"
)


def batch_limit(settings: Settings, engine: Engine, spec: Any, free_bytes: int | None = None) -> int:
    """MAX_BATCH when set; else what free GPU memory (`free_bytes`, measured once after start-up)
    holds at this spec's size (4 on CPU), at most one job's worth of images."""
    if settings.max_batch:
        return settings.max_batch
    if engine.device.type != "cuda":
        return CPU_MAX_BATCH
    if free_bytes is None:
        free_bytes = free_gpu_bytes()
    return max(1, min(MAX_IMAGES, int(free_bytes // engine.activation_bytes(spec))))


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError)


def is_fatal_device_error(err: BaseException) -> bool:
    """CUDA errors that leave the context unusable: only a fresh worker recovers from these."""
    return isinstance(err, RuntimeError) and not is_oom(err) and any(m in str(err) for m in _FATAL_MARKERS)
