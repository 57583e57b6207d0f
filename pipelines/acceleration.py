"""CUDA speed switches for a diffusion transformer: attention (backend and a compile-friendly
processor), regional compile with a persistent cache and an eager fallback, guarded FP8.

Everything here works on a transformer module and on callables it is handed (the guard's
renderer), never on an engine, so any pipeline can use it and nothing here imports one. The
start-up that applies the switches in order is pipelines/startup.py. Everything that can fail on
a given GPU or software stack (a missing attention kernel, a kernel that refuses masks, FP8 that
hurts quality or is refused, a compiler that does not work) is tried once at start, with a log
line saying what was chosen and why, so the first job never discovers it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from collections.abc import Callable

import numpy as np
import torch

T = TypeVar("T")
log = logging.getLogger(__name__)

# (backend for unmasked calls, backend for masked calls), best first. FlashAttention kernels refuse
# masks in diffusers' dispatch; their varlen siblings (or native SDPA) take them.
BACKEND_CHAINS: dict[str, list[tuple[str, str]]] = {
    "flash3": [("_flash_3", "_flash_varlen_3")],
    "flash": [("flash", "flash_varlen")],
    "sdpa": [("_native_cudnn", "native"), ("_native_flash", "native")],
    "native": [("native", "native")],
}
AUTO_ORDER = ("flash3", "flash", "sdpa", "native")
# One graph per (block kind, shape) until automatic dynamic shapes kick in; the default limit (8)
# would silently drop blocks back to eager once a few text lengths and sizes have been seen.
RECOMPILE_LIMIT = 64
MEGA_CACHE_FILE = "mega-cache.bin"


@dataclass(frozen=True)
class AccelerationPlan:
    """The switches as they apply to one device (serving/startup.py resolves them from Settings).
    The defaults are the CPU's: everything off."""

    attention: str = "auto"
    compile: bool = False
    compile_cache_dir: Path | None = None
    fp8: bool = False
    fp8_keep_last_blocks: int = 4
    fp8_min_psnr_db: float = 30.0
    text_encoder: str = "gpu"  # gpu | cpu | auto (decided by the worker once every model is loaded)
    warmup: bool = False


@dataclass
class AccelerationReport:
    """What load actually applied (shown in capabilities and the benchmark JSON)."""

    attention: str = "default"
    attention_masked: str = "default"
    compiled: bool = False
    fp8: bool = False
    fp8_layers: int = 0  # linear layers running in float8
    fp8_psnr_db: float | None = None
    text_encoder_device: str = "same"
    warmup_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- attention ---------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `x` [B, S, H, D] by complex `freqs_cis` [B, S, D/2], in real arithmetic.

    Same float32 maths as diffusers' complex product (a + ib)(c + id), written so that Inductor
    fuses it with the QK norm and the casts into one kernel: complex multiplication is an eager
    fallback inside a compiled graph, costing three extra passes over q and k in every block."""
    cos_sin = torch.view_as_real(freqs_cis).unsqueeze(2)  # [B, S, 1, D/2, 2]; a view, no copy
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = ((real * cos - imag * sin).type_as(x), (real * sin + imag * cos).type_as(x))
    return torch.stack(rotated, dim=-1).flatten(3)  # cast before the stack: written once, in x's dtype


class ZImageAttnProcessor:
    """Z-Image attention as diffusers' ZSingleStreamAttnProcessor computes it, with two serving
    changes: RoPE in real arithmetic (`apply_rope`), and masked calls sent to `masked_backend`.
    Masks only appear when a batch mixes caption lengths, which no serving call does (the engine
    splits such CFG steps), so every serving call keeps the fast kernel."""

    _parallel_config = None

    def __init__(self, backend: str | None = None, masked_backend: str | None = None) -> None:
        from diffusers.models.attention_dispatch import AttentionBackendName

        # Enum members, not names: converting a name inside a compiled graph does not trace on
        # every torch version. `_attention_backend` is the attribute set_attention_backend writes.
        self._attention_backend = AttentionBackendName(backend) if backend else None
        masked_backend = masked_backend or backend
        self.masked_backend = AttentionBackendName(masked_backend) if masked_backend else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = apply_rope(query, freqs_cis), apply_rope(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:  # [B, S] → broadcast over heads, queries
            attention_mask = attention_mask[:, None, None, :]
        backend = self._attention_backend if attention_mask is None else self.masked_backend
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False, backend=backend, parallel_config=self._parallel_config)
        return attn.to_out[0](hidden_states.flatten(2, 3).to(query.dtype))


def install_processor(transformer: torch.nn.Module, processor: object) -> None:
    """One processor object for every attention layer (it holds no per-layer state)."""
    from diffusers.models.attention_processor import Attention

    for module in transformer.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)


@torch.no_grad()
def probe_attention(transformer: torch.nn.Module, masked: bool) -> None:
    """One tiny forward; with `masked`, two captions of different padded lengths force a mask."""
    config, weight = transformer.config, next(transformer.parameters())
    count = 2 if masked else 1
    latents = [torch.randn(config.in_channels, 1, 8, 8, device=weight.device, dtype=weight.dtype) for _ in range(count)]
    captions = [torch.randn(20 + 30 * i, config.cap_feat_dim, device=weight.device, dtype=weight.dtype)
                for i in range(count)]
    timestep = torch.full((count,), 0.5, device=weight.device)
    transformer(latents, timestep, captions, return_dict=False)


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:160]


def select_attention(transformer: torch.nn.Module, choice: str, report: AccelerationReport) -> None:
    """Install `ZImageAttnProcessor` with the first backend of `choice` that runs here, and a
    masked backend that accepts masks if that one refuses them."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    order = AUTO_ORDER if choice == "auto" else tuple(dict.fromkeys((choice, "native")))
    for unmasked, masked in [pair for name in order for pair in BACKEND_CHAINS[name]]:
        try:
            transformer.set_attention_backend(unmasked)  # diffusers checks the kernel's package is there
            install_processor(transformer, ZImageAttnProcessor(unmasked))
            probe_attention(transformer, masked=False)
        except (RuntimeError, ValueError, ImportError, AssertionError) as err:
            report.notes.append(f"attention {unmasked} unavailable: {_first_line(err)}")
            continue
        try:
            probe_attention(transformer, masked=True)
            masked = unmasked
        except (RuntimeError, ValueError) as err:
            report.notes.append(f"attention {unmasked} refuses masks ({_first_line(err)}): masked calls use {masked}")
            install_processor(transformer, ZImageAttnProcessor(unmasked, masked))
            probe_attention(transformer, masked=True)
        report.attention, report.attention_masked = unmasked, masked
        break
    else:  # nothing ran, not even native SDPA: put diffusers' own processor back and say so
        install_processor(transformer, ZSingleStreamAttnProcessor())
        transformer.reset_attention_backend()
    for note in report.notes:
        log.info("%s", note)
    log.info("attention backend: %s (masked batches: %s)", report.attention, report.attention_masked)


