"""Image-to-image's inputs: the request rules, the init image and mask loaded on their own pool
within one deadline, the size the job serves, and the worker end to end."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving import init_image
from serving import input_image
from serving.errors import JobError
from serving.init_image import InitImageLoader, size_from_image
from serving.local_run import collect
from serving.schema import parse_job_input
from serving.settings import load_settings
from serving.startup import LoadedEngines
from serving.worker import Worker
from tests.conftest import assert_differs, assert_regenerates, pixels, run_job
from tests.serving.test_input_image import (  # noqa: F401 - https_host is a fixture
    beside_a_dripping_job, https_host, png_claiming,
)

MAX_PIXELS = 2048 * 2048


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def half_mask(width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width, 3), np.uint8)
    mask[:, width // 2:] = 255
    return mask


def load(**fields: Any):
    request = parse_job_input({"prompt": "a cat", **fields})
    return asyncio.run(InitImageLoader(1, MAX_PIXELS).load(request))


def refused(**fields: Any) -> str:
    with pytest.raises(JobError) as caught:
        load(**fields)
    return caught.value.message


# -- request rules -----------------------------------------------------------------------------------
STRENGTH_RANGE = "invalid_input: strength: must be a finite number greater than 0 and at most 1"


@pytest.mark.parametrize(("fields", "message"), [
    ({"init_image": "aGk=", "strength": 0}, STRENGTH_RANGE),
    ({"init_image": "aGk=", "strength": 1.5}, STRENGTH_RANGE),
    ({"init_image": "aGk=", "strength": float("nan")}, STRENGTH_RANGE),
    ({"strength": 0.5}, "invalid_input: strength: is only used with init_image"),
    ({"mask_image": "aGk="}, "invalid_input: mask_image: needs init_image (the image it masks)"),
    ({"init_image": "aGk=", "mode": "consistent", "reference_image": "aGk="},
     "invalid_input: init_image: is only available in fast mode (Z-Image), not with PuLID-FLUX"),
    ({"init_image": ""}, "invalid_input: init_image: must not be empty"),
])
def test_request_rules_name_the_field(fields, message):
    with pytest.raises(JobError) as caught:
        parse_job_input({"prompt": "a cat", **fields})
    assert caught.value.message == message


def test_strength_defaults_to_0_6_and_the_size_to_the_init_images():
    request = parse_job_input({"prompt": "a cat", "init_image": "aGk="})
    assert request.image_strength == 0.6 and request.size_from_init_image
    sized = parse_job_input({"prompt": "a cat", "init_image": "aGk=", "aspect_ratio": "3:4", "strength": 1})
    assert sized.image_strength == 1.0 and not sized.size_from_init_image
    assert parse_job_input({"prompt": "a cat"}).image_strength is None


# -- images refused, by field ------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "message"), [
    ({"init_image": b64(b"%PDF-1.7 not an image")}, "invalid_image: init_image: is not a readable image"),
    ({"init_image": b64(png_claiming(7000, 7000))},
     "invalid_image: init_image: has 7000x7000 pixels, more than 40000000"),
    ({"init_image": "A" * (input_image.MAX_BYTES * 4 // 3 + 8)}, "invalid_image: init_image: must be at most 10 MB"),
    ({"init_image": "http://example.com/a.png"}, "invalid_image: init_image: URLs must use https"),
    ({"init_image": "https://127.0.0.1/a.png"}, "invalid_image: init_image: URL must point to a public address"),
    ({"init_image": b64(png(noise(96, 64))), "mask_image": "not base64!"},
     "invalid_image: mask_image: is neither an https URL nor valid base64"),
    ({"init_image": b64(png(noise(96, 64))), "mask_image": b64(png(half_mask(96, 80)))},
     "invalid_image: mask_image: is 96x80: it must have init_image's size, 96x64"),
])
def test_bad_images_are_refused_naming_their_field(fields, message):
    assert refused(**fields) == message


# -- the size a job serves ---------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "served"), [
    ((96, 64), (96, 64)), ((100, 70), (96, 64)), ((4096, 1024), (2048, 512)), ((3000, 3000), (2048, 2048)),
    ((64, 4000), (64, 2048)),
])
def test_an_init_images_own_size_is_served_within_the_limits(size, served):
    width, height = size_from_image(*size, MAX_PIXELS)
    assert (width, height) == served and width % 16 == 0 == height % 16
    assert width * height <= MAX_PIXELS and max(width, height) <= 2048


def test_without_a_size_the_job_takes_the_init_images():
    data = png(noise(100, 70))
    loaded = load(init_image=b64(data))
    assert (loaded.width, loaded.height) == (96, 64) and loaded.image.pixels.shape == (1, 3, 64, 96)
    assert loaded.size_note == ("init_image is 100x70: served at 96x64, scaled to fit the size limits, "
                                "sides multiples of 16")
    assert loaded.sha256 == hashlib.sha256(data).hexdigest() and loaded.mask_sha256 is None
    exact = load(init_image=b64(png(noise(96, 64))))
    assert exact.size_note is None and float(exact.image.pixels.min()) >= -1 and float(exact.image.pixels.max()) <= 1


def test_a_size_asked_covers_and_crops_the_init_image_and_its_mask():
    loaded = load(init_image=b64(png(noise(128, 64))), mask_image=b64(png(half_mask(128, 64))), width=64, height=64)
    assert loaded.image.pixels.shape == (1, 3, 64, 64) and loaded.image.mask.shape == (1, 1, 64, 64)
    assert loaded.size_note == "init_image is 128x64: served at 64x64, scaled to cover that size and centre-cropped"
    assert loaded.image.mask[..., :30].max() == 0 and loaded.image.mask[..., 34:].min() == 1  # the centre column


def test_the_same_image_by_base64_or_data_uri_has_one_hash():
    data = png(noise(64, 64))
    assert load(init_image=b64(data)).sha256 == load(init_image="data:image/png;base64," + b64(data)).sha256


# -- one deadline, its own pool ----------------------------------------------------------------------
def test_a_dripping_mask_host_is_cut_off_at_the_load_deadline(https_host, monkeypatch):  # noqa: F811
    monkeypatch.setattr(input_image, "FETCH_TIMEOUT_S", 60.0)  # the load's deadline trips first
    monkeypatch.setattr(init_image, "LOAD_TIMEOUT_S", 0.5)
    message = refused(init_image=f"{https_host.url}/photo.png", mask_image=f"{https_host.url}/drip-body")
    assert message == "invalid_image: mask_image: took too long to fetch or read"


def test_a_bad_mask_is_refused_at_once_while_the_init_image_still_loads(https_host, monkeypatch):  # noqa: F811
    monkeypatch.setattr(input_image, "FETCH_TIMEOUT_S", 120.0)
    monkeypatch.setattr(init_image, "LOAD_TIMEOUT_S", 120.0)  # the refusal comes long before either
    try:
        message = refused(init_image=f"{https_host.url}/drip-body", mask_image="not base64!")
    finally:
        https_host.release.set()
    assert message == "invalid_image: mask_image: is neither an https URL nor valid base64"


def test_a_dripping_init_image_host_does_not_hold_another_job(handler_module, https_host, monkeypatch):  # noqa: F811
    """Job A's init image drips; job B runs to its image meanwhile. Then the host lets go."""
    monkeypatch.setattr(input_image, "FETCH_TIMEOUT_S", 120.0)
    monkeypatch.setattr(init_image, "LOAD_TIMEOUT_S", 120.0)  # A ends when the test releases the host
    small = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "seed": 1}
    slow, fast, still_fetching = beside_a_dripping_job(
        handler_module.WORKER, https_host, {**small, "init_image": f"{https_host.url}/drip-body"}, small)
    assert fast.get("errors") == [] and len(fast["images"]) == 1, fast
    assert still_fetching
    assert slow["error"].startswith("invalid_image: init_image: "), slow


