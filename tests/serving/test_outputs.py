"""Image encoding, chunk shapes and their merge into one result."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from serving.outputs import (
    base64_entry, effective_quality, encode_image, image_chunk, image_error_chunk, merge_chunks, without_payloads,
)

PIXELS = np.random.default_rng(0).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)


def test_png_is_lossless_and_webp_jpeg_decode_at_the_same_size():
    png = encode_image(PIXELS, "png", None)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), PIXELS)  # bytes, not float arithmetic
    for image_format, name in (("webp", "WEBP"), ("jpeg", "JPEG")):
        decoded = Image.open(io.BytesIO(encode_image(PIXELS, image_format, 80)))
        assert (decoded.format, decoded.size) == (name, (48, 32))


def test_quality_applies_to_lossy_formats_only():
    assert effective_quality("png", 50) is None
    assert effective_quality("webp", None) == 90 and effective_quality("jpeg", 70) == 70


def test_merge_orders_images_and_errors_by_index_and_keeps_the_summary():
    chunks = [image_chunk(base64_entry(2, 9, 8, 8, "png", b"b"), 1, 3),
              image_error_chunk({"index": 1, "seed": 8, "code": "timeout", "message": "m"}, 2, 3),
              image_chunk(base64_entry(0, 7, 8, 8, "png", b"a"), 3, 3),
              {"summary": {"images_completed": 2}}]
    merged = merge_chunks(chunks)
    assert [image["index"] for image in merged["images"]] == [0, 2]
    assert [error["index"] for error in merged["errors"]] == [1] and merged["images_completed"] == 2
    assert base64.b64decode(merged["images"][0]["base64"]) == b"a"


def test_a_result_is_printable_without_its_payloads():
    result = merge_chunks([image_chunk(base64_entry(0, 1, 8, 8, "png", b"x" * 300), 1, 1)])
    printed = without_payloads(result)
    assert "base64" not in printed["images"][0] and printed["images"][0]["base64_chars"] == 400
