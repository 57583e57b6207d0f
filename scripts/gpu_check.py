"""GPU proof (issue 13): one process that answers everything the first GPU run has to answer.

Each phase is isolated: an error is recorded with the last lines of its traceback and the next
phase runs. The JSON (`<out>/gpu_check.json`) is rewritten atomically after every phase and every
timed row, so a late failure or a killed process loses nothing already measured; INFO logs (the
attention, compile and FP8 decisions) go to `<out>/gpu_check.log`. `--budget-s` skips a phase whose
estimated cost no longer fits, and says so. Weights are random (speed depends on shapes, not
values): built on the meta device and materialised on the target device, never on the CPU.

    python -m scripts.gpu_check --size full --budget-s 460      # the GPU run (docs/PERFORMANCE.md)
    python -m scripts.gpu_check --size small                     # CPU rehearsal, tiny configs
    python -m scripts.gpu_check --dry-run-full                   # full-size shapes and FLOPs on meta
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipelines.acceleration import AccelerationPlan, compile_blocks, fp8_target_names, torchao_float8
from pipelines.engine import ImageItem, ModelIdentity, run_lockstep
from pipelines.startup import start_engine as start_served_engine
from pipelines.startup import warm_up
from pipelines.z_image import ACTIVATION_BYTES_PER_MEGAPIXEL, BatchSpec, ZImageEngine, serving_dtype
from scripts.bench_gpu import PROMPT, build_random_pipeline

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("gpu_check")

H100_BF16_TFLOPS = 989.0  # dense bf16 tensor-core peak of an H100 SXM (spec sheet); the H200's is the same
SUMMARY_KEYS = ("gpu", "torch", "correctness_max_level_diff", "one_image_1024_p50_s", "three_jobs_all_images_s",
                "eight_images_s", "warmup_s", "peak_memory_gib")
WORKFLOWS = ("z-image-simple", "z-image-danrisi")
NEGATIVE = "blurry, low quality, watermark, text, jpeg artefacts, oversaturated, deformed hands, " * 3


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each phase runs at: `full` is the issue's figures, `small` the same calls on tiny configs."""

    correctness_side: int
    side: int
    steps: int
    batches: tuple[int, ...]
    repeats: int
    consistent_side: int
    consistent_steps: int
    consistent_images: int
    poisson_side: int
    poisson_jobs: int


SIZES = {
    "full": Sizes(512, 1024, 8, (1, 3, 8), 3, 1024, 20, 8, 512, 12),
    "small": Sizes(64, 64, 4, (1, 3, 8), 3, 64, 4, 8, 64, 6),  # the plumbing, not the arithmetic: 4 steps
}
# FLUX.1-dev's published sizes (transformer 11.9 B, T5-XXL encoder 4.76 B, CLIP-L text 123 M, its VAE).
FLUX_DEV = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "t5": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_gated_act=True),
    "clip": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, projection_dim=768),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
}


# -- the results file ---------------------------------------------------------------------------
class Results:
    """The JSON document, rewritten whole (temp file + rename) after every change."""

    def __init__(self, path: Path, args: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"args": args, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     "summary": dict.fromkeys(SUMMARY_KEYS), "phases": {}}
        self.save()

    def save(self) -> None:
        staging = self.path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(staging, self.path)

    def phase(self, name: str) -> dict[str, Any]:
        return self.data["phases"].setdefault(name, {"status": "running"})

    def row(self, phase: str, key: str, value: Any) -> None:
        """One measured figure: saved at once."""
        self.phase(phase)[key] = value
        self.save()

    def append(self, phase: str, key: str, value: Any) -> None:
        self.phase(phase).setdefault(key, []).append(value)
        self.save()

    def summarise(self, **values: Any) -> None:
        self.data["summary"].update(values)
        self.save()


@dataclasses.dataclass
class Context:
    """What the phases share: options, the device, the results, and the models built so far."""

    size: str
    sizes: Sizes
    device: str
    dtype: torch.dtype
    results: Results
    work_dir: Path
    engine: ZImageEngine | None = None
    consistent: Any = None
    reference: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    flops: dict[str, Any] | None = None  # the counted batch-1 row of the simple workflow (count_flops)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def reset_peak(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()


def peak_gib(ctx: Context) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if ctx.cuda else None


def mfu(ctx: Context, images: int, seconds: float | None, workflow: str = "z-image-simple") -> float | None:
    """Achieved fraction of the H100/H200 dense bf16 peak for `images` whole images in `seconds`
    (danrisi makes 2·steps + 1 transformer calls where the simple workflow makes steps)."""
    if not ctx.cuda or not ctx.flops or not seconds:
        return None
    counted = ctx.flops
    calls = counted["steps"] if workflow == "z-image-simple" else 2 * counted["steps"] + 1
    tflop = counted["text_tflop_per_image"] + counted["decode_tflop_per_image"]
    tflop += calls * counted["transformer_call_tflop_per_image"]
    return round(tflop * images / seconds / H100_BF16_TFLOPS, 4)