# -- FP8 -----------------------------------------------------------------------------------------
def fp8_target_names(transformer: torch.nn.Module, blocks: tuple[str, ...], keep_last_blocks: int) -> list[str]:
    """Linear layers of the main blocks (`blocks`: the transformer's block lists, in forward order),
    minus the sensitive ones: modulation (adaLN / norm linears) and the last `keep_last_blocks`
    blocks. Embedders, refiners and the final layer are never listed."""
    ordered = [f"{attr}.{i}" for attr in blocks for i in range(len(getattr(transformer, attr)))]
    quantized = set(ordered[: max(0, len(ordered) - keep_last_blocks)])
    names = []
    for name, module in transformer.named_modules():
        parts = name.split(".")
        if (isinstance(module, torch.nn.Linear) and ".".join(parts[:2]) in quantized
                and not any(part == "adaLN_modulation" or part.startswith("norm") for part in parts[2:])):
            names.append(name)
    return names


def torchao_float8(transformer: torch.nn.Module, names: set[str]) -> None:
    """Float8 dynamic activation + float8 weight, per-row scales (torchao; imported only when asked).
    set_inductor_config=False: torchao would otherwise change process-wide Inductor and matmul
    settings, which a refusal could not undo and which would lengthen every compile."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=lambda module, fqn: fqn in names)


def psnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR of uint8 images; identical images give infinity."""
    mse = float(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def apply_fp8_guarded(
    transformer: torch.nn.Module, blocks: tuple[str, ...], render_guard: Callable[[], np.ndarray],
    plan: AccelerationPlan, report: AccelerationReport,
    quantize: Callable[[torch.nn.Module, set[str]], None] = torchao_float8,
) -> None:
    """Quantize, render the fixed guard images again, and put the bf16 weights back if their PSNR
    against the bf16 render is too low. `render_guard` is the pipeline's own fixed-seed batch."""
    names = fp8_target_names(transformer, blocks, plan.fp8_keep_last_blocks)
    reference = render_guard()
    originals = {name: transformer.get_submodule(name).weight for name in names}
    try:  # float8 kernels fail at the first matmul on GPUs below SM 8.9: render inside the try
        quantize(transformer, set(names))
        score = psnr_db(reference, render_guard())
    except Exception as err:  # noqa: BLE001 - optional path: torchao refuses hardware with asserts; any failure → bf16
        report.notes.append(f"FP8 refused: {type(err).__name__}: {err}")
        log.warning("FP8 refused, serving bf16: %s: %s", type(err).__name__, err)
        _restore(transformer, originals)
        return
    report.fp8_psnr_db = round(score, 2)
    if score < plan.fp8_min_psnr_db:
        _restore(transformer, originals)
        report.notes.append(f"FP8 refused: guard PSNR {score:.1f} dB < FP8_MIN_PSNR_DB={plan.fp8_min_psnr_db:g}")
        log.warning("FP8 refused, serving bf16: guard PSNR %.1f dB < %g dB", score, plan.fp8_min_psnr_db)
        return
    report.fp8, report.fp8_layers = True, len(names)
    log.info("FP8 on for %d linear layers (last %d blocks bf16); guard PSNR %.1f dB",
             len(names), plan.fp8_keep_last_blocks, score)


def _restore(transformer: torch.nn.Module, originals: dict[str, torch.nn.Parameter]) -> None:
    for name, weight in originals.items():
        transformer.get_submodule(name).weight = weight


# -- compile -------------------------------------------------------------------------------------
def compile_blocks(transformer: torch.nn.Module, cache_dir: Path | None, report: AccelerationReport) -> None:
    """Regional compile of the repeated blocks, with the inductor cache (and a saved mega-cache)
    in `cache_dir` so a restarted worker reuses the kernels instead of compiling again.

    dynamic=None (automatic dynamic shapes): the first shape a block sees compiles fully static
    (batch 1 at the default size, the latency-critical case); the first change of a dimension
    (batch 2, another caption length or size) recompiles once with that dimension symbolic, which
    then serves every other value. dynamic=False would compile every batch size and caption
    length separately (minutes of warm-up); marking dims dynamic by hand is not possible from
    outside, because the batched tensors are built inside the transformer's forward."""
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a volume not mounted, a read-only path: compile without a cache
            report.notes.append(f"compile cache off: {cache_dir} is not usable ({err})")
            log.warning("compile cache off: %s is not usable (%s)", cache_dir, err)
            cache_dir = None
    if cache_dir is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
        mega = cache_dir / MEGA_CACHE_FILE
        if mega.is_file():  # torch returns None, with a warning, for bytes it cannot read
            loaded = torch.compiler.load_cache_artifacts(mega.read_bytes())
            report.notes.append(f"compile cache loaded from {mega}" if loaded else
                                f"compile cache {mega} unreadable (another torch version?): compiling afresh")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=None)
    report.compiled = True


