"""The worker: the warm engines, the engine loop (scheduler + GPU thread) and the thread pools for
the process's lifetime, and `run_job`, the handler body: validate → plan → run
(serving/job_runner.py).

`run_job` never raises for a job's sake: bad input becomes one `{"error": ...}` chunk before
anything runs, a failed image becomes an `image_error` chunk next to the images that worked, and
a summary closes every job that got past validation.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from collections.abc import AsyncIterator, Callable

from pipelines.engine import Engine
from pipelines.startup import free_gpu_bytes
from serving.capabilities import capabilities, max_batch_spec
from serving.delivery import StorageIO
from serving.device import batch_limit, is_fatal_device_error, is_oom
from serving.engine_loop import NO_INCOMING, EngineLoop, IncomingJobs
from serving.errors import JobError
from serving.job_runner import ProgressSink, run_plan
from serving.modes import ConsistentMode, FastMode, Modes
from serving.planning import plan_job
from serving.scheduler import Policy, Scheduler
from serving.schema import CapabilitiesRequest, parse_job_input
from serving.settings import Settings
from serving.startup import LoadedEngines, load_engines
from serving.startup_timing import StartupTimer
from serving.storage import ImageStore

log = logging.getLogger(__name__)


class Worker:
    """Owns the warm engines, the engine loop and the encode/storage pools."""

    def __init__(self, settings: Settings, engines: LoadedEngines, startup: StartupTimer | None = None,
                 on_fatal: Callable[[], None] = lambda: None, incoming: IncomingJobs = NO_INCOMING) -> None:
        self.settings = settings
        self.engine = engines.fast
        self.modes = Modes(FastMode(engines.fast, settings),
                           ConsistentMode(engines.consistent, engines.consistent_reason, settings))
        self.startup = startup or StartupTimer()
        self.progress_sink: ProgressSink = lambda job, payload: None
        self._free_bytes = free_gpu_bytes() if self.engine.device.type == "cuda" else None
        self.encode_pool = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        # storage I/O has its own threads: a hung bucket can hold these, never the encoders
        self.storage_io = StorageIO(ThreadPoolExecutor(settings.bucket_upload_workers, thread_name_prefix="storage"),
                                    settings.delivery_timeout_s, settings.cache_lookup_timeout_s)
        self.store = ImageStore(settings.storage) if settings.storage else None
        policy = Policy(settings.work_weight, settings.priority_offset_s, settings.batch_join_cost)
        self.engine_loop = EngineLoop(Scheduler(policy),
                                      max_batch_for=self.max_batch_for, wait_s=settings.batch_wait_ms / 1000,
                                      decode_megapixels=settings.decode_megapixels, is_oom=is_oom,
                                      is_fatal=is_fatal_device_error, on_fatal=lambda err: on_fatal(),
                                      incoming=incoming)

    @classmethod
    def start(cls, settings: Settings, startup: StartupTimer | None = None,
              on_fatal: Callable[[], None] = lambda: None, incoming: IncomingJobs = NO_INCOMING) -> Worker:
        """Load the models before any job; `on_fatal` is called once the GPU is broken for good
        (the handler asks RunPod for a fresh worker); `incoming` tells the scheduler about jobs
        the worker has taken that have not started yet (handler.py: the SDK's)."""
        startup = startup or StartupTimer()
        return cls(settings, load_engines(settings, startup), startup, on_fatal, incoming)

    def max_batch_for(self, engine: Engine, spec: Any) -> int:
        """MAX_BATCH when set; else what free GPU memory holds at this size (4 on CPU), at most 16."""
        return batch_limit(self.settings, engine, spec, self._free_bytes)

    def capabilities(self) -> dict[str, Any]:
        return capabilities(self.settings, self.modes, self.store, self.startup,
                            self.max_batch_for(self.engine, max_batch_spec()))

    async def run_job(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        job_id = str(job.get("id", "local"))
        try:
            request = parse_job_input(job.get("input"))
            if isinstance(request, CapabilitiesRequest):
                yield self.capabilities()
                return
            plan = await plan_job(request, job.get("s3Config"), self.modes, self.settings, self.store,
                                  self.storage_io)
        except JobError as err:
            log.info("job %s rejected: %s", job_id, err.message)
            yield {"error": err.message}
            return
        except Exception as err:  # noqa: BLE001 - a bug in planning fails this job cleanly, not the worker
            log.exception("job %s: planning failed", job_id)
            yield {"error": JobError("internal_error", f"{type(err).__name__} while preparing the job").message}
            return
        async for chunk in run_plan(job, job_id, plan, self.engine_loop, self.encode_pool, self.progress_sink,
                                    self.settings.job_timeout_s):
            yield chunk
