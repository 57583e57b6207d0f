"""The job lifecycle: validate → plan → schedule images → encode and deliver → stream chunks.

`Worker.run_job` is the handler body. It never raises for a job's sake: bad input becomes one
`{"error": ...}` chunk before anything runs, a failed image becomes an `image_error` chunk next
to the images that worked, and a summary closes every job that got past validation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import platform
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import numpy as np
import torch

from models.demo_pulid import BUNDLE_VERSION, ensure_demo_bundle
from models.z_image_demo import ensure_demo_model
from pipelines.acceleration import AccelerationPlan, place_text_encoder, save_compile_cache, warm_up
from pipelines.identity import IdentityError, MultipleFaces
from pipelines.pulid_flux import Cancelled, PuLIDFluxPipeline
from pipelines.samplers import SamplingStopped
from pipelines.z_image import BatchResult, BatchSpec, ImageItem, ZImageEngine, pick_device, serving_dtype
from serving.batcher import Batcher, ImageOutcome
from serving.delivery import Delivered, Delivery
from serving.errors import JobError
from serving.outputs import encode_image, image_chunk, image_error_chunk
from serving.reference_image import load_reference_image
from serving.schema import (
    MAX_IMAGES, MAX_SEED, MODE_DEFAULTS, CapabilitiesRequest, GenerateRequest, input_limits, parse_job_input,
)
from serving.settings import Settings
from serving.storage import ImageStore, StorageConfigError, storage_config_from_job

log = logging.getLogger(__name__)

ProgressSink = Callable[[dict[str, Any], dict[str, Any]], None]
# Peak activation memory per 1024² image at 8 steps, batch 1, bf16 (REFERENCE: 24.5 GB peak with
# 20.9 GB of weights), with headroom: the auto batch limit divides free memory by it.
ACTIVATION_BYTES_PER_MEGAPIXEL = 4.5 * 2**30
CPU_MAX_BATCH = 4
REFERENCE_TIMEOUT_S = 30.0
WARMUP_SIZE = 1024  # the schema's default width and height


@dataclass(frozen=True)
class ConsistentSpec:
    """What every image of one consistent-mode call shares: size, steps and the same identity."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    reference_sha256: str
    id_weight: float
    identity_start_step: int
    identity: Any = field(compare=False, hash=False, repr=False)
    workflow: str = "pulid-flux"
    cfg = False  # FLUX.1-dev's guidance is distilled into the model: one forward, no negative prompt


def _sampling_defaults(mode: str) -> dict[str, Any]:
    steps, guidance_scale = MODE_DEFAULTS[mode]
    return {"steps": steps, "guidance_scale": guidance_scale}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError)


def _is_fatal_device_error(err: BaseException) -> bool:
    """CUDA errors that leave the context unusable: only a fresh worker recovers from these."""
    text = str(err)
    markers = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure", "ECC error")
    return isinstance(err, RuntimeError) and not _is_oom(err) and any(m in text for m in markers)


@dataclass
class JobPlan:
    """A validated job, resolved: what runs, where the images go, which are already stored."""

    request: GenerateRequest
    spec: BatchSpec | ConsistentSpec
    items: list[ImageItem]
    delivery: Delivery
    mode_ran: str
    identity_cache_hit: bool | None = None
    cached_entries: dict[int, dict[str, Any]] = field(default_factory=dict)

    def cache_params(self, item: ImageItem, model: dict[str, Any]) -> dict[str, Any]:
        """Everything that decides an image's pixels and bytes: the result cache's key."""
        request, spec = self.request, self.spec
        params = {
            "model": model, "mode": self.mode_ran, "workflow": spec.workflow, "prompt": item.prompt,
            "negative_prompt": item.negative_prompt if spec.cfg else "",
            "width": spec.width, "height": spec.height, "steps": spec.steps, "guidance_scale": spec.guidance_scale,
            "seed": item.seed, "format": request.output_format, "quality": request.output_quality,
        }
        if isinstance(spec, ConsistentSpec):
            params.update(reference=spec.reference_sha256, id_weight=spec.id_weight,
                          identity_start_step=spec.identity_start_step)
        return params


