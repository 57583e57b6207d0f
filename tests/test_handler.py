"""The handler end to end on the demo model: what a client of /runsync sees."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT, SMALL, assert_differs, assert_regenerates, pixels, run_job


def test_generates_requested_images_with_seeds_and_metadata(handler_module):
    result = run_job(handler_module, {"prompt": "a red fox", "num_images": 3, "seed": 7, **SMALL})
    assert [(i["index"], i["seed"]) for i in result["images"]] == [(0, 7), (1, 8), (2, 9)]
    assert result["errors"] == []
    assert all(pixels(i).shape == (64, 64, 3) for i in result["images"])
    assert result["settings"]["steps"] == 2 and result["settings"]["seed"] == 7
    assert result["model"] == {"id": "demo", "revision": "z-image-tiny-random-v1", "demo": True}
    assert "random weights" in result["notice"]
    assert set(result["timings_ms"]) >= {"text_encoding", "denoising", "decoding", "image_encoding", "total"}
    assert result["timings_ms"]["denoising"] > 0


@pytest.mark.parametrize("workflow", ["z-image-simple", "z-image-danrisi"])
def test_same_seed_same_pixels_and_image_i_regenerates_alone(handler_module, workflow):
    four = run_job(
        handler_module, {"prompt": "a lighthouse", "num_images": 4, "seed": 100, "workflow": workflow, **SMALL}
    )
    again = run_job(
        handler_module, {"prompt": "a lighthouse", "num_images": 4, "seed": 100, "workflow": workflow, **SMALL}
    )
    alone = run_job(
        handler_module, {"prompt": "a lighthouse", "num_images": 1, "seed": 102, "workflow": workflow, **SMALL}
    )
    assert four["workflow"] == workflow
    for a, b in zip(four["images"], again["images"]):
        assert_regenerates(pixels(a), pixels(b))
    assert_regenerates(pixels(four["images"][2]), pixels(alone["images"][0]))
    assert_differs(pixels(four["images"][0]), pixels(four["images"][1]))


def test_workflows_differ_and_auto_prefers_danrisi(handler_module):
    simple = run_job(handler_module, {"prompt": "a boat", "seed": 1, "workflow": "z-image-simple", **SMALL})
    danrisi = run_job(handler_module, {"prompt": "a boat", "seed": 1, "workflow": "z-image-danrisi", **SMALL})
    auto = run_job(handler_module, {"prompt": "a boat", "seed": 1, **SMALL})
    assert auto["workflow"] == "z-image-danrisi"
    assert_regenerates(pixels(auto["images"][0]), pixels(danrisi["images"][0]))
    assert_differs(pixels(simple["images"][0]), pixels(danrisi["images"][0]))


def test_danrisi_eta_defaults_to_the_graphs_is_echoed_and_changes_the_image(handler_module):
    job = {"prompt": "a boat", "seed": 1, "workflow": "z-image-danrisi", **SMALL}
    default, explicit, ode = (run_job(handler_module, job | extra) for extra in ({}, {"eta": 0.5}, {"eta": 0.0}))
    assert default["settings"]["eta"] == explicit["settings"]["eta"] == 0.5 and ode["settings"]["eta"] == 0.0
    assert_regenerates(pixels(default["images"][0]), pixels(explicit["images"][0]))
    assert_differs(pixels(default["images"][0]), pixels(ode["images"][0]))
    simple = run_job(handler_module, job | {"workflow": "z-image-simple"})
    assert "eta" not in simple["settings"]


def test_eta_is_refused_where_danrisi_does_not_run(handler_module):
    from serving.local_run import collect
    from serving.startup import LoadedEngines
    from serving.worker import Worker

    refused = run_job(handler_module, {"prompt": "x", "workflow": "z-image-simple", "eta": 0.3, **SMALL})
    assert refused["error"] == "invalid_input: eta: is only used by z-image-danrisi"
    served = handler_module.WORKER
    settings = served.settings.model_copy(update={"auto_workflow": "z-image-simple"})
    simple_auto = Worker(settings, LoadedEngines(served.engine, None, "off"))
    result = asyncio.run(collect(simple_auto.run_job, {"id": "t", "input": {"prompt": "x", "eta": 0.3, **SMALL}}))
    assert result["error"] == "invalid_input: eta: is only used by z-image-danrisi (this job runs z-image-simple)"


@pytest.mark.parametrize(
    ("size", "expected"),
    [({"width": 96, "height": 64}, (64, 96)), ({"aspect_ratio": "16:9", "megapixels": 0.01}, (80, 144))],
)
def test_sizes(handler_module, size, expected):
    result = run_job(handler_module, {"prompt": "a bridge", "steps": 1, **size})
    image = result["images"][0]
    assert pixels(image).shape[:2] == expected == (image["height"], image["width"])


@pytest.mark.parametrize(("fmt", "magic"), [("png", b"\x89PNG"), ("webp", b"RIFF"), ("jpeg", b"\xff\xd8\xff")])
def test_formats(handler_module, fmt, magic):
    result = run_job(handler_module, {"prompt": "a tree", **SMALL, "output_format": fmt, "output_quality": 80})
    data = base64.b64decode(result["images"][0]["base64"])
    assert data.startswith(magic) and result["images"][0]["format"] == fmt
    assert Image.open(io.BytesIO(data)).size == (64, 64)


def test_png_carries_the_engines_pixels_exactly(handler_module):
    from pipelines.z_image import BatchSpec, ImageItem

    result = run_job(handler_module, {"prompt": "a cat", "seed": 3, "workflow": "z-image-simple", **SMALL})
    engine = handler_module.WORKER.engine
    direct = engine.generate([ImageItem("a cat", "", 3)], BatchSpec(64, 64, 2, 0.0, "z-image-simple")).images[0]
    assert_regenerates(pixels(result["images"][0]), direct)  # lossless: JPEG would be far off


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"prompt": "x", "steps": 0}, "invalid_input: steps: must be between 1 and 50"),
        ({"prompt": "x", "steps": 51}, "invalid_input: steps: must be between 1 and 50"),
        ({"prompt": ""}, "invalid_input: prompt: must not be empty"),
        ({}, "invalid_input: prompt: is required"),
        ({"prompt": "x", "width": 100}, "invalid_input: width: must be a multiple of 16"),
        ({"prompt": "x", "num_images": 17}, "invalid_input: num_images: must be between 1 and 16"),
        ({"prompt": "x", "colour": "red"}, "invalid_input: colour: unknown field"),
        ({"prompt": "x", "width": 512, "aspect_ratio": "1:1"}, "invalid_input: aspect_ratio: give either"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "invalid_input: guidance_scale: must be a finite"),
        ({"prompt": "x", "seed": 2**32}, "invalid_input: seed: must be between 0 and 4294967295"),
        ({"prompt": "x", "workflow": "comfy"}, "invalid_input: workflow:"),
        ({"prompt": "x", "mode": "consistent"}, "invalid_input: reference_image: is required in consistent mode"),
        ({"prompt": "x", "reference_image": "aGk="}, "invalid_input: reference_image: is only used in consistent"),
        ({"prompt": "x", "steps": 4, "identity_start_step": 4, "mode": "consistent", "reference_image": "aGk="},
         "invalid_input: identity_start_step: must be less than steps"),
        ({"prompt": "x", "delivery": "url"}, "invalid_input: delivery: url delivery needs storage"),
        ({"prompt": "x", "num_images": 16, "width": 2048, "height": 2048, "output_format": "png"},
         "payload_too_large: delivery:"),
        ("not an object", "invalid_input: input: must be a JSON object"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_worker_serves_on(handler_module, bad, expected):
    result = run_job(handler_module, bad)
    assert result["error"].startswith(expected)
    assert "Traceback" not in result["error"]
    after = run_job(handler_module, {"prompt": "still alive", **SMALL})
    assert len(after["images"]) == 1


def test_capabilities(handler_module):
    caps = run_job(handler_module, {"action": "capabilities"})
    assert caps["model"]["demo"] is True
    assert {w["name"]: w["available"] for w in caps["workflows"]} == {
        "z-image-simple": True, "z-image-danrisi": True, "auto": True,
    }
    workflows = {w["name"]: w for w in caps["workflows"]}
    assert workflows["z-image-simple"]["model_calls"] == "steps"
    assert workflows["z-image-danrisi"]["model_calls"] == "2*steps+1"
    assert workflows["z-image-danrisi"]["eta"] == {"default": 0.5, "range": [0, 1]}
    assert workflows["z-image-danrisi"]["reference"] | {"steps": 20, "eta": 0.5, "lora_strength": 1.0} == (
        workflows["z-image-danrisi"]["reference"])
    assert {m["name"]: m["available"] for m in caps["modes"]} == {"fast": True, "consistent": True}
    assert next(m for m in caps["modes"] if m["name"] == "fast")["defaults"]["steps"] == 8
    assert caps["delivery"]["base64"] is True and caps["delivery"]["url"] is False
    assert caps["limits"]["num_images"] == [1, 16] and caps["device"] == "cpu" and caps["dtype"] == "float32"
    assert caps["versions"]["diffusers"] == "0.42.1"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`python handler.py --test_input ...` in a fresh interpreter, as a user runs it (once per module)."""
    output_dir = tmp_path_factory.mktemp("outputs")
    job = {"input": {"prompt": "a kite", "num_images": 2, "seed": 5, **SMALL}}
    done = subprocess.run(
        [sys.executable, str(ROOT / "handler.py"), "--test_input", json.dumps(job), "--output_dir", str(output_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    return done, output_dir


def test_test_input_command_line_saves_images(local_run):
    done, output_dir = local_run
    assert done.returncode == 0, done.stderr[-2000:]
    saved = sorted(p.name for p in (output_dir / "local_test").iterdir())
    assert saved == ["00-5.png", "01-6.png"]
    assert "base64_chars" in done.stdout and '"base64": "' not in done.stdout
    assert "iVBORw0KGgo" not in done.stdout + done.stderr  # no PNG payload printed or logged


def test_a_fresh_handler_times_its_imports_first(local_run):
    """Run first in its interpreter (as on RunPod), the handler's imports load torch, diffusers and the
    SDK: seconds, not nothing. (In-process tests import it after those, so there it reports ~0.)"""
    done, _ = local_run
    summary = re.search(r"startup: imports (\d+\.\d+) s, pulid-flux start [\d.]+ s, z-image load", done.stderr)
    assert summary, done.stderr[-2000:]
    assert float(summary.group(1)) > 0


def test_a_local_run_prints_nothing_that_reads_like_a_broken_install(local_run):
    done, _ = local_run
    output = done.stdout + done.stderr
    assert "not installed" not in output and "Traceback" not in output, output[-2000:]
    assert "WARNING" not in output and "[transformers]" not in output, output[-2000:]


def test_test_input_command_line_reports_bad_input(tmp_path):
    job = {"input": {"prompt": "a kite", "steps": 99}}
    done = subprocess.run(
        [sys.executable, str(ROOT / "handler.py"), "--test_input", json.dumps(job), "--output_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 1
    assert "invalid_input: steps: must be between 1 and 50" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