# -- the worker end to end ---------------------------------------------------------------------------
def test_image_to_image_and_inpainting_jobs_end_to_end(handler_module):
    """Images at the init image's size; the summary echoes strength and the hashes, never the data;
    image 0 regenerates alone (each row its own draws), another strength gives another image."""
    init, mask = png(noise(96, 64, seed=3)), png(half_mask(96, 64))
    job = {"prompt": "a cat", "init_image": b64(init), "mask_image": b64(mask), "steps": 4, "seed": 9,
           "num_images": 2, "strength": 0.5, "output_format": "png", "workflow": "z-image-simple"}
    result = run_job(handler_module, job)
    assert result["errors"] == [] and [(i["width"], i["height"]) for i in result["images"]] == [(96, 64)] * 2
    settings = result["settings"]
    assert settings["strength"] == 0.5 and (settings["width"], settings["height"]) == (96, 64)
    assert result["model_calls"] == 2 and "vae_encoding" in result["timings_ms"]  # 4 steps from half-way
    assert result["init_image"] == {"sha256": hashlib.sha256(init).hexdigest(),
                                    "mask_sha256": hashlib.sha256(mask).hexdigest()}
    assert b64(init)[:64] not in json.dumps({k: v for k, v in result.items() if k != "images"})
    again = run_job(handler_module, {**job, "num_images": 1})
    assert_regenerates(pixels(again["images"][0]), pixels(result["images"][0]))
    other = run_job(handler_module, {**job, "num_images": 1, "strength": 1.0})
    assert_differs(pixels(other["images"][0]), pixels(result["images"][0]))
    danrisi = run_job(handler_module, {**job, "workflow": "z-image-danrisi", "mask_image": None, "num_images": 1})
    assert danrisi["errors"] == [] and danrisi["settings"]["strength"] == 0.5
    assert "mask_sha256" not in danrisi["init_image"]