def free_gpu_bytes() -> int:
    """Free GPU memory once the allocator has returned what load-time forwards (attention probes,
    the FP8 guard) or a failed load left cached: that memory is free for jobs too."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def activation_bytes(spec: BatchSpec | ConsistentSpec) -> float:
    """Peak activation memory of one image of `spec` on the GPU (CFG runs a second forward)."""
    return ACTIVATION_BYTES_PER_MEGAPIXEL * spec.width * spec.height / 2**20 * (2 if spec.cfg else 1)


class Worker:
    """Owns the warm engines, the scheduler and the encode/upload pool for the process's lifetime."""

    def __init__(self, settings: Settings, engine: ZImageEngine, consistent: PuLIDFluxPipeline | None,
                 consistent_reason: str | None) -> None:
        self.settings = settings
        self.engine = engine
        self.consistent = consistent
        self.consistent_reason = consistent_reason
        self.needs_refresh = False
        self.progress_sink: ProgressSink = lambda job, payload: None
        self._free_bytes = free_gpu_bytes() if engine.device.type == "cuda" else 0
        self.encode_pool = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="encode")
        self._identity_pool = ThreadPoolExecutor(1, thread_name_prefix="identity")
        # reference downloads wait on other hosts, not on compute: one per concurrent job, so a slow
        # host holds only its own job (fetch_https bounds each one's time)
        self._fetch_pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="reference")
        self.store = ImageStore(settings.storage, executor=self.encode_pool) if settings.storage else None
        self.batcher = Batcher(
            run_batch=self._run_batch,
            max_batch_for=self.max_batch_for,
            wait_s=settings.batch_wait_ms / 1000,
            is_oom=_is_oom,
            is_fatal=_is_fatal_device_error,
            on_fatal=self._on_fatal,
        )

    @classmethod
    def start(cls, settings: Settings) -> "Worker":
        """Load the models (real weights from MODEL_DIR, else the demo model) before any job."""
        device = pick_device(settings.device)
        model_dir = settings.model_dir or ensure_demo_model(settings.demo_model_dir)
        plan = AccelerationPlan.from_settings(settings, device)
        engine = ZImageEngine.load(model_dir, device, settings.prompt_cache_size, plan)
        consistent, reason = cls._load_consistent(settings, device)
        spec = BatchSpec(WARMUP_SIZE, WARMUP_SIZE, 2, 0.0, "z-image-simple")
        if plan.text_encoder == "auto":  # every model is on the GPU now: what is left decides
            place_text_encoder(engine, engine.acceleration, free_gpu_bytes(), activation_bytes(spec))
        worker = cls(settings, engine, consistent, reason)
        if plan.warmup:  # compile now, at the default size, not in a job
            engine.acceleration.warmup_ms = warm_up(engine, WARMUP_SIZE, WARMUP_SIZE, worker.max_batch_for(spec))
            save_compile_cache(plan.compile_cache_dir if engine.acceleration.compiled else None)
        return worker

    @staticmethod
    def _load_consistent(settings: Settings, device: str) -> tuple[PuLIDFluxPipeline | None, str | None]:
        """The optional PuLID pipeline; when it can't load, fast mode still serves and says why."""
        if not settings.pulid_enabled:
            return None, "disabled by PULID_ENABLED=0"
        bundle = settings.pulid_model_dir
        if bundle is None and not settings.uses_demo_model:
            return None, "PULID_MODEL_DIR is not set"
        started = time.perf_counter()
        try:
            bundle = bundle or ensure_demo_bundle(settings.demo_model_dir)
            pipeline = PuLIDFluxPipeline.load(bundle, device, serving_dtype(device), settings.pulid_identity_cache)
        except Exception as err:  # noqa: BLE001 - a broken optional pipeline must not stop fast mode
            log.error("consistent mode unavailable: PuLID pipeline failed to load: %s", err)
            return None, f"the PuLID pipeline failed to load ({type(err).__name__})"
        log.info("loaded PuLID-FLUX from %s in %.2f s", bundle, time.perf_counter() - started)
        return pipeline, None

    def _on_fatal(self, err: BaseException) -> None:
        self.needs_refresh = True

    def max_batch_for(self, spec: BatchSpec | ConsistentSpec) -> int:
        """MAX_BATCH when set; else what free GPU memory holds at this size (4 on CPU), at most 16."""
        if self.settings.max_batch:
            return self.settings.max_batch
        if self.engine.device.type != "cuda":
            return CPU_MAX_BATCH
        return max(1, min(MAX_IMAGES, int(self._free_bytes // activation_bytes(spec))))

    def _run_batch(self, items: list[ImageItem], spec: BatchSpec | ConsistentSpec, should_stop) -> BatchResult:
        """The batcher's one entry to the models: route by mode."""
        if not isinstance(spec, ConsistentSpec):
            return self.engine.generate(items, spec, should_stop)
        started = time.perf_counter()
        try:
            images = self.consistent.generate(
                [item.prompt for item in items], [item.seed for item in items], spec.width, spec.height,
                spec.steps, spec.guidance_scale, spec.identity, spec.id_weight, spec.identity_start_step,
                cancel_check=should_stop,
            )
        except Cancelled:
            raise SamplingStopped from None
        return BatchResult(np.stack(images), {"denoising": round((time.perf_counter() - started) * 1000, 2)})

    # -- jobs -----------------------------------------------------------------------------------
    async def run_job(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        job_id = str(job.get("id", "local"))
        try:
            request = parse_job_input(job.get("input"))
            if isinstance(request, CapabilitiesRequest):
                yield self.capabilities()
                return
            plan = await self._plan(request, job.get("s3Config"))
        except JobError as err:
            log.info("job %s rejected: %s", job_id, err.message)
            yield {"error": err.message}
            return
        except Exception as err:  # noqa: BLE001 - a bug in planning fails this job cleanly, not the worker
            log.exception("job %s: planning failed", job_id)
            yield {"error": JobError("internal_error", f"{type(err).__name__} while preparing the job").message}
            return
        async for chunk in self._generate(job, job_id, plan):
            yield chunk

    async def _plan(self, request: GenerateRequest, s3_config: Any) -> JobPlan:
        if request.width * request.height > self.settings.max_pixels:
            raise JobError("invalid_input", f"width x height must be at most {self.settings.max_pixels} pixels",
                           field="width")
        mode = request.mode
        if mode == "consistent" and self.consistent is None:
            if request.fallback != "fast":
                raise JobError("mode_unavailable", f"consistent mode is unavailable: {self.consistent_reason}",
                               field="mode")
            mode = "fast"
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        request.seed = seed
        items = [
            ImageItem(request.prompt, request.negative_prompt, (seed + i) % (MAX_SEED + 1))
            for i in range(request.num_images)
        ]
        delivery = Delivery.plan(request.delivery, self._store_for(s3_config), self.settings.max_response_bytes,
                                 request.width * request.height, request.num_images, request.output_format)
        if mode == "fast":
            workflow = self.resolve_workflow(request.workflow)
            spec = BatchSpec(request.width, request.height, *request.sampling("fast"), workflow)
            plan = JobPlan(request, spec, items, delivery, mode)
        else:
            plan = await self._plan_consistent(request, items, delivery)
        await self._find_cached(plan)
        return plan

    def _store_for(self, s3_config: Any) -> ImageStore | None:
        if s3_config is None:
            return self.store
        if not isinstance(s3_config, dict):
            raise JobError("invalid_input", "must be an object", field="s3Config")
        try:
            config = storage_config_from_job(s3_config, self.settings.storage)
        except StorageConfigError as err:
            raise JobError("invalid_input", str(err), field="s3Config") from None
        return ImageStore(config, executor=self.encode_pool)

    async def _plan_consistent(self, request: GenerateRequest, items: list[ImageItem], delivery: Delivery) -> JobPlan:
        loop = asyncio.get_running_loop()
        try:
            data, rgb = await asyncio.wait_for(
                loop.run_in_executor(self._fetch_pool, load_reference_image, request.reference_image),
                REFERENCE_TIMEOUT_S,
            )
            identity = await loop.run_in_executor(self._identity_pool, self.consistent.compute_identity, rgb)
        except asyncio.TimeoutError:
            raise JobError("invalid_reference", "took too long to fetch or read", field="reference_image") from None
        except IdentityError as err:
            code = "multiple_faces" if isinstance(err, MultipleFaces) else "no_face"
            rule = "has more than one face: crop it to one person" if code == "multiple_faces" else "has no face"
            raise JobError(code, rule, field="reference_image") from None
        steps, guidance_scale = request.sampling("consistent")
        start = request.identity_start_step
        if start is None:
            start = min(self.settings.pulid_start_step, steps - 1)
        spec = ConsistentSpec(
            request.width, request.height, steps, guidance_scale,
            hashlib.sha256(data).hexdigest(), request.id_weight, start, identity,
        )
        plan = JobPlan(request, spec, items, delivery, "consistent")
        plan.identity_cache_hit = identity.from_cache
        return plan

    async def _find_cached(self, plan: JobPlan) -> None:
        """Images already in the bucket from an identical request: found by HEAD, never regenerated."""
        if not plan.delivery.use_cache:
            return
        loop = asyncio.get_running_loop()
        model = self._cache_model(plan)
        lookups = [
            loop.run_in_executor(self.encode_pool, plan.delivery.cached, plan.cache_params(item, model),
                                 plan.request.output_format)
            for item in plan.items
        ]
        for index, (item, found) in enumerate(zip(plan.items, await asyncio.gather(*lookups))):
            if found is not None:
                plan.cached_entries[index] = {
                    "index": index, "seed": item.seed, "width": plan.spec.width, "height": plan.spec.height,
                    "format": plan.request.output_format, **found,
                }

    def resolve_workflow(self, requested: str) -> str:
        if requested == "auto":
            danrisi = self.settings.auto_workflow == "z-image-danrisi" and self.settings.danrisi_enabled
            return "z-image-danrisi" if danrisi else "z-image-simple"
        if requested == "z-image-danrisi" and not self.settings.danrisi_enabled:
            raise JobError("workflow_unavailable", "z-image-danrisi is disabled on this worker", field="workflow")
        return requested

    def _batch_group(self, plan: JobPlan) -> tuple:
        """Images merge only when their text lengths pad alike, so a merged batch runs the model on
        the same token layout as each job alone (no cross-image attention padding)."""
        spec, request = plan.spec, plan.request
        if isinstance(spec, ConsistentSpec):
            return (spec,)
        texts = [request.prompt] + ([request.negative_prompt] if spec.cfg else [])
        return (spec, tuple(self.engine.text_length_bucket(t) for t in texts))

    def _model_identity(self) -> dict[str, Any]:
        identity = self.engine.identity
        return {"id": identity.id, "revision": identity.revision, "demo": identity.demo}

    def _cache_model(self, plan: JobPlan) -> dict[str, Any]:
        """The result cache's model identity: what serves the mode that runs, and the numerics that
        change its pixels (dtype, FP8), so workers that differ there never share cached images."""
        if plan.mode_ran == "consistent":
            bundle = self.settings.pulid_model_dir
            return {"pipeline": str(bundle) if bundle else BUNDLE_VERSION, "dtype": str(self.consistent.flux.dtype)}
        acceleration = self.engine.acceleration
        return {**self._model_identity(), "dtype": str(self.engine.dtype), "fp8": acceleration.fp8,
                "fp8_keep_last_blocks": self.settings.fp8_keep_last_blocks if acceleration.fp8 else None}

    async def _generate(self, job: dict[str, Any], job_id: str, plan: JobPlan) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        request, spec, items = plan.request, plan.spec, plan.items
        total = len(items)
        model = self._model_identity()
        cache_model = self._cache_model(plan)
        finished: asyncio.Queue[tuple[ImageOutcome, Any, float]] = asyncio.Queue()

        def post_process(outcome: ImageOutcome) -> tuple[ImageOutcome, Any, float]:
            """Runs in the encode pool, while the GPU thread goes on with the next batch. Never
            raises: an exception here would leave the image missing until JOB_TIMEOUT_S."""
            if outcome.pixels is None:
                return outcome, None, 0.0
            begun = time.perf_counter()
            try:
                data = encode_image(outcome.pixels, request.output_format, request.output_quality)
                encode_ms = (time.perf_counter() - begun) * 1000
                delivered = plan.delivery.deliver(
                    job_id, outcome.index, outcome.seed, spec.width, spec.height, request.output_format, data,
                    plan.cache_params(items[outcome.index], cache_model),
                )
            except Exception as err:  # noqa: BLE001 - one image's failure, reported as that image's error
                log.exception("job %s: encoding or delivering image %d failed", job_id, outcome.index)
                delivered = Delivered(error_code="internal_error",
                                      error_message=f"{type(err).__name__} while encoding or delivering this image")
                encode_ms = (time.perf_counter() - begun) * 1000
            return outcome, delivered, encode_ms

        def on_outcome(outcome: ImageOutcome) -> None:
            future = self.encode_pool.submit(post_process, outcome)
            future.add_done_callback(lambda f: loop.call_soon_threadsafe(finished.put_nowait, f.result()))

        timings = {"text_encoding": 0.0, "denoising": 0.0, "decoding": 0.0, "image_encoding": 0.0}
        batches: list[int] = []
        seen_batches: set[int] = set()
        completed = failed = 0
        delivered_indices: set[int] = set()
        first_image_ms: float | None = None

        self.progress_sink(job, {"completed": 0, "total": total})
        for index, entry in sorted(plan.cached_entries.items()):
            completed += 1
            delivered_indices.add(index)
            first_image_ms = first_image_ms or (time.perf_counter() - started) * 1000
            yield image_chunk(entry, completed, total)
        to_run = [(i, item) for i, item in enumerate(items) if i not in plan.cached_entries]
        ticket = None
        if to_run:
            ticket = self.batcher.submit(job_id, spec, self._batch_group(plan), to_run, on_outcome)
        deadline = started + self.settings.job_timeout_s
        try:
            while completed + failed < total:
                try:
                    outcome, delivered, encode_ms = await asyncio.wait_for(
                        finished.get(), deadline - time.perf_counter())
                except asyncio.TimeoutError:
                    break
                if outcome.timings_ms and id(outcome.timings_ms) not in seen_batches:
                    seen_batches.add(id(outcome.timings_ms))
                    batches.append(outcome.batch_size)
                    for stage, ms in outcome.timings_ms.items():
                        timings[stage] += ms
                timings["image_encoding"] += encode_ms
                delivered_indices.add(outcome.index)
                if delivered is not None and delivered.entry is not None:
                    completed += 1
                    first_image_ms = first_image_ms or (time.perf_counter() - started) * 1000
                    yield image_chunk(delivered.entry, completed + failed, total)
                else:
                    failed += 1
                    code = delivered.error_code if delivered is not None else outcome.error_code
                    message = delivered.error_message if delivered is not None else outcome.error_message
                    error = {"index": outcome.index, "seed": outcome.seed, "code": code, "message": message}
                    yield image_error_chunk(error, completed + failed, total)
                self.progress_sink(job, {"completed": completed + failed, "total": total})
            for index in sorted(set(range(total)) - delivered_indices):  # out of time: name each missing image
                failed += 1
                error = {"index": index, "seed": items[index].seed, "code": "timeout",
                         "message": f"not finished within JOB_TIMEOUT_S={self.settings.job_timeout_s} s"}
                yield image_error_chunk(error, completed + failed, total)
        finally:
            if ticket is not None:
                self.batcher.cancel(ticket)  # a no-op when done; frees the GPU when the job was cancelled
        timings = {stage: round(ms, 2) for stage, ms in timings.items()}
        timings["first_image"] = round(first_image_ms or 0.0, 2)
        timings["total"] = round((time.perf_counter() - started) * 1000, 2)
        log.info("job %s: %d/%d images in %.0f ms (batches %s, %d from cache)", job_id, completed, total,
                 timings["total"], batches, len(plan.cached_entries))
        yield {"summary": self._summary(plan, completed, failed, timings, batches, model)}

    def _summary(self, plan: JobPlan, completed: int, failed: int, timings: dict[str, float], batches: list[int],
                 model: dict[str, Any]) -> dict[str, Any]:
        request, spec = plan.request, plan.spec
        settings = {
            "workflow": spec.workflow, "mode": plan.mode_ran, "width": spec.width, "height": spec.height,
            "steps": spec.steps, "guidance_scale": spec.guidance_scale, "num_images": request.num_images,
            "seed": request.seed, "output_format": request.output_format, "output_quality": request.output_quality,
            "delivery": plan.delivery.method,
        }
        if isinstance(spec, ConsistentSpec):
            settings.update(id_weight=spec.id_weight, identity_start_step=spec.identity_start_step)
        summary = {
            "mode": plan.mode_ran,
            "mode_requested": request.mode,
            "workflow": spec.workflow,
            "settings": settings,
            "images_completed": completed,
            "images_failed": failed,
            "images_from_cache": len(plan.cached_entries),
            "timings_ms": timings,
            "batch_sizes": batches,
            "model": model,
        }
        if request.size_note:
            summary["size_note"] = request.size_note
        if plan.delivery.switched_to_url:
            summary["delivery_note"] = "base64 would pass the result limit: images were uploaded instead"
        if plan.identity_cache_hit is not None:
            summary["identity_cache_hit"] = plan.identity_cache_hit
        if request.mode != plan.mode_ran:
            summary["fallback_reason"] = f"consistent mode is unavailable: {self.consistent_reason}"
        if model["demo"]:
            summary["notice"] = "demo model with random weights: images are noise"
        return summary

    def capabilities(self) -> dict[str, Any]:
        import diffusers
        import runpod
        import transformers

        danrisi_reason = None if self.settings.danrisi_enabled else "disabled by DANRISI_ENABLED=0"
        return {
            "model": self._model_identity(),
            "workflows": [
                {"name": "z-image-simple", "available": True, "reason": None},
                {"name": "z-image-danrisi", "available": danrisi_reason is None, "reason": danrisi_reason},
                {"name": "auto", "available": True, "reason": None, "resolves_to": self.resolve_workflow("auto")},
            ],
            "modes": [
                {"name": "fast", "available": True, "reason": None, "defaults": _sampling_defaults("fast")},
                {"name": "consistent", "available": self.consistent is not None, "reason": self.consistent_reason,
                 "defaults": _sampling_defaults("consistent")},
            ],
            "delivery": {"base64": True, "url": self.store is not None, "url_with_job_s3Config": True,
                         "result_cache": bool(self.store and self.store.config.result_cache)},
            "limits": {
                **input_limits(), "max_pixels": self.settings.max_pixels, "job_timeout_s": self.settings.job_timeout_s,
                "max_response_bytes": self.settings.max_response_bytes,
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
