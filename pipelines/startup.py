"""Bringing a Z-Image engine up to speed: load → speed switches → text encoder placement → warm-up
→ compile cache saved. The one start-up sequence, used by the worker, the GPU benchmark, the GPU
check and the compile tests, so what they measure is what serves.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch

from pipelines.acceleration import AccelerationPlan, accelerate_transformer, save_compile_cache
from pipelines.engine import ImageItem
from pipelines.lora import MIN_PACKED_RANK, warm_up_adapter
from pipelines.pulid_flux import PuLIDFluxPipeline, PuLIDSpec
from pipelines.z_image import BatchSpec, ZImageEngine

log = logging.getLogger(__name__)

WARMUP_SIZE = 1024  # the API's default width and height
WARMUP_STEPS = 2
WARMUP_PROMPT = "warm-up"
WARMUP_LONG_PROMPT = "warm-up " * 40  # another 32-token caption bucket than WARMUP_PROMPT, any tokenizer
GUARD_PROMPT = "a portrait photo of a woman in a red wool coat on a city street, evening light"
GUARD_IMAGES = 2  # seeds 0 and 1
GUARD_SIZE = 512
GUARD_STEPS = 8
PULID_GUIDANCE = 4.0  # FLUX.1-dev's distilled guidance in consistent mode


def free_gpu_bytes() -> int:
    """Free GPU memory once the allocator has returned what load-time forwards (attention probes,
    the FP8 guard) or a failed load left cached: that memory is free for jobs too."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def render_guard(engine: ZImageEngine, size: int = GUARD_SIZE) -> np.ndarray:
    """The fixed-seed images both precisions must agree on (the FP8 guard)."""
    return engine.generate_fixed(GUARD_PROMPT, GUARD_IMAGES, size, size, GUARD_STEPS).images


def warm_up(
    engine: ZImageEngine, width: int, height: int, max_batch: int, steps: int = WARMUP_STEPS
) -> dict[str, float]:
    """The generations that leave nothing to compile for the first jobs: batch 1 (compiles static),
    batch 2 (recompiles once with a symbolic batch, which then serves every larger batch), then
    batch 1 again with a caption of another length. Dynamo specialises size 1, so batch 1 keeps its
    own graph, static in the sequence length until it sees a second one. The same two batch sizes
    then run the per-image LoRA path (adapters whose delta is zero) at two stacked ranks. After
    these, jobs of any batch size up to `max_batch`, caption length, image size or LoRA set reuse
    the graphs (tests/pipelines/test_acceleration.py); warming each larger batch size would only
    lengthen the cold start."""
    sizes = [size for size in (1, 2) if size <= max_batch]
    runs = [(f"batch {size}", size, WARMUP_PROMPT, ()) for size in sizes]
    runs.append(("batch 1, long prompt", 1, WARMUP_LONG_PROMPT, ()))
    # The LoRA path: the stacked rank is padded to a power of two; a second rank makes it symbolic
    # (dynamo's automatic dynamic shapes), so no LoRA set of any rank compiles in a job.
    for rank in (MIN_PACKED_RANK, 2 * MIN_PACKED_RANK):
        lora = ((warm_up_adapter(engine.lora_layers, rank), 1.0),)
        runs += [(f"batch {size}, LoRA rank {rank}", size, WARMUP_PROMPT, lora) for size in sizes]
    spent: dict[str, float] = {}
    for name, size, prompt, loras in runs:
        started = time.perf_counter()
        engine.generate_fixed(prompt, size, width, height, steps, loras)
        spent[name] = round((time.perf_counter() - started) * 1000, 1)
        log.info("warm-up %s at %dx%d: %.0f ms", name, width, height, spent[name])
    return spent


def place_text_encoder(engine: ZImageEngine, choice: str, free_bytes: int | None, warmup_size: int) -> None:
    """TEXT_ENCODER_DEVICE: `cpu` moves it; `auto`, once every model is loaded, keeps it on the GPU
    (prompts encode in milliseconds) unless the memory left (`free_bytes`; None off the GPU) could
    not hold one default-size image."""
    if choice == "cpu":
        engine.move_text_encoder_to_cpu("TEXT_ENCODER_DEVICE=cpu")
    elif choice == "auto" and free_bytes is not None:
        needed = engine.activation_bytes(BatchSpec(warmup_size, warmup_size, WARMUP_STEPS, 0.0, "z-image-simple"))
        if free_bytes < needed:
            engine.move_text_encoder_to_cpu(f"auto: {free_bytes / 2**30:.1f} GiB free after loading, "
                                            f"one image needs {needed / 2**30:.1f} GiB")