def test_capabilities_list_image_to_image(handler_module):
    caps = run_job(handler_module, {"action": "capabilities"})
    described = caps["image_to_image"]
    assert described["fields"] == ["init_image", "mask_image", "strength"] and described["modes"] == ["fast"]
    assert described["images"]["max_mb"] == 10 and described["images"]["formats"] == ["JPEG", "PNG", "WEBP"]
    assert caps["limits"]["strength"] == {"above": 0.0, "max": 1.0, "default": 0.6}


# -- sharing model calls with text to image -----------------------------------------------------------
@pytest.fixture(scope="module")
def patient(handler_module):
    """The served engine behind a worker whose first call waits (up to 1 s) until two rows are in,
    and where rows always join (not as timings on this machine say)."""
    settings = load_settings({"BATCH_WAIT_MS": "1000", "MAX_BATCH": "2", "BATCH_JOIN_COST": "1", "PULID_ENABLED": "0"})
    worker = Worker(settings, LoadedEngines(handler_module.WORKER.engine, None, "off"))
    yield worker
    worker.engine_loop.stop()


def test_an_image_to_image_job_shares_model_calls_with_a_text_to_image_job(patient, handler_module):
    """Concurrent jobs of one size: the inpainting job's 2 calls (4 steps from half-way) each carry
    the text-to-image job's row too, which goes on alone for its other 2; each image equals its
    solo run."""
    size = {"width": 64, "height": 64, "steps": 4, "seed": 3, "output_format": "png", "workflow": "z-image-simple"}
    from_image = {**size, "prompt": "a cat", "init_image": b64(png(noise(64, 64, seed=4))),
                  "mask_image": b64(png(half_mask(64, 64))), "strength": 0.5}
    from_text = {**size, "prompt": "a dog"}

    async def together():
        return await asyncio.gather(collect(patient.run_job, {"id": "i2i", "input": from_image}),
                                    collect(patient.run_job, {"id": "t2i", "input": from_text}))

    shared_image, shared_text = asyncio.run(together())
    assert (shared_image["model_calls"], shared_text["model_calls"]) == (2, 4)
    assert shared_image["batch_sizes"] == [2] and shared_text["batch_sizes"] == [2, 1]
    for shared, job in ((shared_image, from_image), (shared_text, from_text)):
        alone = run_job(handler_module, job)  # the default worker's short wait: no company
        assert alone["batch_sizes"] == [1]
        assert_regenerates(pixels(shared["images"][0]), pixels(alone["images"][0]))
