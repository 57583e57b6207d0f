"""`python handler.py --test_input ...`: run one job in-process, save its images, print a summary."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator, Callable

from serving.outputs import merge_chunks, without_payloads

Handler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


async def collect(handler: Handler, job: dict[str, Any]) -> dict[str, Any]:
    """What /runsync returns, merged: the handler's chunks → one result (or `{"error": ...}`)."""
    chunks = []
    async for chunk in handler(job):
        if "error" in chunk:
            return {"error": chunk["error"]}
        chunks.append(chunk)
    return merge_chunks(chunks)


async def run_local_job(handler: Handler, job: dict[str, Any], output_dir: Path) -> int:
    """Exit status 0 when every image was made; images land in `output_dir/<job id>/`."""
    if not isinstance(job, dict) or "input" not in job:
        print(json.dumps({"error": "invalid_input: input: the test job needs an \"input\" object"}))
        return 2
    job.setdefault("id", "local_test")
    result = await collect(handler, job)
    if "error" in result:
        print(json.dumps(result, indent=2))
        return 1
    paths = []
    for image in result.get("images", []):
        if "base64" in image:
            path = output_dir / str(job["id"]) / f"{image['index']:02d}-{image['seed']}.{image['format']}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(image["base64"]))
            paths.append(str(path))
    print(json.dumps(without_payloads(result), indent=2))
    for path in paths:
        print(f"saved {path}")
    return 1 if result.get("errors") else 0