def start_engine(engine: ZImageEngine, plan: AccelerationPlan, *, max_batch: Callable[[ZImageEngine], int],
                 warmup_size: int = WARMUP_SIZE) -> dict[str, float]:
    """Everything after the load: speed switches → text encoder placement → warm-up → compile
    cache saved. Returns each phase's ms (the GPU check starts engines built in memory with it)."""
    phases: dict[str, float] = {}
    mark = time.perf_counter()
    cuda = engine.device.type == "cuda"
    engine.acceleration = accelerate_transformer(
        engine.pipe.transformer, plan, fp8_blocks=engine.fp8_blocks, render_guard=partial(render_guard, engine),
        select_attention_backend=cuda or plan.attention != "auto")
    place_text_encoder(engine, plan.text_encoder, free_gpu_bytes() if cuda else None, warmup_size)
    phases["acceleration"] = (time.perf_counter() - mark) * 1000
    if plan.warmup:  # compile now, at the default size, not in a job
        mark = time.perf_counter()
        engine.acceleration.warmup_ms = warm_up(engine, warmup_size, warmup_size, max_batch(engine))
        save_compile_cache(plan.compile_cache_dir if engine.acceleration.compiled else None)
        phases["warm_up"] = (time.perf_counter() - mark) * 1000
    return phases


def prepare_engine(
    model_dir: Path, device: str, plan: AccelerationPlan, *, prompt_cache_size: int = 256,
    max_batch: Callable[[ZImageEngine], int] = lambda engine: 2, warmup_size: int = WARMUP_SIZE,
) -> ZImageEngine:
    """A served engine from a diffusers folder. Load other models first: `auto` text-encoder
    placement and `max_batch(engine)` read the GPU memory that is left. Each phase's time is kept
    in `engine.startup_ms` (capabilities and the GPU check report it)."""
    started = time.perf_counter()
    engine = ZImageEngine.load(model_dir, device, prompt_cache_size)
    phases = {"load": (time.perf_counter() - started) * 1000}
    phases |= start_engine(engine, plan, max_batch=max_batch, warmup_size=warmup_size)
    engine.startup_ms = {phase: round(ms, 1) for phase, ms in phases.items()}
    return engine


def render_pulid_guard(pipeline: PuLIDFluxPipeline, size: int = GUARD_SIZE) -> np.ndarray:
    """FLUX's fixed-seed guard images, no identity: the FP8 guard compares the transformer alone."""
    return np.stack(pipeline.render([GUARD_PROMPT] * GUARD_IMAGES, list(range(GUARD_IMAGES)), size, size,
                                    GUARD_STEPS, PULID_GUIDANCE, None))


def warm_up_pulid(
    pipeline: PuLIDFluxPipeline, size: int, max_batch: int, steps: int = WARMUP_STEPS
) -> dict[str, float]:
    """Batch 1, then batch 2 when allowed, with a blank identity that starts at the second step:
    both the plain and the identity-injecting block graphs compile before any job."""
    identity = pipeline.blank_identity()
    spent: dict[str, float] = {}
    for count in [size_ for size_ in (1, 2) if size_ <= max_batch]:
        spec = PuLIDSpec(size, size, steps, PULID_GUIDANCE, "warm-up", 1.0, 1, identity)
        started = time.perf_counter()
        pipeline.generate([ImageItem(WARMUP_PROMPT, "", seed) for seed in range(count)], spec)
        spent[f"batch {count}"] = round((time.perf_counter() - started) * 1000, 1)
        log.info("PuLID warm-up batch %d at %dx%d: %.0f ms", count, size, size, spent[f"batch {count}"])
    return spent


def prepare_pulid(pipeline: PuLIDFluxPipeline, plan: AccelerationPlan, *, max_batch: int = 2,
                  warmup_size: int = WARMUP_SIZE) -> None:
    """Consistent mode's speed switches, as Z-Image's: FP8 of the FLUX blocks behind the same guard,
    regional compile with the same eager fallback and cache, warm-up. Attention stays diffusers'
    FLUX processor (SDPA)."""
    pipeline.acceleration = accelerate_transformer(
        pipeline.flux.transformer, plan, fp8_blocks=pipeline.fp8_blocks,
        render_guard=partial(render_pulid_guard, pipeline), select_attention_backend=False)
    if plan.warmup:
        pipeline.acceleration.warmup_ms = warm_up_pulid(pipeline, warmup_size, max_batch)
        save_compile_cache(plan.compile_cache_dir if pipeline.acceleration.compiled else None)
