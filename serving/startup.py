"""The worker's start: settings → each engine's switches, the models loaded (real weights from
MODEL_DIR, else the demo models) and brought up to speed before the first job, each phase timed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from models.demo_pulid import ensure_demo_bundle
from models.z_image_demo import ensure_demo_model
from pipelines.acceleration import AccelerationPlan
from pipelines.pulid_flux import PuLIDFluxPipeline
from pipelines.startup import prepare_engine, prepare_pulid
from pipelines.z_image import BatchSpec, ZImageEngine, pick_device, serving_dtype
from serving.device import batch_limit
from serving.settings import Settings
from serving.startup_timing import StartupTimer

log = logging.getLogger(__name__)


@dataclass
class LoadedEngines:
    """The warm models: Z-Image always; PuLID-FLUX, or why consistent mode is unavailable."""

    fast: ZImageEngine
    consistent: PuLIDFluxPipeline | None
    consistent_reason: str | None


def acceleration_plan(settings: Settings, device: str) -> AccelerationPlan:
    """CUDA gets compile and warm-up by default; CPU refuses compile and FP8 with a log, not a crash."""
    cuda = device == "cuda"
    if settings.compile and not cuda:
        log.warning("COMPILE=1 ignored on %s: regional compile is a CUDA switch", device)
    if settings.fp8 and not cuda:
        log.warning("FP8=1 refused on %s: float8 matmuls need a CUDA GPU with compute capability >= 8.9", device)
    return AccelerationPlan(
        attention=settings.attention_backend,
        compile=cuda and settings.compile is not False,
        compile_cache_dir=settings.compile_cache_dir,
        fp8=cuda and settings.fp8,
        fp8_keep_last_blocks=settings.fp8_keep_last_blocks,
        fp8_min_psnr_db=float(settings.fp8_min_psnr_db),
        text_encoder=settings.text_encoder_device if cuda else "gpu",
        warmup=cuda and settings.warmup is not False,
    )


def load_engines(settings: Settings, startup: StartupTimer) -> LoadedEngines:
    """PuLID first: Z-Image's start-up places its text encoder by the GPU memory left after both."""
    device = pick_device(settings.device)
    plan = acceleration_plan(settings, device)
    with startup.phase("pulid-flux start"):  # load, speed switches, warm-up
        consistent, reason = load_consistent(settings, device, plan)
    model_dir = settings.model_dir or ensure_demo_model(settings.demo_model_dir)
    default_size = BatchSpec(1024, 1024, 2, 0.0, "z-image-simple")
    engine = prepare_engine(model_dir, device, plan, prompt_cache_size=settings.prompt_cache_size,
                            max_batch=lambda loaded: batch_limit(settings, loaded, default_size))
    for phase, ms in engine.startup_ms.items():
        startup.record(f"z-image {phase}", ms)
    log.info("startup: %s", startup.summary())
    return LoadedEngines(engine, consistent, reason)


def load_consistent(
    settings: Settings, device: str, plan: AccelerationPlan
) -> tuple[PuLIDFluxPipeline | None, str | None]:
    """The optional PuLID pipeline; when it can't load, fast mode still serves and says why."""
    if not settings.pulid_enabled:
        return None, "disabled by PULID_ENABLED=0"
    bundle = settings.pulid_model_dir
    if bundle is None and not settings.uses_demo_model:
        return None, "PULID_MODEL_DIR is not set"
    try:
        bundle = bundle or ensure_demo_bundle(settings.demo_model_dir)
        pipeline = PuLIDFluxPipeline.load(bundle, device, serving_dtype(device), settings.pulid_identity_cache)
        prepare_pulid(pipeline, plan, max_batch=settings.max_batch or 2)
    except Exception as err:  # noqa: BLE001 - a broken optional pipeline must not stop fast mode
        log.error("consistent mode unavailable: PuLID pipeline failed to load: %s", err)
        return None, f"the PuLID pipeline failed to load ({type(err).__name__})"
    log.info("loaded PuLID-FLUX from %s", bundle)
    return pipeline, None