def with_compile_fallback(run: Callable[[], T], transformer: torch.nn.Module, report: AccelerationReport) -> T:
    """`run()`; if the compiled blocks fail to compile (no working compiler, a kernel Inductor
    cannot build for this GPU, a tensor it cannot trace; at warm-up or for a shape first seen in a
    job), put them back to eager for the rest of the process and `run()` again: slower, but the
    worker keeps serving instead of failing its start or every job. `run` must be a replay (same
    noise), so the images equal what eager would have made."""
    try:
        return run()
    except torch._dynamo.exc.TorchDynamoException as err:  # Inductor's errors derive from it
        if not report.compiled:
            raise
        for module in transformer.modules():
            module._compiled_call_impl = None  # what nn.Module.compile() set: calls go to forward again
        torch._dynamo.reset()
        report.compiled = False
        report.notes.append(f"compile failed, serving eager: {_first_line(err)}")
        log.error("compile failed, serving eager from now on: %s", err)
    return run()


def save_compile_cache(cache_dir: Path | None) -> Path | None:
    """Write the mega-cache (inductor, autotune and dynamo artifacts) atomically after warm-up.
    A cache that cannot be written costs the next start a compile, not this one its start."""
    artifacts = torch.compiler.save_cache_artifacts() if cache_dir is not None else None
    if not artifacts:
        return None
    target = cache_dir / MEGA_CACHE_FILE
    staging = target.with_suffix(f".{os.getpid()}.tmp")
    try:
        staging.write_bytes(artifacts[0])
        os.replace(staging, target)
    except OSError as err:
        log.warning("compile cache not saved to %s: %s", target, err)
        return None
    log.info("compile cache saved to %s (%d bytes)", target, len(artifacts[0]))
    return target


# -- entry point -----------------------------------------------------------------------------------
def accelerate_transformer(
    transformer: torch.nn.Module, plan: AccelerationPlan, *, fp8_blocks: tuple[str, ...],
    render_guard: Callable[[], np.ndarray], select_attention_backend: bool,
) -> AccelerationReport:
    """Apply the plan's transformer switches in the order that works: attention (probed eagerly;
    Z-Image's processor, so only where `select_attention_backend`), FP8 of `fp8_blocks` (its guard
    needs the eager model), then compile."""
    report = AccelerationReport()
    if select_attention_backend:
        select_attention(transformer, plan.attention, report)
    if plan.fp8:
        apply_fp8_guarded(transformer, fp8_blocks, render_guard, plan, report)
    if plan.compile:
        compile_blocks(transformer, plan.compile_cache_dir, report)
    return report
