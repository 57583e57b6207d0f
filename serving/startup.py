"""Settings → the switches each engine starts with (the only place that reads Settings for them)."""

from __future__ import annotations

import logging

from pipelines.acceleration import AccelerationPlan
from serving.settings import Settings

log = logging.getLogger(__name__)


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
