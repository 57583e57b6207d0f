"""The job lifecycle: validate → schedule images → encode → stream chunks.

`Worker.run_job` is the handler body. It never raises for a job's sake: bad input becomes one
`{"error": ...}` chunk before anything runs, a failed image becomes an `image_error` chunk next
to the images that worked, and the summary closes every job that got past validation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import platform
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

import torch

from models.z_image_demo import ensure_demo_model
from pipelines.acceleration import AccelerationPlan, save_compile_cache, warm_up
from pipelines.z_image import BatchSpec, ImageItem, ZImageEngine, pick_device
from serving.batcher import Batcher, ImageOutcome
from serving.errors import JobError
from serving.outputs import base64_entry, encode_image, image_chunk, image_error_chunk
from serving.schema import (
    MAX_GUIDANCE, MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIDE, MAX_STEPS, MIN_SIDE, SIZE_MULTIPLE,
    ASPECT_RATIOS, CapabilitiesRequest, GenerateRequest, parse_job_input,
)
from serving.settings import Settings

log = logging.getLogger(__name__)

ProgressSink = Callable[[dict[str, Any], dict[str, Any]], None]
# Peak activation memory per 1024² image at 8 steps, batch 1, bf16 (REFERENCE: 24.5 GB peak with
# 20.9 GB of weights), with headroom: the auto batch limit divides free memory by it.
ACTIVATION_BYTES_PER_MEGAPIXEL = 4.5 * 2**30
CPU_MAX_BATCH = 4
WARMUP_SIZE = 1024  # the schema's default width and height


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError)


def _is_fatal_device_error(err: BaseException) -> bool:
    """CUDA errors that leave the context unusable: only a fresh worker recovers from these."""
    text = str(err)
    markers = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure", "ECC error")
    return isinstance(err, RuntimeError) and not _is_oom(err) and any(m in text for m in markers)


class Worker:
    """Owns the warm engine, the scheduler and the encoding pool for the process's lifetime."""

    def __init__(self, settings: Settings, engine: ZImageEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.needs_refresh = False
        self.progress_sink: ProgressSink = lambda job, payload: None
        self._free_bytes = torch.cuda.mem_get_info()[0] if engine.device.type == "cuda" else 0
        self.encode_pool = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        self.batcher = Batcher(
            run_batch=engine.generate,
            max_batch_for=self.max_batch_for,
            wait_s=settings.batch_wait_ms / 1000,
            is_oom=_is_oom,
            is_fatal=_is_fatal_device_error,
            on_fatal=self._on_fatal,
        )

    @classmethod
    def start(cls, settings: Settings) -> "Worker":
        """Load the model (real weights from MODEL_DIR, else the demo model) before any job."""
        model_dir = settings.model_dir or ensure_demo_model(settings.demo_model_dir)
        device = pick_device(settings.device)
        plan = AccelerationPlan.from_settings(settings, device)
        engine = ZImageEngine.load(model_dir, device, settings.prompt_cache_size, plan)
        worker = cls(settings, engine)
        if plan.warmup:  # compile and autotune now, at the default size and every batch size, not in a job
            spec = BatchSpec(WARMUP_SIZE, WARMUP_SIZE, 2, 0.0, "z-image-simple")
            engine.acceleration.warmup_ms = warm_up(engine, WARMUP_SIZE, WARMUP_SIZE,
                                                    list(range(1, worker.max_batch_for(spec) + 1)))
            save_compile_cache(plan.compile_cache_dir if plan.compile else None)
        return worker

    def _on_fatal(self, err: BaseException) -> None:
        self.needs_refresh = True

    def max_batch_for(self, spec: BatchSpec) -> int:
        """MAX_BATCH when set; else what free GPU memory holds at this size (4 on CPU), at most 16."""
        if self.settings.max_batch:
            return self.settings.max_batch
        if self.engine.device.type != "cuda":
            return CPU_MAX_BATCH
        per_image = ACTIVATION_BYTES_PER_MEGAPIXEL * spec.width * spec.height / 2**20
        per_image *= 2 if spec.guidance_scale > 0 else 1
        return max(1, min(MAX_IMAGES, int(self._free_bytes // per_image)))

    # -- jobs -----------------------------------------------------------------------------------
    async def run_job(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        job_id = str(job.get("id", "local"))
        try:
            request = parse_job_input(job.get("input"))
            if isinstance(request, CapabilitiesRequest):
                yield self.capabilities()
                return
            spec, items = self._plan(request)
        except JobError as err:
            log.info("job %s rejected: %s", job_id, err.message)
            yield {"error": err.message}
            return
        async for chunk in self._generate(job, job_id, request, spec, items):
            yield chunk

    def _plan(self, request: GenerateRequest) -> tuple[BatchSpec, list[ImageItem]]:
        if request.mode != "fast":
            raise JobError("mode_unavailable", "consistent mode is not available on this worker", field="mode")
        if request.width * request.height > self.settings.max_pixels:
            raise JobError("invalid_input", f"width x height must be at most {self.settings.max_pixels} pixels", field="width")
        workflow = self.resolve_workflow(request.workflow)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        request.seed = seed
        spec = BatchSpec(request.width, request.height, request.steps, request.guidance_scale, workflow)
        items = [
            ImageItem(request.prompt, request.negative_prompt, (seed + i) % (MAX_SEED + 1))
            for i in range(request.num_images)
        ]
        return spec, items

    def resolve_workflow(self, requested: str) -> str:
        if requested == "auto":
            danrisi = self.settings.auto_workflow == "z-image-danrisi" and self.settings.danrisi_enabled
            return "z-image-danrisi" if danrisi else "z-image-simple"
        if requested == "z-image-danrisi" and not self.settings.danrisi_enabled:
            raise JobError("workflow_unavailable", "z-image-danrisi is disabled on this worker", field="workflow")
        return requested

    def _batch_group(self, spec: BatchSpec, request: GenerateRequest) -> tuple:
        """Images merge only when their text lengths pad alike, so a merged batch is pixel-identical
        to running each job alone (no cross-image attention padding)."""
        texts = [request.prompt] + ([request.negative_prompt] if spec.guidance_scale > 0 else [])
        return (spec, request.mode, tuple(self.engine.text_length_bucket(t) for t in texts))

    async def _generate(
        self, job: dict[str, Any], job_id: str, request: GenerateRequest, spec: BatchSpec, items: list[ImageItem]
    ) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        total = len(items)
        finished: asyncio.Queue[tuple[ImageOutcome, dict[str, Any] | None, float]] = asyncio.Queue()

        def post_process(outcome: ImageOutcome) -> tuple[ImageOutcome, dict[str, Any] | None, float]:
            """Runs in the encode pool, while the GPU thread goes on with the next batch."""
            if outcome.pixels is None:
                return outcome, None, 0.0
            begun = time.perf_counter()
            data = encode_image(outcome.pixels, request.output_format, request.output_quality)
            entry = base64_entry(outcome.index, outcome.seed, spec.width, spec.height, request.output_format, data)
            return outcome, entry, (time.perf_counter() - begun) * 1000

        def on_outcome(outcome: ImageOutcome) -> None:
            future = self.encode_pool.submit(post_process, outcome)
            future.add_done_callback(lambda f: loop.call_soon_threadsafe(finished.put_nowait, f.result()))

        self.progress_sink(job, {"completed": 0, "total": total})
        ticket = self.batcher.submit(job_id, spec, self._batch_group(spec, request), items, on_outcome)
        timings = {"text_encoding": 0.0, "denoising": 0.0, "decoding": 0.0, "image_encoding": 0.0}
        batches: list[int] = []
        seen_batches: set[int] = set()
        completed = failed = 0
        delivered: set[int] = set()
        first_image_ms: float | None = None
        deadline = started + self.settings.job_timeout_s
        try:
            while completed + failed < total:
                try:
                    outcome, entry, encode_ms = await asyncio.wait_for(finished.get(), deadline - time.perf_counter())
                except asyncio.TimeoutError:
                    break
                if id(outcome.timings_ms) not in seen_batches and outcome.timings_ms:
                    seen_batches.add(id(outcome.timings_ms))
                    batches.append(outcome.batch_size)
                    for stage, ms in outcome.timings_ms.items():
                        timings[stage] += ms
                timings["image_encoding"] += encode_ms
                delivered.add(outcome.index)
                if entry is not None:
                    completed += 1
                    first_image_ms = first_image_ms or (time.perf_counter() - started) * 1000
                    yield image_chunk(entry, completed + failed, total)
                else:
                    failed += 1
                    error = {"index": outcome.index, "seed": outcome.seed, "code": outcome.error_code,
                             "message": outcome.error_message}
                    yield image_error_chunk(error, completed + failed, total)
                self.progress_sink(job, {"completed": completed + failed, "total": total})
            if completed + failed < total:  # out of time: name each image that never came
                self.batcher.cancel(ticket)
                for index in sorted(set(range(total)) - delivered):
                    failed += 1
                    error = {"index": index, "seed": items[index].seed, "code": "timeout",
                             "message": f"not finished within JOB_TIMEOUT_S={self.settings.job_timeout_s} s"}
                    yield image_error_chunk(error, completed + failed, total)
        finally:
            self.batcher.cancel(ticket)  # a no-op when done; frees the GPU when the job was cancelled
        timings = {stage: round(ms, 2) for stage, ms in timings.items()}
        timings["first_image"] = round(first_image_ms or 0.0, 2)
        timings["total"] = round((time.perf_counter() - started) * 1000, 2)
        log.info("job %s: %d/%d images in %.0f ms (batches %s)", job_id, completed, total, timings["total"], batches)
        yield {"summary": self._summary(request, spec, completed, failed, timings, batches)}

    def _summary(
        self, request: GenerateRequest, spec: BatchSpec, completed: int, failed: int,
        timings: dict[str, float], batches: list[int],
    ) -> dict[str, Any]:
        identity = self.engine.identity
        return {
            "mode": request.mode,
            "workflow": spec.workflow,
            "settings": {
                "workflow": spec.workflow, "mode": request.mode, "width": spec.width, "height": spec.height,
                "steps": spec.steps, "guidance_scale": spec.guidance_scale, "num_images": request.num_images,
                "seed": request.seed, "output_format": request.output_format,
                "output_quality": request.output_quality,
            },
            "images_completed": completed,
            "images_failed": failed,
            "timings_ms": timings,
            "batch_sizes": batches,
            "model": {"id": identity.id, "revision": identity.revision, "demo": identity.demo},
            **({"notice": "demo model with random weights: images are noise"} if identity.demo else {}),
        }

    def capabilities(self) -> dict[str, Any]:
        import diffusers
        import runpod
        import transformers

        identity = self.engine.identity
        danrisi_reason = None if self.settings.danrisi_enabled else "disabled by DANRISI_ENABLED=0"
        return {
            "model": {"id": identity.id, "revision": identity.revision, "demo": identity.demo},
            "workflows": [
                {"name": "z-image-simple", "available": True, "reason": None},
                {"name": "z-image-danrisi", "available": danrisi_reason is None, "reason": danrisi_reason},
                {"name": "auto", "available": True, "reason": None, "resolves_to": self.resolve_workflow("auto")},
            ],
            "modes": [
                {"name": "fast", "available": True, "reason": None},
                {"name": "consistent", "available": False, "reason": "the PuLID pipeline is not loaded"},
            ],
            "limits": {
                "num_images": [1, MAX_IMAGES], "side": [MIN_SIDE, MAX_SIDE], "size_multiple": SIZE_MULTIPLE,
                "max_pixels": self.settings.max_pixels, "steps": [1, MAX_STEPS], "guidance_scale": [0, MAX_GUIDANCE],
                "prompt_chars": MAX_PROMPT_CHARS, "seed": [0, MAX_SEED], "aspect_ratios": list(ASPECT_RATIOS),
                "output_formats": ["png", "webp", "jpeg"], "job_timeout_s": self.settings.job_timeout_s,
            },
            "batching": {"max_batch_1024": self.max_batch_for(BatchSpec(1024, 1024, 8, 0.0, "z-image-simple")),
                         "wait_ms": self.settings.batch_wait_ms, "concurrency": self.settings.concurrency},
            "device": str(self.engine.device),
            "gpu": torch.cuda.get_device_name(0) if self.engine.device.type == "cuda" else None,
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "load_seconds": round(self.engine.load_seconds, 3),
            "acceleration": dataclasses.asdict(self.engine.acceleration),
            "versions": {
                "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "runpod": runpod.__version__,
            },
        }
