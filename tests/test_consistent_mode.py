"""Consistent mode (PuLID-FLUX demo bundle) through the handler: what a client of /runsync sees.

The demo face detector looks at the reference's top-left corner: mid-grey noise is one face,
black is none, white is two (models/demo_pulid.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving.local_run import collect
from serving.settings import load_settings
from serving.worker import Worker
from tests.conftest import assert_regenerates, pixels, run_job

# lossless: pixels compared
SMALL = {"width": 64, "height": 64, "steps": 3, "guidance_scale": 3.5, "output_format": "png"}
PROMPT = "portrait photo of a person"


def png_b64(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def face(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(60, 200, size=(96, 128, 3), dtype=np.uint8)


REFERENCE = png_b64(face(0))


def consistent(**extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "mode": "consistent", "reference_image": REFERENCE, "seed": 11, **SMALL, **extra}


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_consistent_job_reports_the_mode_and_is_reproducible(handler_module):
    first = run_job(handler_module, consistent(num_images=2, identity_start_step=0))
    assert first["errors"] == [] and len(first["images"]) == 2
    assert first["mode"] == first["mode_requested"] == first["settings"]["mode"] == "consistent"
    assert first["workflow"] == "pulid-flux" and "fallback_reason" not in first
    assert first["settings"]["id_weight"] == 1.0 and first["settings"]["identity_start_step"] == 0
    assert [(i["index"], i["seed"]) for i in first["images"]] == [(0, 11), (1, 12)]
    assert all(pixels(i).shape == (64, 64, 3) for i in first["images"])
    assert first["batch_sizes"] == [2]  # a job's consistent images share one pipeline call
    again = run_job(handler_module, consistent(num_images=2, identity_start_step=0))
    assert again["identity_cache_hit"] is True
    for a, b in zip(first["images"], again["images"]):
        assert_regenerates(pixels(a), pixels(b))
    # image 1 of the batch is the seed-12 image alone
    alone = run_job(handler_module, consistent(seed=12, identity_start_step=0))
    assert_regenerates(pixels(first["images"][1]), pixels(alone["images"][0]))
    assert diff(pixels(first["images"][0]), pixels(first["images"][1])) > 1.0


def test_identity_injection_changes_the_image(handler_module):
    with_id = run_job(handler_module, consistent(id_weight=1.0, identity_start_step=0))
    without = run_job(handler_module, consistent(id_weight=0.0, identity_start_step=0))
    other_face = run_job(handler_module, consistent(reference_image=png_b64(face(1)), identity_start_step=0))
    assert without["settings"]["id_weight"] == 0.0
    assert diff(pixels(with_id["images"][0]), pixels(without["images"][0])) > 1.0
    assert diff(pixels(with_id["images"][0]), pixels(other_face["images"][0])) > 0.1


def test_identity_cache_is_hit_on_the_second_job(handler_module):
    reference = png_b64(face(1234))
    data_uri = "data:image/png;base64," + reference
    first = run_job(handler_module, consistent(reference_image=reference, steps=1))
    second = run_job(handler_module, consistent(reference_image=data_uri, steps=1, seed=99))
    assert (first["identity_cache_hit"], second["identity_cache_hit"]) == (False, True)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (png_b64(np.zeros((96, 96, 3), np.uint8)), "no_face: reference_image: "),
        (png_b64(np.full((96, 96, 3), 255, np.uint8)), "multiple_faces: reference_image: "),
        ("http://example.com/face.png", "invalid_reference: reference_image: URLs must use https"),
        ("https://127.0.0.1/face.png", "invalid_reference: reference_image: URL must point to a public address"),
        ("https://localhost/face.png", "invalid_reference: reference_image: URL must point to a public address"),
        ("https://10.0.0.1/face.png", "invalid_reference: reference_image: URL must point to a public address"),
        ("https://169.254.169.254/latest/meta-data/",
         "invalid_reference: reference_image: URL must point to a public address"),
        ("https://[::1]/face.png", "invalid_reference: reference_image: URL must point to a public address"),
        ("https://example.com:99999/face.png", "invalid_reference: reference_image: is not a valid URL"),
        ("not base64 at all!", "invalid_reference: reference_image: is neither an https URL nor valid base64"),
        (base64.b64encode(b"plain text, not an image").decode(),
         "invalid_reference: reference_image: is not a readable image"),
        (png_b64(face(3)[:10, :10]), "invalid_reference: reference_image: must be at least 64 pixels"),
    ],
)
def test_bad_references_are_clear_errors(handler_module, reference, expected):
    result = run_job(handler_module, consistent(reference_image=reference, steps=1))
    assert result["error"].startswith(expected), result["error"]
    assert "Traceback" not in result["error"]


# -- consistent mode unavailable -------------------------------------------------------------------
@pytest.fixture(scope="module")
def fast_only() -> Worker:
    return Worker.start(load_settings({"PULID_ENABLED": "0"}))


def run(worker: Worker, job_input: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(collect(worker.run_job, {"id": "t", "input": job_input}))


def test_mode_unavailable_is_a_clear_error(fast_only):
    result = run(fast_only, consistent())
    assert result["error"] == "mode_unavailable: mode: consistent mode is unavailable: disabled by PULID_ENABLED=0"
    caps = run(fast_only, {"action": "capabilities"})
    assert {m["name"]: m["available"] for m in caps["modes"]} == {"fast": True, "consistent": False}


def test_fallback_fast_runs_fast_mode_and_says_so(fast_only):
    fell_back = run(fast_only, consistent(fallback="fast", steps=2, guidance_scale=0.0))
    assert fell_back["errors"] == [] and len(fell_back["images"]) == 1
    assert fell_back["mode"] == fell_back["settings"]["mode"] == "fast"
    assert fell_back["mode_requested"] == "consistent"
    assert fell_back["fallback_reason"] == "consistent mode is unavailable: disabled by PULID_ENABLED=0"
    assert "identity_cache_hit" not in fell_back and fell_back["workflow"].startswith("z-image")
    fast = run(fast_only, {"prompt": PROMPT, "seed": 11, "width": 64, "height": 64, "steps": 2, "output_format": "png"})
    assert_regenerates(pixels(fell_back["images"][0]), pixels(fast["images"][0]))  # the fast image


def test_left_out_steps_and_guidance_follow_the_mode_that_ran(fast_only, handler_module):
    sampling = {"prompt": PROMPT, "mode": "consistent", "reference_image": REFERENCE, "width": 64, "height": 64}
    fell_back = run(fast_only, {**sampling, "fallback": "fast"})
    assert (fell_back["settings"]["steps"], fell_back["settings"]["guidance_scale"]) == (8, 0.0)
    ran = run_job(handler_module, sampling)
    assert ran["errors"] == [] and ran["mode"] == "consistent"
    assert (ran["settings"]["steps"], ran["settings"]["guidance_scale"]) == (20, 4.0)


# -- batching across jobs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patient() -> Worker:
    """Consistent mode on, a batch waits long enough for concurrent jobs to join it, and rows
    always join (not as timings on this machine say)."""
    return Worker.start(load_settings({"BATCH_WAIT_MS": "400", "MAX_BATCH": "4", "BATCH_JOIN_COST": "1"}))


def run_together(worker: Worker, *inputs: dict[str, Any]) -> list[dict[str, Any]]:
    async def go():
        return await asyncio.gather(*(collect(worker.run_job, {"id": f"j{i}", "input": job})
                                      for i, job in enumerate(inputs)))

    return asyncio.run(go())


def test_concurrent_consistent_jobs_share_a_batch_and_keep_their_seeds(patient):
    other_face = png_b64(face(7))
    a, b, c = run_together(patient, consistent(seed=21, identity_start_step=0),
                           consistent(seed=22, identity_start_step=0),
                           consistent(seed=23, identity_start_step=0, reference_image=other_face))
    # one size: every call runs all three, each row with its own identity
    assert a["batch_sizes"] == b["batch_sizes"] == c["batch_sizes"] == [3]
    alone_a, alone_c = run_together(patient, consistent(seed=21, identity_start_step=0),
                                    consistent(seed=23, identity_start_step=0, reference_image=other_face))
    assert_regenerates(pixels(a["images"][0]), pixels(alone_a["images"][0]))
    assert_regenerates(pixels(c["images"][0]), pixels(alone_c["images"][0]))


def test_an_unexpected_failure_while_planning_is_a_clean_error(handler_module, monkeypatch):
    import serving.input_image as input_image

    def broken(value, field):
        raise RuntimeError("injected bug")

    monkeypatch.setattr(input_image, "load_image", broken)
    result = run_job(handler_module, consistent(steps=1))
    assert result == {"error": "internal_error: RuntimeError while preparing the job"}
    monkeypatch.undo()
    assert len(run_job(handler_module, consistent(steps=1))["images"]) == 1  # the worker serves on
