"""Which engine serves a request, and the spec its images share.

One class per mode, each turning a validated request into a `ModeChoice` (engine + spec), so
planning, scheduling and streaming route by the choice and never ask which mode they serve.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipelines.engine import Engine
from pipelines.identity import IdentityError, MultipleFaces
from pipelines.pulid_flux import PuLIDFluxPipeline, PuLIDSpec
from pipelines.samplers import DANRISI_ETA, DANRISI_REFERENCE_STEPS
from pipelines.z_image import BatchSpec, ZImageEngine
from serving.errors import JobError
from serving.init_image import InitImageLoader, InitInput
from serving.lora_loading import LoraLoader
from serving.input_image import REFERENCE, load_images
from serving.schema import MODE_DEFAULTS, GenerateRequest
from serving.settings import Settings

REFERENCE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ModeChoice:
    """The mode that runs a job: its engine, the spec of its images, what the summary adds."""

    name: str
    engine: Engine
    spec: Any
    summary_notes: dict[str, Any] = field(default_factory=dict)
    loras: tuple[tuple[Any, float], ...] = ()  # (adapter, scale) for every image of the job


def sampling_defaults(mode: str) -> dict[str, Any]:
    steps, guidance_scale = MODE_DEFAULTS[mode]
    return {"steps": steps, "guidance_scale": guidance_scale}


class FastMode:
    """Z-Image-Turbo: the simple (diffusers) or danrisi workflow, with the job's LoRAs, from noise
    or from the job's init image (loaded by `init_images` before the mode is chosen)."""

    name = "fast"

    def __init__(self, engine: ZImageEngine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.loras = LoraLoader(settings, engine.lora_layers)
        self.init_images = InitImageLoader(settings.concurrency, settings.max_pixels)

    def resolve_workflow(self, requested: str) -> str:
        if requested == "auto":
            danrisi = self.settings.auto_workflow == "z-image-danrisi" and self.settings.danrisi_enabled
            return "z-image-danrisi" if danrisi else "z-image-simple"
        if requested == "z-image-danrisi" and not self.settings.danrisi_enabled:
            raise JobError("workflow_unavailable", "z-image-danrisi is disabled on this worker", field="workflow")
        return requested

    async def choose(self, request: GenerateRequest, init: InitInput | None = None) -> ModeChoice:
        workflow = self.resolve_workflow(request.workflow)
        width, height = (request.width, request.height) if init is None else (init.width, init.height)
        spec = BatchSpec(width, height, *request.sampling("fast"), workflow, _eta(request, workflow),
                         request.image_strength)
        notes = {} if init is None else {"init_image": init.summary()}
        if not request.loras:
            return ModeChoice(self.name, self.engine, spec, notes)
        loras, reports = await self.loras.load(request.loras)
        return ModeChoice(self.name, self.engine, spec, {**notes, "loras": reports}, loras)

    def workflows(self) -> list[dict[str, Any]]:
        danrisi_reason = None if self.settings.danrisi_enabled else "disabled by DANRISI_ENABLED=0"
        return [
            {"name": "z-image-simple", "available": True, "reason": None, "model_calls": "steps",
             "sampler": "flow-match Euler (diffusers ZImagePipeline)"},
            {"name": "z-image-danrisi", "available": danrisi_reason is None, "reason": danrisi_reason,
             "model_calls": "2*steps+1",
             "sampler": "RES4LYF 46de917 linear/ralston_2s, beta(0.4, 0.4) schedule from 0.996, eta, bongmath",
             "eta": {"default": DANRISI_ETA, "range": [0, 1]},
             "reference": {"steps": DANRISI_REFERENCE_STEPS, "eta": DANRISI_ETA, "lora_strength": 1.0,
                           "note": "the users' ComfyUI graph; fast mode runs 8 steps unless steps is given"}},
            {"name": "auto", "available": True, "reason": None, "resolves_to": self.resolve_workflow("auto")},
        ]


def _eta(request: GenerateRequest, workflow: str) -> float | None:
    """Danrisi's SDE noise share: the request's, else the graph's 0.5; other workflows take none."""
    if workflow == "z-image-danrisi":
        return DANRISI_ETA if request.eta is None else request.eta
    if request.eta is not None:
        raise JobError("invalid_input", f"is only used by z-image-danrisi (this job runs {workflow})", field="eta")
    return None


class ConsistentMode:
    """PuLID-FLUX: the reference photo is fetched (its own pool: a slow host holds only its job)
    and turned into id tokens (one identity thread) before the job's images are queued."""

    name = "consistent"

    def __init__(self, pipeline: PuLIDFluxPipeline | None, unavailable_reason: str | None, settings: Settings) -> None:
        self.pipeline = pipeline
        self.unavailable_reason = unavailable_reason
        self.settings = settings
        self._fetch_pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="reference")
        self._identity_pool = ThreadPoolExecutor(1, thread_name_prefix="identity")

    async def choose(self, request: GenerateRequest) -> ModeChoice:
        (data, rgb), = await load_images(self._fetch_pool, [(REFERENCE, request.reference_image)], REFERENCE_TIMEOUT_S)
        try:
            identity = await asyncio.get_running_loop().run_in_executor(self._identity_pool,
                                                                         self.pipeline.compute_identity, rgb)
        except IdentityError as err:
            code = "multiple_faces" if isinstance(err, MultipleFaces) else "no_face"
            rule = "has more than one face: crop it to one person" if code == "multiple_faces" else "has no face"
            raise JobError(code, rule, field="reference_image") from None
        steps, guidance_scale = request.sampling("consistent")
        start = request.identity_start_step
        if start is None:
            start = min(self.settings.pulid_start_step, steps - 1)
        spec = PuLIDSpec(request.width, request.height, steps, guidance_scale, hashlib.sha256(data).hexdigest(),
                         request.id_weight, start, identity)
        return ModeChoice(self.name, self.pipeline, spec, {"identity_cache_hit": identity.from_cache})


class Modes:
    """Both modes; `choose` applies the request's fallback when consistent mode is unavailable."""

    def __init__(self, fast: FastMode, consistent: ConsistentMode) -> None:
        self.fast = fast
        self.consistent = consistent

    async def choose(self, request: GenerateRequest, init: InitInput | None = None) -> tuple[ModeChoice, str | None]:
        """The choice, and why it is not the requested mode (None when it is). `init` is the
        job's loaded init image (fast mode only: the schema refuses it with consistent mode)."""
        if request.mode == "fast":
            return await self.fast.choose(request, init), None
        if self.consistent.pipeline is not None:
            return await self.consistent.choose(request), None
        reason = f"consistent mode is unavailable: {self.consistent.unavailable_reason}"
        if request.fallback != "fast":
            raise JobError("mode_unavailable", reason, field="mode")
        return await self.fast.choose(request), reason

    def describe(self) -> list[dict[str, Any]]:
        """Capabilities' `modes`."""
        return [
            {"name": "fast", "available": True, "reason": None, "defaults": sampling_defaults("fast")},
            {"name": "consistent", "available": self.consistent.pipeline is not None,
             "reason": self.consistent.unavailable_reason, "defaults": sampling_defaults("consistent")},
        ]
