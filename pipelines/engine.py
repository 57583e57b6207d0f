"""The one interface every pipeline serves through, and the data that crosses it.

The scheduler (serving/batcher.py) knows engines only through `Engine`: which images may share a
call (`batch_key`), how much memory one image needs (`activation_bytes`), and the call itself
(`generate`). Each engine defines its own spec type (what all images of one call share) next to
its code; serving never looks inside a spec.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from collections.abc import Callable, Hashable

import numpy as np
import torch

if TYPE_CHECKING:
    from pipelines.img2img import InitImage

StopCheck = Callable[[], bool]
_batch_ids = itertools.count(1)


class SamplingStopped(Exception):
    """Raised between model calls when every image of the batch was cancelled."""


@dataclass(frozen=True)
class ImageItem:
    """One image to make: its own prompt, negative prompt, seed, and adapters (LoRA, scale) that
    apply to it alone (images with different adapters share a call: pipelines/lora.py); for
    image-to-image, the image (and mask) it starts from (pipelines/img2img.py)."""

    prompt: str
    negative_prompt: str
    seed: int
    loras: tuple[tuple[Any, float], ...] = ()
    init: InitImage | None = field(default=None, compare=False)


@dataclass
class BatchResult:
    """One model call's uint8 images (B, H, W, 3), the ms each stage took, and the call's id
    (its images reach several jobs; each job counts the call's timings once)."""

    images: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_id: int = field(default_factory=lambda: next(_batch_ids))


@dataclass(frozen=True)
class ModelIdentity:
    """What is serving: a hub id and revision, or a demo model with random weights."""

    id: str
    revision: str
    demo: bool


class Engine(Protocol):
    """A warm pipeline. `generate` runs on the scheduler's one GPU thread, nothing else does."""

    name: str
    device: torch.device
    identity: ModelIdentity

    def batch_key(self, spec: Any, item: ImageItem) -> Hashable:
        """Images with equal keys may share one `generate` call and come out as each alone."""

    def activation_bytes(self, spec: Any) -> float:
        """Peak GPU memory one image of `spec` adds to a call."""

    def generate(self, items: list[ImageItem], spec: Any, should_stop: StopCheck) -> BatchResult:
        """One batched call; raises `SamplingStopped` when `should_stop()` turns true."""

    def numerics(self) -> dict[str, Any]:
        """What changes pixels besides the request (dtype, FP8): part of the result-cache key."""