# -- engine start-up (the one place to swap for the lead's prepare_engine) ----------------------
def build_engine(size: str, device: str) -> ZImageEngine:
    """Random full-size (or tiny) Z-Image, built on the meta device and initialised on `device`."""
    pipe = build_random_pipeline(size, device, serving_dtype(device) if device != "meta" else torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return ZImageEngine(pipe, ModelIdentity(f"random-{size}", "gpu-check", True), device, 256)


def start_engine(engine: ZImageEngine, plan: AccelerationPlan, side: int, max_batch: int) -> dict[str, Any]:
    """What a worker does before its first job (pipelines.startup.start_engine, the worker's own
    sequence): the plan's switches, then the warm-up at `side`."""
    phases = start_served_engine(engine, plan, max_batch=lambda _: max_batch, warmup_size=side)
    return {"accelerate_s": round(phases["acceleration"] / 1000, 2),
            "warmup_s": round(phases.get("warm_up", 0.0) / 1000, 2),
            "acceleration": dataclasses.asdict(engine.acceleration)}


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# -- phases ---------------------------------------------------------------------------------------
def phase_environment(ctx: Context) -> None:
    import diffusers
    import transformers

    def row(key: str, value: Any) -> None:
        ctx.results.row("environment", key, value)

    row("python", platform.python_version())
    row("torch", torch.__version__)
    row("diffusers", diffusers.__version__)
    row("transformers", transformers.__version__)
    row("cpu_count", os.cpu_count())
    try:
        import triton

        row("triton", triton.__version__)
    except ImportError as err:
        row("triton", f"not importable: {err}")
    row("cuda_available", torch.cuda.is_available())
    gpu = platform.processor() or platform.machine()
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        gpu = props.name
        row("gpu", {"name": props.name, "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count})
        row("cuda", torch.version.cuda)
        row("cudnn", torch.backends.cudnn.version())
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
        row("nvidia_smi", smi.stdout.strip() or smi.stderr.strip())
    ctx.results.summarise(gpu=gpu, torch=torch.__version__)


def count_flops(engine: ZImageEngine, batches: tuple[int, ...], side: int, steps: int,
                workflows: tuple[str, ...], record: Callable[[dict[str, Any]], None]) -> None:
    """The engine's stages on the meta device under FlopCounterMode: every tensor at its real shape,
    no memory and no arithmetic. Text: the encoder's forward at the prompt's token length;
    denoising: the engine's rows and `step` themselves, in lock-step; decoding: the VAE's forward."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = engine.pipe
    tokens = len(pipe.tokenizer(engine._chat(PROMPT)).input_ids)
    latent = 2 * (side // (pipe.vae_scale_factor * 2))
    for workflow in workflows:
        for batch in batches:
            started = time.perf_counter()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                hidden = pipe.text_encoder(input_ids=torch.zeros(batch, tokens, dtype=torch.long, device="meta"),
                                           output_hidden_states=True).hidden_states[-2]
            text_flops = counter.get_total_flops()
            text = list(hidden.to(engine.dtype).unbind(0))
            noise = torch.empty(batch, pipe.transformer.in_channels, latent, latent, device="meta")
            spec = BatchSpec(side, side, steps, 0.0, workflow, 0.5 if workflow == "z-image-danrisi" else None)
            items = [ImageItem(PROMPT, "", seed) for seed in range(batch)]
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                rows = engine.make_rows(noise, text, None, items, spec)
                run_lockstep(rows, engine.step, lambda: False)
            latents = torch.cat([row.latents for row in rows])
            denoise_flops = counter.get_total_flops()
            vae = pipe.vae
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor,
                                    return_dict=False)[0]
            decode_flops = counter.get_total_flops()
            assert tuple(pixels.shape) == (batch, 3, side, side), pixels.shape
            calls = steps if workflow == "z-image-simple" else 2 * steps + 1

            def tflop(flops: float, batch: int = batch) -> float:
                return float(f"{flops / batch / 1e12:.4g}")  # per image, 4 significant digits

            record({"workflow": workflow, "batch": batch, "side": side, "steps": steps, "text_tokens": tokens,
                    "model_calls": calls, "text_tflop_per_image": tflop(text_flops),
                    "transformer_call_tflop_per_image": tflop(denoise_flops / calls),
                    "denoise_tflop_per_image": tflop(denoise_flops), "decode_tflop_per_image": tflop(decode_flops),
                    "image_tflop": tflop(text_flops + denoise_flops + decode_flops),
                    "pixels_shape": list(pixels.shape), "meta_seconds": round(time.perf_counter() - started, 1)})


def dry_run_flops(ctx: Context, size: str, batches: tuple[int, ...], workflows: tuple[str, ...], phase: str) -> None:
    sizes = SIZES[size]
    engine = build_engine(size, "meta")
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        ctx.results.append(phase, "rows", row)

    count_flops(engine, batches, sizes.side, sizes.steps, workflows, record)
    simple_one = next(r for r in rows if r["workflow"] == "z-image-simple" and r["batch"] == 1)
    ctx.flops = simple_one
    floor = simple_one["image_tflop"] / H100_BF16_TFLOPS
    ctx.results.row(phase, "h100_bf16_floor_s_per_image", float(f"{floor:.3g}"))
    ctx.results.row(phase, "h100_bf16_floor_denoise_s_per_image",
                    float(f"{simple_one['denoise_tflop_per_image'] / H100_BF16_TFLOPS:.3g}"))


def phase_flops(ctx: Context) -> None:
    """FLOPs per image at this run's size, counted on the meta device (the MFU denominators)."""
    dry_run_flops(ctx, ctx.size, (1,), ("z-image-simple",), "flops")


def phase_build(ctx: Context) -> None:
    reset_peak(ctx)
    started = time.perf_counter()
    ctx.engine = build_engine(ctx.size, ctx.device)
    sync(ctx)
    params = sum(p.numel() for m in (ctx.engine.pipe.transformer, ctx.engine.pipe.text_encoder, ctx.engine.pipe.vae)
                 for p in m.parameters())
    ctx.results.row("build", "seconds", round(time.perf_counter() - started, 2))
    ctx.results.row("build", "parameters_b", round(params / 1e9, 3))
    ctx.results.row("build", "dtype", str(ctx.engine.dtype))
    ctx.results.row("build", "weights_gib", round(torch.cuda.memory_allocated() / 2**30, 3) if ctx.cuda else None)
    ctx.results.row("build", "build_peak_gib", peak_gib(ctx))


def _engine_vs_diffusers(ctx: Context, phase: str, remember: bool) -> None:
    """The engine's image against `ZImagePipeline.__call__` (same weights, seed, generator device):
    plain, and CFG with a negative prompt of another caption length."""
    engine, side = ctx.engine, ctx.sizes.correctness_side
    assert engine.text_length_bucket(NEGATIVE) != engine.text_length_bucket(PROMPT)
    worst = 0
    for name, guidance in (("plain", 0.0), ("cfg", 2.5)):
        ours = engine.generate([ImageItem(PROMPT, NEGATIVE, 5)], BatchSpec(side, side, 4, guidance, "z-image-simple"))
        if remember:
            image = engine.pipe(PROMPT, negative_prompt=NEGATIVE, height=side, width=side, num_inference_steps=4,
                                guidance_scale=guidance, generator=torch.Generator(ctx.device).manual_seed(5),
                                output_type="np").images[0]
            ctx.reference[name] = (image * 255).round().astype(np.uint8)
        diff = int(np.abs(ours.images[0].astype(int) - ctx.reference[name].astype(int)).max())
        worst = max(worst, diff)
        ctx.results.row(phase, name, {"max_level_diff": diff, "side": side, "steps": 4, "guidance": guidance})
    previous = ctx.results.data["summary"]["correctness_max_level_diff"] or 0
    ctx.results.summarise(correctness_max_level_diff=max(previous, worst))


def phase_correctness(ctx: Context) -> None:
    """Before attention selection: diffusers' own processor on both sides."""
    _engine_vs_diffusers(ctx, "correctness", remember=True)


def phase_attention(ctx: Context) -> None:
    """The serving attention selection (probed at real shapes by the next generation), then the
    engine again against diffusers' images from before it."""
    start_engine(ctx.engine, AccelerationPlan(attention="auto" if ctx.cuda else "native"), ctx.sizes.side, 1)
    report = ctx.engine.acceleration
    ctx.results.row("attention", "selected", {"attention": report.attention, "masked": report.attention_masked,
                                              "notes": report.notes})
    _engine_vs_diffusers(ctx, "attention", remember=False)


def _timed(ctx: Context, phase: str, count: int, prompt: str, workflow: str = "z-image-simple",
           key: str = "rows") -> dict[str, Any]:
    side = ctx.sizes.side
    reset_peak(ctx)
    sync(ctx)
    started = time.perf_counter()
    items = [ImageItem(prompt, "", seed) for seed in range(count)]
    eta = 0.5 if workflow == "z-image-danrisi" else None
    result = ctx.engine.generate(items, BatchSpec(side, side, ctx.sizes.steps, 0.0, workflow, eta))
    sync(ctx)
    seconds = time.perf_counter() - started
    row = {"batch": count, "side": side, "steps": ctx.sizes.steps, "workflow": workflow, "s": round(seconds, 3),
           "stages_ms": result.timings_ms, "peak_memory_gib": peak_gib(ctx), "mfu": mfu(ctx, count, seconds, workflow)}
    ctx.results.append(phase, key, row)
    return row


def _time_batches(ctx: Context, phase: str) -> float:
    """Batch 1 (p50 of `repeats`, a new prompt each so text encoding is uncached), then the larger
    batches, each shape once untimed first. Returns the batch-1 p50 in seconds."""
    _timed(ctx, phase, 1, f"{PROMPT} warm", key="untimed_rows")
    singles = [_timed(ctx, phase, 1, f"{PROMPT} {i}")["s"] for i in range(ctx.sizes.repeats)]
    p50 = statistics.median(singles)
    ctx.results.row(phase, "one_image_p50_s", p50)
    ctx.results.row(phase, "one_image_p50_mfu", mfu(ctx, 1, p50))
    for count in ctx.sizes.batches[1:]:
        _timed(ctx, phase, count, PROMPT, key="untimed_rows")
        _timed(ctx, phase, count, PROMPT)
    return p50


def phase_eager(ctx: Context) -> None:
    p50 = _time_batches(ctx, "eager")
    ctx.results.summarise(one_image_1024_p50_s=p50, one_image_1024_p50_mfu=mfu(ctx, 1, p50))


def phase_compiled(ctx: Context) -> None:
    """Cold compile (empty cache) and warm-up as the worker does it, the graph count, the same batches."""
    plan = AccelerationPlan(attention="auto", compile=True, compile_cache_dir=ctx.work_dir / "compile-cache",
                            warmup=True)
    start = start_engine(ctx.engine, plan, ctx.sizes.side, max(ctx.sizes.batches))
    ctx.results.row("compiled", "start", start)
    ctx.results.row("compiled", "graphs_after_warmup", unique_graphs())
    ctx.results.summarise(warmup_s=start["warmup_s"])
    p50 = _time_batches(ctx, "compiled")
    ctx.results.row("compiled", "graphs_after_batches", unique_graphs())
    ctx.results.row("compiled", "still_compiled", ctx.engine.acceleration.compiled)
    ctx.results.summarise(one_image_1024_p50_s=p50, one_image_1024_p50_mfu=mfu(ctx, 1, p50))


async def _job(worker, job: dict[str, Any]) -> dict[str, Any]:
    """One job through `Worker.run_job`: time to its first and its last image, and what came back."""
    started = time.perf_counter()
    first = None
    images = errors = 0
    summary = error = None
    async for chunk in worker.run_job(job):
        if "image" in chunk:
            images += 1
            first = first or time.perf_counter() - started
        elif "image_error" in chunk:
            errors += 1
        elif "summary" in chunk:
            summary = chunk["summary"]
        elif "error" in chunk:
            error = chunk["error"]
    return {"first_image_s": round(first, 3) if first else None,
            "all_images_s": round(time.perf_counter() - started, 3),
            "images": images, "image_errors": errors, "error": error,
            "batch_sizes": summary["batch_sizes"] if summary else None}


def phase_serving(ctx: Context) -> None:
    """A `Worker` around the engine as it stands (compiled when the compiled phase ran), jobs
    through `run_job`: 3 concurrent 1-image jobs, then one 8-image job, for each workflow."""
    worker = serving_worker(ctx)
    ctx.results.row("serving", "engine_compiled", ctx.engine.acceleration.compiled)
    side = ctx.sizes.side

    def job(name: str, prompt: str, count: int, workflow: str, seed: int) -> dict[str, Any]:
        return {"id": name, "input": {"prompt": prompt, "num_images": count, "width": side, "height": side,
                                      "workflow": workflow, "seed": seed, "output_format": "jpeg",
                                      "output_quality": 75}}

    async def three(workflow: str) -> list[dict[str, Any]]:
        jobs = [job(f"base-{workflow}-{i}", f"{PROMPT}, take {i}", 1, workflow, 100 + i) for i in range(3)]
        return await asyncio.gather(*(_job(worker, j) for j in jobs))

    try:
        for workflow in WORKFLOWS:
            asyncio.run(_job(worker, job(f"untimed-{workflow}", PROMPT, 1, workflow, 1)))  # first shape per workflow
            started = time.perf_counter()
            jobs = asyncio.run(three(workflow))
            all_s = round(time.perf_counter() - started, 3)
            ctx.results.append("serving", "rows", {"case": "3 concurrent 1-image jobs", "workflow": workflow,
                                                   "all_images_s": all_s, "mfu": mfu(ctx, 3, all_s, workflow),
                                                   "jobs": jobs})
            eight = asyncio.run(_job(worker, job(f"profile-{workflow}", PROMPT, 8, workflow, 7)))
            ctx.results.append("serving", "rows", {"case": "one 8-image job", "workflow": workflow,
                                                   "mfu": mfu(ctx, 8, eight["all_images_s"], workflow), **eight})
            delivered = sum(j["images"] for j in jobs) + eight["images"]
            if delivered != 11:
                raise RuntimeError(f"{workflow}: {delivered} of 11 images delivered: {jobs} {eight}")
            if workflow == "z-image-simple":
                ctx.results.summarise(three_jobs_all_images_s=all_s, three_jobs_all_images_mfu=mfu(ctx, 3, all_s),
                                      eight_images_s=eight["all_images_s"],
                                      eight_images_mfu=mfu(ctx, 8, eight["all_images_s"]))
    finally:
        worker.engine_loop.stop()
        worker.encode_pool.shutdown(wait=False)


def serving_worker(ctx: Context):
    """A `Worker` around the engine as it stands (compiled when the compiled phase ran). No storage
    on that machine: base64 results, JPEG, the largest result limit. Random-weight images compress
    badly: 8 PNGs of noise at 1024² pass the 10 MB default, and the images past it would come back
    as payload_too_large errors instead of being timed."""
    from serving.settings import load_settings
    from serving.startup import LoadedEngines
    from serving.worker import Worker

    settings = load_settings({"DEMO_MODEL_DIR": str(ctx.work_dir / "unused-demo"), "MAX_RESPONSE_MB": "20"})
    return Worker(settings, LoadedEngines(ctx.engine, None, "not loaded by gpu_check"))


def phase_scheduling(ctx: Context) -> None:
    """Step-level scheduling (issue 23) through a `Worker`'s `run_job`, with the scenarios of
    scripts/bench_scheduling.py: a 1-image job submitted 0.3 of the way into an 8-image job at the
    full side (1024²: compute-bound, so the 8-image job is preempted), then a seeded Poisson mix of
    1- and 8-image jobs at `poisson_side` at the worker's measured capacity."""
    from scripts.bench_scheduling import poisson, preempt, warm_up

    worker = serving_worker(ctx)
    sizes = ctx.sizes
    served = ctx.results.data["phases"].get("serving", {}).get("status") == "ok"  # then warm at the full side
    try:
        asyncio.run(warm_up(worker.run_job, {sizes.poisson_side} | (set() if served else {sizes.side}), sizes.steps))
        point1 = asyncio.run(preempt(worker.run_job, sizes.side, sizes.steps, repeats=1))
        ctx.results.row("scheduling", "preempt", {"side": sizes.side, "steps": sizes.steps, **point1})
        ctx.results.summarise(preempt_one_image_ratio=point1["one_image_ratio"],
                              preempt_eight_images_ratio=point1["eight_images_ratio"])
        mix = asyncio.run(poisson(worker.run_job, sizes.poisson_side, sizes.steps, sizes.poisson_jobs,
                                  share_of_eights=0.25, load=1.0, rate=None, seed=7))
        ctx.results.row("scheduling", "poisson", {"side": sizes.poisson_side, "steps": sizes.steps, **mix})
    finally:
        worker.engine_loop.stop()
        worker.encode_pool.shutdown(wait=False)


IMG2IMG_STRENGTH = 0.6  # the request's default: 8 steps start at step 3 and make 5 calls


def phase_img2img(ctx: Context) -> None:
    """Image to image (issue 25) on the engine as it stands (compiled if that phase ran): one image
    from an init image at strength 0.6, and one inpainting image (the right half repainted), each
    run once untimed (its first VAE encode at this size), then timed, with its model calls counted
    on the transformer and its stages (`vae_encoding` among them), beside the text-to-image p50
    of the eager or compiled phase (`one_image_1024_p50_s`)."""
    from pipelines.img2img import InitImage, preprocess_image, preprocess_mask
    from scripts.bench_img2img import model_calls

    engine, side, steps = ctx.engine, ctx.sizes.side, ctx.sizes.steps
    photo = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    mask = np.zeros_like(photo)
    mask[:, side // 2:] = 255
    init = InitImage(preprocess_image(photo, side, side))
    variants = {"image_to_image": init, "inpainting": InitImage(init.pixels, preprocess_mask(mask, side, side))}
    spec = BatchSpec(side, side, steps, 0.0, "z-image-simple", None, IMG2IMG_STRENGTH)
    text_to_image_s = ctx.results.data["summary"]["one_image_1024_p50_s"]
    ctx.results.row("img2img", "text_to_image_p50_s", text_to_image_s)
    for name, image in variants.items():
        items = [ImageItem(f"{PROMPT} {name}", "", 1, init=image)]
        calls = model_calls(engine, lambda items=items: engine.generate(items, spec))  # untimed
        sync(ctx)
        started = time.perf_counter()
        result = engine.generate(items, spec)
        sync(ctx)
        seconds = round(time.perf_counter() - started, 3)
        ctx.results.row("img2img", name, {
            "side": side, "steps": steps, "strength": IMG2IMG_STRENGTH, "model_calls": calls, "s": seconds,
            "stages_ms": result.timings_ms,
            "vs_text_to_image": round(seconds / text_to_image_s, 3) if text_to_image_s else None})
        ctx.results.summarise(**{f"{name}_one_image_1024_s": seconds})


def build_consistent(ctx: Context) -> Any:
    """PuLID-FLUX beside Z-Image. Full: FLUX.1-dev-sized random weights built on the meta device and
    initialised on the GPU, the published PuLID sizes, the demo bundle's tokenizers and scheduler.
    Small: the demo bundle as the worker loads it. Identity encoding (face detector, EVA) is not
    part of the timed generation and is left out: the id tokens are random, at their real shape."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from models.demo_pulid import ensure_demo_bundle
    from models.flux_pipeline import FluxPipeline
    from models.pulid_modules import PuLIDModules
    from pipelines.pulid_flux import PuLIDFluxPipeline
    from scripts.bench_gpu import _cheap_init

    bundle = ensure_demo_bundle(ctx.work_dir / "demo-bundle")
    if ctx.size == "small":
        return PuLIDFluxPipeline.load(bundle, ctx.device, ctx.dtype)
    demo = FluxPipeline.from_pretrained(bundle / "flux")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)  # to_empty then allocates bf16, never a float32 copy of 17 B parameters
    try:
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**FLUX_DEV["transformer"])
            t5 = T5EncoderModel(T5Config(**FLUX_DEV["t5"]))
            clip = CLIPTextModel(CLIPTextConfig(**FLUX_DEV["clip"]))
            vae = AutoencoderKL(**FLUX_DEV["vae"])
            pulid = PuLIDModules.flux_dev()
    finally:
        torch.set_default_dtype(previous)
    for model in (transformer, t5, clip, vae, pulid):
        model.to_empty(device=ctx.device)
        _cheap_init(model)
        model.to(ctx.dtype)
    for model in (transformer, t5, clip, vae, pulid):  # computed buffers: to_empty left them uninitialised
        for name, buffer in model.named_buffers():
            if not name.endswith("position_ids"):
                raise RuntimeError(f"{type(model).__name__}.{name}: a buffer gpu_check does not know how to fill")
            buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))
    flux = FluxPipeline(scheduler=demo.scheduler, vae=vae, text_encoder=clip, tokenizer=demo.tokenizer,
                        text_encoder_2=t5, tokenizer_2=demo.tokenizer_2, transformer=transformer)
    flux.set_progress_bar_config(disable=True)
    return PuLIDFluxPipeline(flux, pulid.eval(), identity=None)


def dry_run_consistent(ctx: Context) -> None:
    """FLUX.1-dev-sized PuLID-FLUX built on the meta device: the configs construct, PuLID's 20
    cross-attention layers match the hooked blocks, and the sizes are the published ones."""
    device = ctx.device
    ctx.device = "meta"
    try:
        pipeline = build_consistent(ctx)
    finally:
        ctx.device = device
    flux = pipeline.flux
    for name, model in (("transformer", flux.transformer), ("t5", flux.text_encoder_2), ("clip", flux.text_encoder),
                        ("vae", flux.vae), ("pulid", pipeline.pulid)):
        ctx.results.row("dry_run_consistent", f"{name}_parameters_b",
                        round(sum(p.numel() for p in model.parameters()) / 1e9, 3))
    ctx.results.row("dry_run_consistent", "per_image_tflop_1024", consistent_flops(pipeline, 1024))


def consistent_flops(pipeline, side: int) -> dict[str, float]:
    """One 1024² consistent image's stages on the meta device, identity injection on: T5 (512 tokens)
    and CLIP once, one transformer call per step (guidance is distilled: no CFG), one VAE decode."""
    from torch.utils.flop_counter import FlopCounterMode

    flux, meta = pipeline.flux, torch.device("meta")
    config = flux.transformer.config
    image_tokens, text_tokens = (side // 16) ** 2, 512

    def counted(call: Callable[[], Any]) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            call()
        return counter.get_total_flops() / 1e12

    pulid = pipeline.pulid
    tokens = torch.empty(1, pulid.pulid_encoder.num_queries, pulid.pulid_ca[0].to_kv.in_features, device=meta)
    with pipeline.injection.run(1.0):
        pipeline.injection.tokens = tokens
        step = counted(lambda: flux.transformer(
            hidden_states=torch.empty(1, image_tokens, config.in_channels, device=meta),
            encoder_hidden_states=torch.empty(1, text_tokens, config.joint_attention_dim, device=meta),
            pooled_projections=torch.empty(1, config.pooled_projection_dim, device=meta),
            timestep=torch.ones(1, device=meta), guidance=torch.full((1,), 4.0, device=meta),
            img_ids=torch.zeros(image_tokens, 3, device=meta), txt_ids=torch.zeros(text_tokens, 3, device=meta),
            return_dict=False))
    text = counted(lambda: flux.text_encoder_2(torch.zeros(1, text_tokens, dtype=torch.long, device=meta)))
    text += counted(lambda: flux.text_encoder(torch.zeros(1, 77, dtype=torch.long, device=meta)))
    latent_channels = flux.vae.config.latent_channels
    decode = counted(lambda: flux.vae.decode(torch.empty(1, latent_channels, side // 8, side // 8, device=meta)))
    steps = SIZES["full"].consistent_steps
    image = text + steps * step + decode
    return {"transformer_call": round(step, 2), "text": round(text, 2), "decode": round(decode, 2),
            "steps": steps, "image": round(image, 1), "h100_bf16_floor_s": round(image / H100_BF16_TFLOPS, 3)}


def phase_consistent(ctx: Context) -> None:
    from pipelines.identity import IdentityEmbedding

    sizes = ctx.sizes
    started = time.perf_counter()
    ctx.consistent = build_consistent(ctx)
    sync(ctx)
    ctx.results.row("consistent", "build_s", round(time.perf_counter() - started, 2))
    ctx.results.row("consistent", "resident_gib", round(torch.cuda.memory_allocated() / 2**30, 2) if ctx.cuda else None)
    pulid = ctx.consistent.pulid
    shape = (1, pulid.pulid_encoder.num_queries, pulid.pulid_ca[0].to_kv.in_features)  # what IDFormer returns
    tokens = torch.randn(shape, device=ctx.device, dtype=ctx.dtype)
    identity = IdentityEmbedding(tokens=tokens, bbox=(0.0, 0.0, 1.0, 1.0))
    side, count = sizes.consistent_side, sizes.consistent_images
    prompts = [f"{PROMPT}, profile picture {i}" for i in range(count)]
    reset_peak(ctx)
    sync(ctx)
    started = time.perf_counter()
    images = ctx.consistent.render(prompts, list(range(count)), side, side, sizes.consistent_steps, 4.0, identity)
    sync(ctx)
    seconds = round(time.perf_counter() - started, 2)
    assert len(images) == count and images[0].shape == (side, side, 3)
    ctx.results.row("consistent", "eight_images", {"images": count, "side": side, "steps": sizes.consistent_steps,
                                                   "s": seconds, "peak_memory_gib": peak_gib(ctx)})
    ctx.results.summarise(consistent_eight_images_s=seconds, consistent_peak_memory_gib=peak_gib(ctx))


def phase_consistent_compiled(ctx: Context) -> None:
    """Consistent mode with the fast mode's start-up (regional compile of the FLUX blocks, identity
    hooks inside, warm-up at batch 1 and 2): the same 8 images again, against the 30 s goal."""
    from pipelines.identity import IdentityEmbedding
    from pipelines.startup import prepare_pulid

    sizes, pipeline = ctx.sizes, ctx.consistent
    side, count = sizes.consistent_side, sizes.consistent_images
    plan = AccelerationPlan(compile=True, compile_cache_dir=ctx.work_dir / "compile-cache-flux", warmup=True)
    started = time.perf_counter()
    prepare_pulid(pipeline, plan, max_batch=2, warmup_size=side)
    ctx.results.row("consistent_compiled", "warmup_s", round(time.perf_counter() - started, 2))
    ctx.results.row("consistent_compiled", "acceleration", dataclasses.asdict(pipeline.acceleration))
    pulid = pipeline.pulid
    shape = (1, pulid.pulid_encoder.num_queries, pulid.pulid_ca[0].to_kv.in_features)
    identity = IdentityEmbedding(tokens=torch.randn(shape, device=ctx.device, dtype=ctx.dtype), bbox=(0, 0, 1, 1))
    prompts = [f"{PROMPT}, profile picture {i}" for i in range(count)]
    reset_peak(ctx)
    sync(ctx)
    started = time.perf_counter()
    pipeline.render(prompts, list(range(count)), side, side, sizes.consistent_steps, 4.0, identity, 1.0, 4)
    sync(ctx)
    seconds = round(time.perf_counter() - started, 2)
    ctx.results.row("consistent_compiled", "eight_images", {"s": seconds, "peak_memory_gib": peak_gib(ctx),
                                                            "still_compiled": pipeline.acceleration.compiled})
    ctx.results.summarise(consistent_eight_images_compiled_s=seconds)


def random_lora(engine: ZImageEngine, seed: int, rank: int = 32):
    """A LoRA of a real character LoRA's shape (rank 32 on every hooked layer), random values."""
    from pipelines.lora import LoraAdapter

    generator = torch.Generator(engine.device).manual_seed(seed)
    factors = {name: (torch.randn(rank, layer.in_features, generator=generator, device=engine.device,
                                  dtype=engine.dtype) * 0.01,
                      torch.randn(layer.out_features, rank, generator=generator, device=engine.device,
                                  dtype=engine.dtype) * 0.01)
               for name, layer in engine.lora_layers.targets.items()}
    return LoraAdapter(f"{seed:064x}", "gpu-check", factors)


def phase_lora(ctx: Context) -> None:
    """Per-request LoRA on the engine as it stands: one LoRA vs none (batch 4), and 4 images with 4
    different LoRAs in one batch vs one batch per LoRA; graphs compiled by the switches."""
    engine, side, steps = ctx.engine, ctx.sizes.side, ctx.sizes.steps
    adapters = [random_lora(engine, seed) for seed in range(4)]
    spec = BatchSpec(side, side, steps, 0.0, "z-image-simple")

    def timed(per_image: list[tuple]) -> float:
        items = [ImageItem(f"{PROMPT} {i}", "", i, loras) for i, loras in enumerate(per_image)]
        sync(ctx)
        started = time.perf_counter()
        engine.generate(items, spec)
        sync(ctx)
        return round(time.perf_counter() - started, 3)

    graphs = unique_graphs()
    timed([((adapters[0], 1.0),)] * 4)  # the first LoRA shape: untimed
    rows = {"plain_batch4_s": timed([()] * 4), "one_lora_batch4_s": timed([((adapters[0], 1.0),)] * 4),
            "four_loras_one_batch_s": timed([((a, 1.0),) for a in adapters]),
            "four_loras_four_batches_s": round(sum(timed([((a, 1.0),)]) for a in adapters), 3),
            "graphs_added": unique_graphs() - graphs}
    ctx.results.row("lora", "rows", rows)


def phase_fp8(ctx: Context) -> None:
    """FP8 with the guard set aside (random weights would fail any PSNR guard): eager batch 1 (p50),
    then compiled if the budget allows (the runner passes `compile` in)."""
    transformer = ctx.engine.pipe.transformer
    for module in transformer.modules():  # back to eager blocks: FP8 swaps the Linear weights under them
        module._compiled_call_impl = None
    torch._dynamo.reset()
    names = fp8_target_names(transformer, ctx.engine.fp8_blocks, 4)
    ctx.results.row("fp8", "guard", "set aside: random weights, speed only (FP8_MIN_PSNR_DB not applied)")
    started = time.perf_counter()
    torchao_float8(transformer, set(names))
    ctx.engine.acceleration.fp8, ctx.engine.acceleration.fp8_layers = True, len(names)
    ctx.results.row("fp8", "layers_converted", len(names))
    ctx.results.row("fp8", "quantize_s", round(time.perf_counter() - started, 2))
    _timed(ctx, "fp8", 1, f"{PROMPT} warm", key="untimed_rows")
    singles = [_timed(ctx, "fp8", 1, f"{PROMPT} fp8 {i}")["s"] for i in range(ctx.sizes.repeats)]
    ctx.results.row("fp8", "eager_one_image_p50_s", statistics.median(singles))


def phase_fp8_compiled(ctx: Context) -> None:
    compile_blocks(ctx.engine.pipe.transformer, ctx.work_dir / "compile-cache-fp8", ctx.engine.acceleration)
    started = time.perf_counter()
    warm_up(ctx.engine, ctx.sizes.side, ctx.sizes.side, 1)
    ctx.results.row("fp8_compiled", "warmup_s", round(time.perf_counter() - started, 2))
    singles = [_timed(ctx, "fp8_compiled", 1, f"{PROMPT} fp8c {i}")["s"] for i in range(ctx.sizes.repeats)]
    p50 = statistics.median(singles)
    ctx.results.row("fp8_compiled", "one_image_p50_s", p50)
    ctx.results.row("fp8_compiled", "one_image_p50_mfu_vs_bf16_peak", mfu(ctx, 1, p50))


def phase_memory(ctx: Context) -> None:
    """Peak memory per batch size (from the timed rows, the counter reset before each) and the
    activation constant the batch limit divides free memory by, recalibrated from them."""
    phases = ctx.results.data["phases"]
    weights = phases.get("build", {}).get("weights_gib")
    per_batch: dict[str, dict[int, float]] = {}
    for name in ("eager", "compiled"):
        for row in phases.get(name, {}).get("rows", []):
            per_batch.setdefault(name, {})[row["batch"]] = max(per_batch.get(name, {}).get(row["batch"], 0.0),
                                                                row["peak_memory_gib"])
    ctx.results.row("memory", "peak_gib_per_batch", per_batch)
    peaks = [gib for rows in per_batch.values() for gib in rows.values()]
    ctx.results.summarise(peak_memory_gib=max(peaks))
    megapixels = ctx.sizes.side**2 / 2**20
    per_image = max((gib - weights) / batch / megapixels for rows in per_batch.values() for batch, gib in rows.items())
    ctx.results.row("memory", "activation_gib_per_megapixel_measured", round(per_image, 3))
    ctx.results.row("memory", "activation_gib_per_megapixel_today", ACTIVATION_BYTES_PER_MEGAPIXEL / 2**30)
    ctx.results.row("memory", "activation_gib_per_megapixel_suggested", round(per_image * 1.25, 2))


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[Context], None]
    estimate_s: dict[str, float]  # by --size; guesses for `full` until a GPU run replaces them
    needs: tuple[str, ...] = ()  # phases that must have succeeded
    cuda_only: str | None = None  # the reason it cannot run on the CPU


PHASES = (
    Phase("environment", phase_environment, {"full": 5, "small": 3}),
    Phase("flops", phase_flops, {"full": 20, "small": 3}),
    Phase("build", phase_build, {"full": 20, "small": 2}),
    Phase("correctness", phase_correctness, {"full": 15, "small": 2}, ("build",)),
    Phase("attention", phase_attention, {"full": 10, "small": 2}, ("correctness",)),
    Phase("eager", phase_eager, {"full": 45, "small": 4}, ("build",)),
    Phase("compiled", phase_compiled, {"full": 200, "small": 60}, ("build",),
          "regional compile is a CUDA switch ; CPU Inductor is tested in tests/pipelines"),
    # reads the eager and compiled rows only: right after them, so a late kill cannot lose peak_memory_gib
    Phase("memory", phase_memory, {"full": 1, "small": 1}, ("eager",), "peak memory counters are CUDA's"),
    Phase("serving", phase_serving, {"full": 50, "small": 8}, ("build",)),
    # warm at 1024² after `eager`: 2 variants x (untimed + timed) x (5 calls + VAE encode and decode)
    # ≈ 4 x 2 s, plus the VAE encoder's first 1024² call
    Phase("img2img", phase_img2img, {"full": 15, "small": 4}, ("eager",)),
    # 1024² (warm after `serving`; else +20 s): solo 1 image ≈ 2.5 s, solo 8 ≈ 20 s, both together
    # ≈ 22 s; 512²: warm-up 5 s, capacity 4 s, the mix (12 jobs, ≈ 33 images at capacity) ≈ 15 s
    Phase("scheduling", phase_scheduling, {"full": 70, "small": 20}, ("build",)),
    Phase("lora", phase_lora, {"full": 30, "small": 6}, ("build",)),
    Phase("consistent", phase_consistent, {"full": 70, "small": 8}),
    Phase("consistent_compiled", phase_consistent_compiled, {"full": 120, "small": 60}, ("consistent",),
          "regional compile is a CUDA switch; CPU Inductor is tested in tests/pipelines/test_startup.py"),
    Phase("fp8", phase_fp8, {"full": 30, "small": 2}, ("build",), "float8 matmuls need a CUDA GPU with SM >= 8.9"),
    Phase("fp8_compiled", phase_fp8_compiled, {"full": 150, "small": 60}, ("fp8",),
          "float8 matmuls need a CUDA GPU with SM >= 8.9"),
)


def run_phases(ctx: Context, phases: tuple[Phase, ...], budget_s: float, fail: str | None = None,
               only: set[str] | None = None) -> None:
    started = time.perf_counter()
    results = ctx.results
    for phase in phases:
        record = results.phase(phase.name)
        left = budget_s - (time.perf_counter() - started)
        estimate = phase.estimate_s[ctx.size]
        missing = [name for name in phase.needs if results.data["phases"].get(name, {}).get("status") != "ok"]
        reason = None
        if only is not None and phase.name not in only:
            reason = "not selected (--only)"
        elif phase.cuda_only and not ctx.cuda:
            reason = f"needs CUDA: {phase.cuda_only}"
        elif missing:
            reason = f"needs {', '.join(missing)}, which did not succeed"
        elif estimate > left:
            reason = f"budget: estimated {estimate:.0f} s, {left:.0f} s left of --budget-s {budget_s:.0f}"
        if reason:
            record.update(status="skipped", reason=reason)
            log.info("phase %s skipped: %s", phase.name, reason)
            results.save()
            continue
        log.info("phase %s: start (estimated %.0f s, %.0f s left)", phase.name, estimate, left)
        results.save()  # a kill (the command's timeout) leaves this phase visible as "running"
        begun = time.perf_counter()
        try:
            if fail == phase.name:
                raise RuntimeError(f"injected failure in {phase.name} (--inject-failure)")
            if fail == f"{phase.name}:exit":
                os._exit(3)  # a killed process: what was saved before must survive
            phase.run(ctx)
            record["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - one phase's failure is a finding; the next phase runs
            record.update(status="error", error=f"{type(err).__name__}: {err}"[:2000],
                          traceback=traceback.format_exc().strip().splitlines()[-12:])
            log.exception("phase %s failed", phase.name)
            if ctx.cuda:
                torch.cuda.empty_cache()
        record["seconds"] = round(time.perf_counter() - begun, 2)
        log.info("phase %s: %s in %.1f s", phase.name, record["status"], record["seconds"])
        results.save()
    results.data["wall_s"] = round(time.perf_counter() - started, 2)
    results.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full" if torch.cuda.is_available() else "small")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "gpu_check_out"))
    parser.add_argument("--budget-s", type=float, default=500.0, help="skip phases whose estimate no longer fits")
    parser.add_argument("--dry-run-full", action="store_true",
                        help="full-size configs on the meta device: shapes at 1024², batches 1, 3, 8, both "
                             "workflows, and FLOPs per image; no GPU, no memory")
    parser.add_argument("--only", type=lambda text: set(text.split(",")),
                        help="comma-separated phases to run (a rerun of what failed); the others are skipped")
    parser.add_argument("--inject-failure", help="tests only: PHASE raises, PHASE:exit kills the process")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.FileHandler(args.out / "gpu_check.log"), logging.StreamHandler()])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = "gpu_check_dry_run.json" if args.dry_run_full else "gpu_check.json"
    results = Results(args.out / name, {k: str(v) for k, v in vars(args).items()})
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = Context(args.size, SIZES[args.size], device, serving_dtype(device), results, Path(work))
        if args.dry_run_full:
            ctx.size = "full"
            phases = (PHASES[0], Phase("dry_run_consistent", dry_run_consistent, {"full": 30}),
                      Phase("dry_run_full", lambda c: dry_run_flops(c, "full", (1, 3, 8), WORKFLOWS, "dry_run_full"),
                            {"full": 60}))
        else:
            phases = PHASES
        run_phases(ctx, phases, args.budget_s, args.inject_failure, args.only)
    statuses = {name: phase["status"] for name, phase in results.data["phases"].items()}
    print(json.dumps({"json": str(results.path), "wall_s": results.data["wall_s"], "phases": statuses,
                      "summary": results.data["summary"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
