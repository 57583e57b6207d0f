"""serving/job_runner.py: a job's rows leave the GPU however the one driving it stops."""

from __future__ import annotations

import asyncio
import gc

from serving.startup import LoadedEngines
from serving.worker import Worker
from tests.conftest import SMALL


def test_a_job_stopped_while_its_chunk_is_being_posted_leaves_the_gpu_at_once(handler_module):
    """RunPod's SDK steps the handler from the job's task and posts each chunk between two steps; a
    stop signal then cancels the task while the generator waits at its `yield`. The SDK keeps the
    cancelled task, whose traceback keeps the generator, so its `finally` alone would wait for the
    garbage collector (disabled here) while the job's rows kept the GPU."""
    served = handler_module.WORKER
    worker = Worker(served.settings.model_copy(update={"max_batch": 1}), LoadedEngines(served.engine, None, "off"))
    job = {"id": "stopped-while-posting", "input": {"prompt": "a kite", "num_images": 4, **SMALL}}

    async def scenario() -> tuple[int, int]:
        first_image = asyncio.Event()

        async def like_the_sdk() -> None:
            async for _chunk in worker.run_job(job):
                first_image.set()
                await asyncio.Event().wait()  # posting the chunk to job-stream, when the stop comes

        task = asyncio.create_task(like_the_sdk())
        await first_image.wait()
        before = worker.engine_loop.queued_images()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return before, worker.engine_loop.queued_images()  # the task is still referenced here

    gc.disable()
    try:
        before, after = asyncio.run(scenario())
    finally:
        gc.enable()
        worker.engine_loop.stop()
    assert before > 0, "the job had finished before the stop: nothing to show"
    assert after == 0
