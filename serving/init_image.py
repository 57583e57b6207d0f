"""Image-to-image's inputs: the init image and its optional mask, fetched and decoded on their own
pool within one deadline (a slow host holds only its job), checked, and prepared at the size the
job serves, off the event loop.

The size: with `width`/`height` or `aspect_ratio`/`megapixels` the images have that size and the
init image (and mask) are scaled to cover it and centre-cropped (never stretched); with none of
them the images take the init image's own size, scaled down whole when a side passes 2048 or the
area passes MAX_PIXELS, and floored to multiples of 16 (as diffusers' image processor floors
it). A mask must have the init image's size.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.img2img import InitImage, preprocess_image, preprocess_mask
from serving import input_image
from serving.input_image import INIT, MASK, load_images
from serving.schema import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, GenerateRequest

LOAD_TIMEOUT_S = 30.0  # a job's init image and mask together: fetched, decoded, prepared


@dataclass(frozen=True)
class InitInput:
    """A job's init image, ready: its rows' `InitImage`, the size the job serves, the hashes the
    result cache keys and the summary echoes (never the data or a URL), and a note when the
    served size is not the image's own."""

    image: InitImage
    width: int
    height: int
    sha256: str
    mask_sha256: str | None
    size_note: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"sha256": self.sha256, **({"mask_sha256": self.mask_sha256} if self.mask_sha256 else {})}


def size_from_image(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The size a job with no size asked serves an init image of width x height at: scaled down
    whole to fit MAX_SIDE and `max_pixels`, sides floored to multiples of 16, at least 64."""
    scale = min(1.0, MAX_SIDE / max(width, height), math.sqrt(max_pixels / (width * height)))

    def side(length: int) -> int:
        return max(MIN_SIDE, int(length * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)

    return side(width), side(height)


def describe(max_pixels: int) -> dict[str, Any]:
    """Capabilities' `image_to_image`: its fields, where it runs, and the bounds on its images."""
    return {
        "fields": ["init_image", "mask_image", "strength"], "modes": ["fast"],
        "model_calls": {"z-image-simple": "steps - int(steps - steps*strength)",
                        "z-image-danrisi": "2*k + 1, k = the schedule's steps below 0.996*strength, plus one"},
        "images": {"max_mb": input_image.MAX_BYTES // 2**20, "max_pixels": input_image.MAX_PIXELS,
                   "min_side": input_image.MIN_SIDE, "formats": sorted(input_image.ALLOWED_FORMATS),
                   "fetch_timeout_s": input_image.FETCH_TIMEOUT_S, "load_timeout_s": LOAD_TIMEOUT_S},
        "mask": "white repaints, black keeps; the init image's size",
        "size": f"width/height or aspect_ratio when given, else the init image's (within {MAX_SIDE} per side "
                f"and {max_pixels} pixels, multiples of {SIZE_MULTIPLE})",
    }


class InitImageLoader:
    """Loads a job's init image and mask on a pool of its own (two fetches per job in flight)."""

    def __init__(self, concurrency: int, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(2 * concurrency, thread_name_prefix="init-image")

    async def load(self, request: GenerateRequest) -> InitInput | None:
        """None for text-to-image; else both images fetched at once, within one deadline."""
        if request.init_image is None:
            return None
        sources = [(INIT, request.init_image)] + ([(MASK, request.mask_image)] if request.mask_image else [])
        (init_data, init_rgb), *mask = await load_images(self._pool, sources, LOAD_TIMEOUT_S)
        if request.size_from_init_image:
            width, height = size_from_image(init_rgb.shape[1], init_rgb.shape[0], self.max_pixels)
        else:
            width, height = request.width, request.height
        mask_data, mask_rgb = mask[0] if mask else (None, None)
        if mask_rgb is not None and mask_rgb.shape[:2] != init_rgb.shape[:2]:
            raise MASK.invalid(f"is {mask_rgb.shape[1]}x{mask_rgb.shape[0]}: it must have init_image's size, "
                               f"{init_rgb.shape[1]}x{init_rgb.shape[0]}")
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(self._pool, _prepare, init_rgb, mask_rgb, width, height)
        note = None
        if (width, height) != (init_rgb.shape[1], init_rgb.shape[0]):
            how = ("scaled to fit the size limits, sides multiples of 16" if request.size_from_init_image
                   else "scaled to cover that size and centre-cropped")
            note = f"init_image is {init_rgb.shape[1]}x{init_rgb.shape[0]}: served at {width}x{height}, {how}"
        return InitInput(image, width, height, hashlib.sha256(init_data).hexdigest(),
                         hashlib.sha256(mask_data).hexdigest() if mask_data is not None else None, note)


def _prepare(init_rgb: np.ndarray, mask_rgb: np.ndarray | None, width: int, height: int) -> InitImage:
    mask = None if mask_rgb is None else preprocess_mask(mask_rgb, width, height)
    return InitImage(preprocess_image(init_rgb, width, height), mask)
