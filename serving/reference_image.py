"""The consistent-mode reference photo: decoded from base64 / a data URI, or fetched over https.

Everything here comes from outside, so everything is bounded: encoded size, pixel count (a
decompression bomb is refused before decoding), image type, and the fetch (serving/public_fetch.py:
public addresses only, pinned connection, one 10 s deadline for the whole transfer).
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

from serving import public_fetch
from serving.errors import JobError
from serving.public_fetch import FetchError, FetchLimits

FIELD = "reference_image"
MAX_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000
MIN_SIDE = 64
FETCH_TIMEOUT_S = 10.0  # in total, for one reference (all redirects included)
MAX_REDIRECTS = 3
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


def _invalid(rule: str) -> JobError:
    return JobError("invalid_reference", rule, field=FIELD)


def load_reference_image(value: str) -> tuple[bytes, np.ndarray]:
    """The photo's bytes and its RGB uint8 pixels, from base64, a data URI or an https URL."""
    if value.startswith("https://"):
        data = fetch_https(value)
    elif value.startswith(("http://", "ftp://", "file:")):
        raise _invalid("URLs must use https")
    else:
        data = _decode_base64(value)
    return data, decode_image(data)


def _decode_base64(value: str) -> bytes:
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise _invalid("data URIs must be base64-encoded")
    if len(value) > MAX_BYTES * 4 // 3 + 4:
        raise _invalid(f"must be at most {MAX_BYTES // 2**20} MB")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("is neither an https URL nor valid base64") from None


def decode_image(data: bytes) -> np.ndarray:
    """Check type and size from the header first; decode only what passes."""
    if len(data) > MAX_BYTES:
        raise _invalid(f"must be at most {MAX_BYTES // 2**20} MB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ALLOWED_FORMATS:
                raise _invalid(f"must be PNG, JPEG or WebP, got {image.format}")
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise _invalid(f"has {width}x{height} pixels, more than {MAX_PIXELS}")
            if min(width, height) < MIN_SIDE:
                raise _invalid(f"must be at least {MIN_SIDE} pixels on each side")
            return np.asarray(image.convert("RGB"))
    except JobError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise _invalid("is not a readable image") from None



def fetch_https(url: str) -> bytes:
    """GET the photo (serving/public_fetch.py): public targets only, bounded redirects, size and one
    total deadline."""
    try:
        return public_fetch.fetch_https(url, FetchLimits(MAX_BYTES, FETCH_TIMEOUT_S, MAX_REDIRECTS, "image/*"))
    except FetchError as err:
        raise _invalid(err.rule) from None
