"""TEST FIXTURE: a stand-in for the real handler, for testing the endpoint and the worker loop.

The local endpoint runs it under the runpod SDK's worker loop (`python -m endpoint.sdk_worker
tests.endpoint.fake_worker:handler`), as it runs handler.py. It honours the handler contract of
docs/ARCHITECTURE.md (async generator, image / image_error / summary chunks, `{"error":
"invalid_input: <field>: <rule>"}` for bad input, the capabilities action, `concurrency_modifier`,
progress through the SDK's `progress_update`) but generates nothing: each "image" is a short sleep
and a few bytes of base64. Fixture-only input fields exercise other paths: `delay_s` (seconds per
image), `fault` ("raise" after the first image, "image_error" for image 0, or
"fail_first_attempt": an error the first time this process sees the job id).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any
from collections.abc import AsyncIterator

from runpod.serverless import progress_update

from serving.init_image import describe as describe_image_to_image
from serving.schema import input_limits

CONCURRENCY = 4
DEFAULT_DELAY_S = 0.02
MAX_DELAY_S = 5.0
MAX_IMAGES = 16
MAX_SIDE = 2048

MIN_SIDE = 16
MAX_PIXELS = 2048 * 2048

# The real worker's capabilities shape (serving/worker.py `Worker.capabilities`; the real-handler
# tests check the keys match), with fixture values.
CAPABILITIES: dict[str, Any] = {
    "model": {"id": "fixture", "revision": "none", "demo": True},
    "workflows": [
        {"name": "z-image-simple", "available": True, "reason": None, "model_calls": "steps", "sampler": "fixture"},
        {"name": "z-image-danrisi", "available": False, "reason": "fixture: not offered", "model_calls": "2*steps+1",
         "sampler": "fixture", "eta": {"default": 0.5, "range": [0, 1]}, "reference": {}},
        {"name": "auto", "available": True, "reason": None, "resolves_to": "z-image-simple"},
    ],
    "modes": [
        {"name": "fast", "available": True, "reason": None, "defaults": {"steps": 8, "guidance_scale": 0.0}},
        {"name": "consistent", "available": False, "reason": "fixture: no PuLID weights",
         "defaults": {"steps": 20, "guidance_scale": 4.0}},
    ],
    "loras": {"available": False, "max_count": 4, "scale": [-4.0, 4.0], "formats": [], "lora_dir": False,
              "urls": False, "max_mb": 0, "disk_cache_mb": 0, "adapter_cache": 0, "mixed_batches": False,
              "modes": []},
    "image_to_image": describe_image_to_image(2048 * 2048),
    "delivery": {"base64": True, "url": False, "url_with_job_s3Config": False, "result_cache": False},
    "limits": {**input_limits(), "side": [MIN_SIDE, MAX_SIDE],  # the sides this fixture accepts (`_invalid`)
               "max_pixels": MAX_PIXELS, "job_timeout_s": 600, "max_response_bytes": 10 * 2**20},
    "batching": {"max_batch_1024": 1, "wait_ms": 0, "concurrency": CONCURRENCY},
    "device": "cpu",
    "gpu": None,
    "dtype": "float32",
    "load_seconds": 0.0,
    "startup_ms": {"total": 0.0},
    "acceleration": {},
    "versions": {},
}


_seen_job_ids: set[str] = set()  # for fault "fail_first_attempt"


def concurrency_modifier(current: int) -> int:
    return CONCURRENCY


def _invalid(inp: Any) -> str | None:
    """The first broken rule as `invalid_input: <field>: <rule>`, or None."""
    if not isinstance(inp, dict):
        return "invalid_input: input: must be an object"
    prompt = inp.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "invalid_input: prompt: required non-empty string"
    num = inp.get("num_images", 1)
    if not isinstance(num, int) or not 1 <= num <= MAX_IMAGES:
        return f"invalid_input: num_images: integer 1..{MAX_IMAGES}"
    for side in ("width", "height"):
        value = inp.get(side, 64)
        if not isinstance(value, int) or value % 16 or not MIN_SIDE <= value <= MAX_SIDE:
            return f"invalid_input: {side}: multiple of 16 in {MIN_SIDE}..{MAX_SIDE}"
    delay = inp.get("delay_s", DEFAULT_DELAY_S)
    if not isinstance(delay, (int, float)) or not 0 <= delay <= MAX_DELAY_S:
        return f"invalid_input: delay_s: number 0..{MAX_DELAY_S}"
    return None


async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    inp = job["input"]
    if isinstance(inp, dict) and inp.get("action") == "capabilities":
        yield CAPABILITIES
        return
    error = _invalid(inp)
    if inp.get("fault") == "fail_first_attempt" and job["id"] not in _seen_job_ids:
        _seen_job_ids.add(job["id"])
        error = "fixture: first attempt fails"
    if error:
        yield {"error": error}
        return
    total = inp.get("num_images", 1)
    width, height = inp.get("width", 64), inp.get("height", 64)
    seed = inp.get("seed", 1234)
    fmt = inp.get("output_format", "jpeg")
    for index in range(total):
        await asyncio.sleep(inp.get("delay_s", DEFAULT_DELAY_S))
        if inp.get("fault") == "raise" and index == 1:
            raise RuntimeError("fixture fault")
        progress = {"completed": index + 1, "total": total}
        progress_update(job, progress)
        if inp.get("fault") == "image_error" and index == 0:
            yield {
                "image_error": {"index": index, "seed": seed + index, "code": "fixture", "message": "injected"},
                "progress": progress,
            }
            continue
        data = base64.b64encode(f"img-{job['id']}-{index}".encode()).decode()
        image = {"index": index, "seed": seed + index, "width": width, "height": height, "format": fmt, "base64": data}
        yield {"image": image, "progress": progress}
    summary = {"num_images": total, "width": width, "height": height, "workflow": inp.get("workflow", "auto"),
               "job_keys": sorted(job), "s3Config": job.get("s3Config")}
    if "init_image" in inp:  # the fixture's own "image" bytes: lets the benchmark test see what it sent
        summary["init_image"] = inp["init_image"]
    yield {"summary": summary}
