"""One planned job, run: its images handed to the engine loop, each encoded and delivered as it
leaves the GPU, streamed as a chunk, then a summary. Never raises for a job's sake: a failed image
is an `image_error` chunk beside the images that worked, and a job out of time names each image
it did not get."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from collections.abc import AsyncIterator, Callable

from serving.delivery import Delivered, PendingUpload
from serving.engine_loop import EngineLoop
from serving.job_ticket import ImageOutcome, JobUsage
from serving.outputs import effective_quality, encode_image, image_chunk, image_error_chunk
from serving.planning import JobPlan, model_fields, spec_fields

log = logging.getLogger(__name__)

ProgressSink = Callable[[dict[str, Any], dict[str, Any]], None]


@dataclass
class JobTally:
    """What the summary reports, counted as the images come."""

    started: float = field(default_factory=time.perf_counter)
    completed: int = 0
    failed: int = 0
    image_encoding_ms: float = 0.0
    first_image_ms: float | None = None
    switched_to_url: bool = False

    def image_done(self) -> None:
        self.completed += 1
        if self.first_image_ms is None:
            self.first_image_ms = (time.perf_counter() - self.started) * 1000

    def final_timings(self, usage: JobUsage) -> dict[str, float]:
        timings = {stage: round(ms, 2) for stage, ms in usage.timings_ms.items()}
        timings["image_encoding"] = round(self.image_encoding_ms, 2)
        timings["first_image"] = round(self.first_image_ms or 0.0, 2)
        timings["total"] = round((time.perf_counter() - self.started) * 1000, 2)
        return timings


def _post_process(plan: JobPlan, job_id: str,
                  outcome: ImageOutcome) -> tuple[ImageOutcome, Delivered | PendingUpload | None, float]:
    """Runs in the encode pool, while the GPU thread goes on with the next call; an upload is only
    handed to the storage pool here (`Delivery.settle` waits for it, on the loop). Never raises: an
    exception here would leave the image missing until JOB_TIMEOUT_S."""
    if outcome.pixels is None:
        return outcome, None, 0.0
    request, spec = plan.request, plan.spec
    begun = time.perf_counter()
    try:
        data = encode_image(outcome.pixels, request.output_format, request.output_quality)
        encode_ms = (time.perf_counter() - begun) * 1000
        delivered = plan.delivery.deliver(job_id, outcome.index, outcome.seed, spec.width, spec.height,
                                          request.output_format, data, plan.cache_params(plan.items[outcome.index]))
    except Exception as err:  # noqa: BLE001 - one image's failure, reported as that image's error
        log.exception("job %s: encoding or delivering image %d failed", job_id, outcome.index)
        delivered = Delivered(error_code="internal_error",
                              error_message=f"{type(err).__name__} while encoding or delivering this image")
        encode_ms = (time.perf_counter() - begun) * 1000
    return outcome, delivered, encode_ms


async def run_plan(job: dict[str, Any], job_id: str, plan: JobPlan, engine_loop: EngineLoop,
                   encode_pool: ThreadPoolExecutor, progress: ProgressSink,
                   timeout_s: float) -> AsyncIterator[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    tally = JobTally()
    total = len(plan.items)
    finished: asyncio.Queue[tuple[ImageOutcome, Delivered | None, float]] = asyncio.Queue()

    async def settle(result: tuple[ImageOutcome, Delivered | PendingUpload | None, float]) -> None:
        outcome, delivered, encode_ms = result
        finished.put_nowait((outcome, await plan.delivery.settle(delivered), encode_ms))

    def on_outcome(outcome: ImageOutcome) -> None:  # the GPU thread
        future = encode_pool.submit(_post_process, plan, job_id, outcome)
        future.add_done_callback(lambda f: asyncio.run_coroutine_threadsafe(settle(f.result()), loop))

    progress(job, {"completed": 0, "total": total})
    for _index, entry in sorted(plan.cached_entries.items()):
        tally.image_done()
        yield image_chunk(entry, tally.completed, total)
    to_run = [(i, item) for i, item in enumerate(plan.items) if i not in plan.cached_entries]
    ticket = (engine_loop.submit(job_id, plan.engine, plan.spec, to_run, on_outcome, plan.request.priority)
              if to_run else None)
    # RunPod's SDK drives this generator from the job's own task and posts each chunk between two
    # steps of it; a stop signal then cancels that task while this generator waits at a `yield`,
    # and its `finally` would run only when the generator is garbage-collected (the SDK's cancelled
    # task keeps the traceback, and with it the generator). So the task's end frees the GPU too.
    consumer = asyncio.current_task() if ticket is not None else None

    def release(_task: asyncio.Task) -> None:
        engine_loop.cancel(ticket)

    if consumer is not None:
        consumer.add_done_callback(release)
    seen = set(plan.cached_entries)
    deadline = tally.started + timeout_s
    try:
        while tally.completed + tally.failed < total:
            try:
                # not asyncio.wait_for: on Python 3.11 it returns a result that is ready when the
                # job's task is cancelled (RunPod's stop signal) and drops the cancellation
                async with asyncio.timeout(deadline - time.perf_counter()):
                    outcome, delivered, encode_ms = await finished.get()
            except TimeoutError:
                break
            tally.image_encoding_ms += encode_ms
            seen.add(outcome.index)
            if delivered is not None and delivered.entry is not None:
                tally.image_done()
                tally.switched_to_url |= delivered.switched_to_url
                yield image_chunk(delivered.entry, tally.completed + tally.failed, total)
            else:
                tally.failed += 1
                source = delivered if delivered is not None else outcome
                error = {"index": outcome.index, "seed": outcome.seed, "code": source.error_code,
                         "message": source.error_message}
                yield image_error_chunk(error, tally.completed + tally.failed, total)
            progress(job, {"completed": tally.completed + tally.failed, "total": total})
        for index in sorted(set(range(total)) - seen):  # out of time: name each missing image
            tally.failed += 1
            error = {"index": index, "seed": plan.items[index].seed, "code": "timeout",
                     "message": f"not finished within JOB_TIMEOUT_S={timeout_s:g} s"}
            yield image_error_chunk(error, tally.completed + tally.failed, total)
    finally:
        if ticket is not None:
            engine_loop.cancel(ticket)  # a no-op when done; frees the GPU when the job was cancelled
        if consumer is not None:
            consumer.remove_done_callback(release)
    usage = engine_loop.usage(ticket) if ticket is not None else JobUsage()
    timings = tally.final_timings(usage)
    log.info("job %s: %d/%d images in %.0f ms (%d model calls, batches %s, %d from cache)", job_id, tally.completed,
             total, timings["total"], usage.model_calls, usage.batch_sizes, len(plan.cached_entries))
    yield {"summary": summarize(plan, tally, usage, timings)}


def summarize(plan: JobPlan, tally: JobTally, usage: JobUsage, timings: dict[str, float]) -> dict[str, Any]:
    request, spec = plan.request, plan.spec
    model = model_fields(plan.engine)
    settings = {
        "mode": plan.mode.name, **spec_fields(spec), "num_images": request.num_images, "seed": plan.seed,
        "output_format": request.output_format,
        "output_quality": effective_quality(request.output_format, request.output_quality),
        "delivery": plan.delivery.method, "priority": request.priority,
    }
    summary = {
        "mode": plan.mode.name,
        "mode_requested": request.mode,
        "workflow": spec.workflow,
        "settings": settings,
        "images_completed": tally.completed,
        "images_failed": tally.failed,
        "images_from_cache": len(plan.cached_entries),
        "timings_ms": timings,
        "batch_sizes": usage.batch_sizes,
        "model_calls": usage.model_calls,
        "model": {"id": model["id"], "revision": model["revision"], "demo": model["demo"]},
        **plan.mode.summary_notes,
    }
    if plan.delivery.switched_to_url or tally.switched_to_url:
        summary["delivery_note"] = "base64 would pass the result or stream chunk limit: images were uploaded instead"
    if plan.fallback_reason:
        summary["fallback_reason"] = plan.fallback_reason
    if plan.size_notes:
        summary["size_note"] = "; ".join(plan.size_notes)
    if model["demo"]:
        summary["notice"] = "demo model with random weights: images are noise"
    return summary
