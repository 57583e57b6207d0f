"""Outputs: image encoding, the chunks a job streams, and their merge into one result.

The chunk shapes are the API (docs/API.md); `merge_chunks` is what a client does with the list
that /runsync returns.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

from serving.schema import DEFAULT_QUALITY

# Chosen for speed at 1024² on a photo-like image (docs/STORAGE.md, scripts/bench_encode.py): PNG
# level 1 and WebP method 0 are the fastest settings of each codec and still far smaller than their
# defaults are slow. The images are large and short-lived.
PNG_COMPRESS_LEVEL = 1
WEBP_METHOD = 0
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


def effective_quality(image_format: str, quality: int | None) -> int | None:
    """The quality an image is encoded at: the request's or the format's default; None for PNG,
    which is lossless (so a quality never splits its result cache nor appears in its settings)."""
    if image_format == "png":
        return None
    return quality or DEFAULT_QUALITY[image_format]


def encode_image(pixels: np.ndarray, image_format: str, quality: int | None) -> bytes:
    """uint8 HxWx3 → file bytes in the requested format."""
    image = Image.fromarray(pixels, mode="RGB") if pixels.ndim == 3 else Image.fromarray(pixels)
    buffer = io.BytesIO()
    quality = effective_quality(image_format, quality)
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=WEBP_METHOD)
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def image_chunk(entry: dict[str, Any], completed: int, total: int) -> dict[str, Any]:
    return {"image": entry, "progress": {"completed": completed, "total": total}}


def image_error_chunk(entry: dict[str, Any], completed: int, total: int) -> dict[str, Any]:
    return {"image_error": entry, "progress": {"completed": completed, "total": total}}


def image_entry(index: int, seed: int, width: int, height: int, image_format: str, **payload: Any) -> dict[str, Any]:
    """An image chunk's `image` object: what it is, then where it is (`base64`, or `url` and
    `key`, and any delivery note)."""
    return {"index": index, "seed": seed, "width": width, "height": height, "format": image_format, **payload}


def base64_entry(index: int, seed: int, width: int, height: int, image_format: str, data: bytes) -> dict[str, Any]:
    return image_entry(index, seed, width, height, image_format, base64=base64.b64encode(data).decode("ascii"))


def merge_chunks(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The list of streamed chunks → `{"images": [...], "errors": [...], **summary}`, images by index."""
    images: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for chunk in chunks:
        if "image" in chunk:
            images.append(chunk["image"])
        elif "image_error" in chunk:
            errors.append(chunk["image_error"])
        elif "summary" in chunk:
            summary = chunk["summary"]
        else:
            summary = chunk  # a one-chunk answer, such as capabilities
    images.sort(key=lambda entry: entry["index"])
    errors.sort(key=lambda entry: entry["index"])
    return {"images": images, "errors": errors, **summary} if (images or errors) else {**summary}


def without_payloads(result: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to log or print: base64 replaced by its length."""
    def strip(entry: dict[str, Any]) -> dict[str, Any]:
        if "base64" not in entry:
            return entry
        return {**{k: v for k, v in entry.items() if k != "base64"}, "base64_chars": len(entry["base64"])}

    return {**result, "images": [strip(e) for e in result.get("images", [])]} if "images" in result else result
