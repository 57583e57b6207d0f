"""Images a request carries — consistent mode's reference photo, image-to-image's init image and
mask — decoded from base64 / a data URI, or fetched over https.

Everything here comes from outside, so everything is bounded: encoded size, pixel count (a
decompression bomb is refused before decoding), image type, and the fetch (serving/public_fetch.py:
public addresses only, pinned connection, one 10 s deadline for the whole transfer). A refusal
names the request field the image came in, with that field's error code.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from serving import public_fetch
from serving.errors import JobError
from serving.public_fetch import FetchError, FetchLimits

MAX_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000
MIN_SIDE = 64
FETCH_TIMEOUT_S = 10.0  # in total, for one image (all redirects included)
MAX_REDIRECTS = 3
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


@dataclass(frozen=True)
class ImageField:
    """A request field that carries an image, and the error code its refusals use."""

    name: str
    code: str

    def invalid(self, rule: str) -> JobError:
        return JobError(self.code, rule, field=self.name)


REFERENCE = ImageField("reference_image", "invalid_reference")
INIT = ImageField("init_image", "invalid_image")
MASK = ImageField("mask_image", "invalid_image")


def load_image(value: str, field: ImageField) -> tuple[bytes, np.ndarray]:
    """The image's bytes and its RGB uint8 pixels, from base64, a data URI or an https URL."""
    if value.startswith("https://"):
        data = fetch_https(value, field)
    elif value.startswith(("http://", "ftp://", "file:")):
        raise field.invalid("URLs must use https")
    else:
        data = _decode_base64(value, field)
    return data, decode_image(data, field)


async def load_images(pool: Executor, sources: list[tuple[ImageField, str]],
                      timeout_s: float) -> list[tuple[bytes, np.ndarray]]:
    """`load_image` for each (field, value) of `sources`, all at once on `pool` (a slow host holds
    only its job), in order, within one deadline: the first refusal as soon as it comes; an image
    still loading at the deadline is refused by its field (its thread ends at its own fetch
    deadline)."""
    loop = asyncio.get_running_loop()
    loads = [loop.run_in_executor(pool, load_image, value, field) for field, value in sources]
    done, pending = await asyncio.wait(loads, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
    for future in pending:
        future.cancel()
    for future in loads:  # a refusal first: the wait ended early for it, the others still loading
        if future in done and future.exception() is not None:
            raise future.exception()
    for (field, _value), future in zip(sources, loads):
        if future in pending:
            raise field.invalid("took too long to fetch or read")
    return [future.result() for future in loads]


def _decode_base64(value: str, field: ImageField) -> bytes:
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise field.invalid("data URIs must be base64-encoded")
    if len(value) > MAX_BYTES * 4 // 3 + 4:
        raise field.invalid(f"must be at most {MAX_BYTES // 2**20} MB")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise field.invalid("is neither an https URL nor valid base64") from None


def decode_image(data: bytes, field: ImageField = REFERENCE) -> np.ndarray:
    """Check type and size from the header first; decode only what passes."""
    if len(data) > MAX_BYTES:
        raise field.invalid(f"must be at most {MAX_BYTES // 2**20} MB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ALLOWED_FORMATS:
                raise field.invalid(f"must be PNG, JPEG or WebP, got {image.format}")
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise field.invalid(f"has {width}x{height} pixels, more than {MAX_PIXELS}")
            if min(width, height) < MIN_SIDE:
                raise field.invalid(f"must be at least {MIN_SIDE} pixels on each side")
            return np.asarray(image.convert("RGB"))
    except JobError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise field.invalid("is not a readable image") from None


def fetch_https(url: str, field: ImageField = REFERENCE) -> bytes:
    """GET the image (serving/public_fetch.py): public targets only, bounded redirects, size and one
    total deadline."""
    try:
        return public_fetch.fetch_https(url, FetchLimits(MAX_BYTES, FETCH_TIMEOUT_S, MAX_REDIRECTS, "image/*"))
    except FetchError as err:
        raise field.invalid(err.rule) from None
