"""Following one job through /stream and /status, timing each image as it reaches the client."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from benchmark.client import MAX_ERROR_CHARS, EndpointClient, EndpointError, elapsed_ms

FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
CANCEL_TIMEOUT_S = 5.0


@dataclass
class JobOutcome:
    """What one job did, in ms since its run started (`t0`)."""

    id: str | None = None
    status: str | None = None
    submit_ms: float | None = None
    delay_ms: int | None = None
    execution_ms: int | None = None
    image_arrival_ms: dict[int, float] = field(default_factory=dict)
    image_errors: dict[int, str] = field(default_factory=dict)
    job_failures: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    first_image: str | None = field(default=None, repr=False)  # image 0 (base64 or URL), kept in memory only
    duplicate_images: int = 0  # an image index streamed twice, or twice in the final output

    def fail(self, kind: str, reason: str) -> None:
        self.job_failures.append({"job_id": self.id, "kind": kind, "reason": reason[:MAX_ERROR_CHARS]})

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Job-level failures, then one per failed image."""
        per_image = [
            {"job_id": self.id, "kind": "image_error", "index": index, "reason": reason}
            for index, reason in sorted(self.image_errors.items())
        ]
        return self.job_failures + per_image

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "submit_ms": self.submit_ms,
            "delay_ms": self.delay_ms,
            "execution_ms": self.execution_ms,
            "images": len(self.image_arrival_ms),
            "image_arrival_ms": {str(k): v for k, v in sorted(self.image_arrival_ms.items())},
            "failures": self.failures,
            "summary": self.summary,
        }


def _take_chunk(outcome: JobOutcome, chunk: Any, at_ms: float, streamed: bool = True) -> None:
    """`streamed=False` for the final output's chunks, which repeat what the stream delivered."""
    if not isinstance(chunk, dict):
        return
    if isinstance(chunk.get("image"), dict):
        image = chunk["image"]
        index = int(image.get("index", len(outcome.image_arrival_ms)))
        if streamed and index in outcome.image_arrival_ms:
            outcome.duplicate_images += 1
        outcome.image_arrival_ms.setdefault(index, at_ms)
        if index == 0 and outcome.first_image is None:  # a profile set from the base image starts from it
            outcome.first_image = image.get("base64") or image.get("url")
    if isinstance(chunk.get("image_error"), dict):
        err = chunk["image_error"]
        reason = f"{err.get('code')}: {err.get('message')}"[:MAX_ERROR_CHARS]
        outcome.image_errors.setdefault(int(err.get("index", -1)), reason)
    if isinstance(chunk.get("summary"), dict):
        outcome.summary = chunk["summary"]


async def _cancel_quietly(client: EndpointClient, job_id: str) -> None:
    """Best effort: a job we stop waiting for should not keep a GPU busy."""
    try:
        await asyncio.wait_for(client.cancel(job_id), CANCEL_TIMEOUT_S)
    except (EndpointError, TimeoutError):
        pass


async def submit(client: EndpointClient, job_input: dict[str, Any], t0: float) -> JobOutcome:
    outcome = JobOutcome()
    try:
        outcome.id = await client.run(job_input)
        outcome.submit_ms = elapsed_ms(t0)
    except EndpointError as err:
        outcome.fail("submit", str(err))
    return outcome


async def follow(
    client: EndpointClient, outcome: JobOutcome, t0: float, timeout_s: float, poll_s: float
) -> JobOutcome:
    """Poll /stream until the job ends (or `timeout_s` since t0), then read /status once."""
    if outcome.id is None:
        return outcome
    deadline = t0 + timeout_s
    try:
        while True:
            body = await client.stream(outcome.id)
            now = elapsed_ms(t0)
            for item in body.get("stream") or []:
                _take_chunk(outcome, item.get("output") if isinstance(item, dict) else None, now)
            if body.get("status") in FINAL:
                break
            if time.monotonic() >= deadline:
                outcome.fail("timeout", f"not finished after {timeout_s:g} s")
                await _cancel_quietly(client, outcome.id)
                break
            await asyncio.sleep(poll_s)
        final = await client.status(outcome.id)
    except EndpointError as err:
        outcome.fail("http", str(err))
        return outcome
    except asyncio.CancelledError:  # Ctrl-C: stop the job on the endpoint too
        await asyncio.shield(_cancel_quietly(client, outcome.id))
        raise
    _take_final(outcome, final, elapsed_ms(t0))
    return outcome


def _take_final(outcome: JobOutcome, final: dict[str, Any], now_ms: float) -> None:
    outcome.status = final.get("status")
    outcome.delay_ms = final.get("delayTime")
    outcome.execution_ms = final.get("executionTime")
    output = final.get("output")
    if outcome.status == "COMPLETED" and isinstance(output, list):
        indices = [c["image"].get("index") for c in output if isinstance(c, dict) and isinstance(c.get("image"), dict)]
        outcome.duplicate_images += len(indices) - len(set(indices))
        for chunk in output:  # chunks the stream did not deliver count from now
            _take_chunk(outcome, chunk, now_ms, streamed=False)
    elif outcome.status == "COMPLETED" and isinstance(output, dict):
        for image in output.get("images") or []:  # a merged result instead of the chunk list
            _take_chunk(outcome, {"image": image}, now_ms)
    if outcome.status != "COMPLETED" and not any(f["kind"] == "timeout" for f in outcome.job_failures):
        outcome.fail(str(outcome.status).lower(), str(final.get("error") or outcome.status))
