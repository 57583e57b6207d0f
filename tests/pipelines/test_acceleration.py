"""The CUDA speed switches, exercised on CPU: settings, backend fallback through diffusers' real
attention dispatch, FP8 layer choice and its quality guard, and that CPU stays plain."""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from models.z_image_demo import build_pipeline, ensure_demo_model
from pipelines.acceleration import (
    MEGA_CACHE_FILE, AccelerationPlan, AccelerationReport, ZImageAttnProcessor, apply_fp8_guarded, compile_blocks,
    fp8_target_names, install_processor, psnr_db, select_attention,
)
from pipelines.startup import place_text_encoder, prepare_engine, render_guard, warm_up
from pipelines.z_image import ZImageEngine
from serving.settings import REPO_ROOT, SettingsError, load_settings
from serving.startup import acceleration_plan
from tests.conftest import assert_regenerates


pytestmark = pytest.mark.usefixtures("restore_attention_backend")


@pytest.fixture
def transformer():
    return build_pipeline().transformer.eval()


@pytest.fixture(scope="module")
def demo_dir():
    return ensure_demo_model(REPO_ROOT / ".cache" / "demo-models")


def _forward(transformer, caption_lengths: list[int]) -> torch.Tensor:
    torch.manual_seed(3)
    latents = [torch.randn(16, 1, 8, 8) for _ in caption_lengths]
    captions = [torch.randn(n, transformer.config.cap_feat_dim) for n in caption_lengths]
    with torch.no_grad():
        out = transformer(latents, torch.full((len(caption_lengths),), 0.4), captions, return_dict=False)[0]
    return torch.stack(out)


# -- settings ------------------------------------------------------------------------------------
def test_defaults_leave_the_device_to_decide():
    settings = load_settings({})
    assert (settings.attention_backend, settings.compile, settings.fp8, settings.text_encoder_device,
            settings.warmup) == ("auto", None, False, "auto", None)
    assert (settings.fp8_keep_last_blocks, settings.fp8_min_psnr_db) == (4, 30)
    assert settings.compile_cache_dir == REPO_ROOT / ".cache" / "torch-compile"


def test_settings_parse_explicit_values():
    settings = load_settings({"ATTENTION_BACKEND": "FLASH3", "COMPILE": "0", "WARMUP": "auto", "FP8": "on",
                              "TEXT_ENCODER_DEVICE": "cpu", "COMPILE_CACHE_DIR": "/runpod-volume/cc"})
    assert (settings.attention_backend, settings.compile, settings.warmup, settings.fp8,
            settings.text_encoder_device) == ("flash3", False, None, True, "cpu")
    assert str(settings.compile_cache_dir) == "/runpod-volume/cc"


@pytest.mark.parametrize("name, value", [
    ("ATTENTION_BACKEND", "xformers"), ("COMPILE", "maybe"), ("WARMUP", "2"), ("FP8", "fp8"),
    ("FP8_KEEP_LAST_BLOCKS", "-1"), ("FP8_MIN_PSNR_DB", "high"), ("TEXT_ENCODER_DEVICE", "tpu"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        load_settings({name: value})


def test_cpu_plan_is_plain_and_says_why(caplog):
    settings = load_settings({"COMPILE": "1", "FP8": "1", "WARMUP": "1", "TEXT_ENCODER_DEVICE": "cpu"})
    with caplog.at_level(logging.WARNING, logger="serving.startup"):
        plan = acceleration_plan(settings, "cpu")
    assert (plan.compile, plan.fp8, plan.warmup, plan.text_encoder) == (False, False, False, "gpu")
    assert "COMPILE=1 ignored on cpu" in caplog.text and "FP8=1 refused on cpu" in caplog.text


def test_cuda_plan_defaults_on_with_off_switches():
    on = acceleration_plan(load_settings({}), "cuda")
    assert (on.compile, on.warmup, on.fp8, on.text_encoder) == (True, True, False, "auto")
    off = acceleration_plan(load_settings({"COMPILE": "0", "WARMUP": "0", "FP8": "1", "TEXT_ENCODER_DEVICE": "cpu"}),
                            "cuda")
    assert (off.compile, off.warmup, off.fp8, off.text_encoder) == (False, False, True, "cpu")


def test_cpu_load_with_default_plan_touches_nothing(demo_dir):
    engine = prepare_engine(demo_dir, "cpu", acceleration_plan(load_settings({}), "cpu"))
    report = engine.acceleration
    assert (report.attention, report.compiled, report.fp8) == ("default", False, False)
    assert all(block._compiled_call_impl is None for block in engine.pipe.transformer.layers)


@pytest.mark.parametrize("free_gib, placed", [(2.0, "cpu"), (40.0, "same")])
def test_auto_text_encoder_leaves_the_gpu_only_when_one_image_would_not_fit(demo_dir, free_gib, placed):
    """24 GB card: ≈2 GiB left after 20.9 GB of weights, under the 4.5 GiB a 1024² image needs."""
    engine = ZImageEngine.load(demo_dir, "cpu")
    report = engine.acceleration
    place_text_encoder(engine, "auto", free_bytes=int(free_gib * 2**30), warmup_size=1024)
    assert report.text_encoder_device == placed
    assert (report.notes == []) == (placed == "same")


# -- attention -----------------------------------------------------------------------------------
def test_masks_are_skipped_when_every_caption_pads_alike(transformer):
    """diffusers passes attn_mask=None for equal lengths: a kernel that refuses masks runs such a
    batch (the scheduler.s batch keys rely on it), and refuses one with mixed lengths."""
    transformer.set_attention_backend("_native_flash")
    assert _forward(transformer, [20, 25]).isfinite().all()  # both pad to 32 tokens
    with pytest.raises(ValueError, match="attn_mask"):
        _forward(transformer, [20, 50])  # 32 vs 64 tokens: masked


def test_serving_processor_computes_what_diffusers_computes(transformer):
    """Real-arithmetic RoPE and the mask routing compute the same float32 products (up to rounding)."""
    references = [_forward(transformer, lengths) for lengths in ([20, 25], [20, 50])]
    install_processor(transformer, ZImageAttnProcessor())
    for lengths, reference in zip(([20, 25], [20, 50]), references):
        torch.testing.assert_close(_forward(transformer, lengths), reference)


def test_backend_refusing_masks_routes_masked_calls(transformer):
    reference = _forward(transformer, [20, 50])  # diffusers' default (native SDPA)
    report = AccelerationReport()
    select_attention(transformer, "sdpa", report)
    # cuDNN has no CPU kernel; torch's flash kernel runs here but refuses masks.
    assert (report.attention, report.attention_masked) == ("_native_flash", "native")
    assert any("_native_cudnn unavailable" in note for note in report.notes)
    processor = transformer.layers[0].attention.processor
    assert (processor._attention_backend, processor.masked_backend) == ("_native_flash", "native")
    torch.testing.assert_close(_forward(transformer, [20, 50]), reference, rtol=1e-4, atol=1e-5)


def test_missing_kernel_falls_back_to_native(transformer):
    report = AccelerationReport()
    select_attention(transformer, "flash3", report)  # flash-attn 3 is not installed here
    assert (report.attention, report.attention_masked) == ("native", "native")
    assert "_flash_3 unavailable" in report.notes[0]
    assert _forward(transformer, [20, 50]).isfinite().all()


def test_reselection_replaces_the_previous_routing(transformer):
    select_attention(transformer, "sdpa", AccelerationReport())
    select_attention(transformer, "native", report := AccelerationReport())
    assert report.attention == "native"
    processor = transformer.layers[0].attention.processor
    assert (processor._attention_backend, processor.masked_backend) == ("native", "native")


# -- compile ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch, runs", [
    (1, ["batch 1", "batch 1, long prompt", "batch 1, LoRA rank 8", "batch 1, LoRA rank 16"]),
    # batch 2's symbolic graph serves 3..12
    (12, ["batch 1", "batch 2", "batch 1, long prompt", "batch 1, LoRA rank 8", "batch 2, LoRA rank 8",
          "batch 1, LoRA rank 16", "batch 2, LoRA rank 16"]),
])
def test_warm_up_runs_the_shapes_that_compile_and_no_more(demo_dir, max_batch, runs):
    engine = ZImageEngine.load(demo_dir, "cpu")
    assert list(warm_up(engine, 32, 32, max_batch, steps=1)) == runs


# The fresh-process runs behind these tests start in the background at the end of collection
# (tests/pipelines/conftest.py: CompileRuns).
@pytest.mark.slow
def test_after_warm_up_jobs_of_new_batch_sizes_captions_sizes_and_loras_compile_nothing(first_compile):
    _, run = first_compile
    assert run["compiled_blocks"] == run["blocks"] > 0
    assert run["graphs_after_warmup"] > 0
    assert run["graphs_after_each_job"] == [run["graphs_after_warmup"]] * len(run["graphs_after_each_job"])
    assert max(run["max_pixel_diff"]) <= 1  # compiled kernels may round the last float bit differently
    assert run["fxgraph_cache_miss"] > 0 and Path(run["saved"]).stat().st_size > 0
    assert run["saved_unwritable"] is None


@pytest.mark.slow
def test_the_saved_compile_cache_alone_spares_a_restarted_worker_the_compile(restarted_compile):
    cache_dir, restarted = restarted_compile  # the first run's mega-cache file alone, no inductor dir
    assert restarted["notes"] == [f"compile cache loaded from {cache_dir / MEGA_CACHE_FILE}"]
    assert restarted["fxgraph_cache_miss"] == 0 and restarted["fxgraph_cache_hit"] > 0
    assert max(restarted["max_pixel_diff"]) <= 1


@pytest.mark.slow
def test_a_failing_compile_turns_the_engine_eager_and_the_batch_still_renders(demo_dir, tmp_path, monkeypatch):
    """A real Inductor failure (no working C++ compiler; on a GPU, Triton or ptxas failing alike)
    during the first compiled batch: the batch renders eagerly, and so does every later one."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compile_blocks sets it; restored after
    engine = ZImageEngine.load(demo_dir, "cpu")
    eager = engine.generate_fixed("a cat", 2, 32, 32, 2).images
    compile_blocks(engine.pipe.transformer, tmp_path, engine.acceleration)
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        first = engine.generate_fixed("a cat", 2, 32, 32, 2).images
        later = engine.generate_fixed("a cat", 2, 32, 32, 2).images
    assert engine.acceleration.compiled is False
    assert [n for n in engine.acceleration.notes if n.startswith("compile failed, serving eager")]
    assert all(m._compiled_call_impl is None for m in engine.pipe.transformer.modules())
    for images in (first, later):
        for image, reference in zip(images, eager):
            assert_regenerates(image, reference)


def test_an_unusable_compile_cache_dir_compiles_without_a_cache(demo_dir, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    report = AccelerationReport()
    compile_blocks(ZImageEngine.load(demo_dir, "cpu").pipe.transformer, not_a_dir / "cache", report)
    assert report.compiled and report.notes[0].startswith(f"compile cache off: {not_a_dir / 'cache'} is not usable")


def test_an_unreadable_compile_cache_file_is_said_and_skipped(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compile_blocks sets it; restored after
    (tmp_path / MEGA_CACHE_FILE).write_bytes(b"written by another torch version")
    report = AccelerationReport()
    compile_blocks(ZImageEngine.load(demo_dir, "cpu").pipe.transformer, tmp_path, report)
    assert report.compiled and report.notes == [
        f"compile cache {tmp_path / MEGA_CACHE_FILE} unreadable (another torch version?): compiling afresh"]


# -- FP8 -----------------------------------------------------------------------------------------
def test_fp8_targets_keep_sensitive_layers_in_full_precision():
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(dim=32, n_layers=4, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=32, axes_dims=[8, 4, 4], axes_lens=[256, 64, 64])
    names = fp8_target_names(model, ("layers",), keep_last_blocks=1)
    assert {name.split(".")[1] for name in names} == {"0", "1", "2"}  # block 3 (the last) stays bf16
    assert len(names) == 3 * 7  # q, k, v, out + three FFN matrices per block
    assert not any("adaLN" in name or "refiner" in name or "embedder" in name or "final" in name for name in names)
    assert fp8_target_names(model, ("layers",), keep_last_blocks=4) == []


def test_flux_fp8_targets_span_both_block_kinds_and_skip_modulation():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                   axes_dims_rope=(2, 2, 4))
    names = fp8_target_names(model, ("transformer_blocks", "single_transformer_blocks"), keep_last_blocks=2)
    blocks = {".".join(name.split(".")[:2]) for name in names}
    # forward order: double 0, 1, then single 0, 1, 2; the last two (single 1, 2) stay bf16
    assert blocks == {"transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0"}
    assert not any(".norm" in name for name in names)
    assert "transformer_blocks.0.attn.to_q" in names and "single_transformer_blocks.0.proj_mlp" in names


def test_psnr():
    zeros = np.zeros((2, 8, 8, 3), np.uint8)
    assert psnr_db(zeros, zeros) == math.inf
    assert psnr_db(zeros, zeros + 1) == pytest.approx(20 * math.log10(255))


def _guard_plan(min_psnr: float) -> AccelerationPlan:
    return AccelerationPlan(fp8=True, fp8_keep_last_blocks=1, fp8_min_psnr_db=min_psnr)


def _replace_weights(scale: float):
    """Stands in for torchao: replaces each target's weight Parameter (as quantize_ does)."""
    def quantize(model, names):
        for name in names:
            module = model.get_submodule(name)
            module.weight = torch.nn.Parameter(module.weight.detach() * scale, requires_grad=False)
    return quantize


def test_fp8_guard_refuses_and_restores_when_quality_drops(demo_dir):
    engine = ZImageEngine.load(demo_dir, "cpu")
    transformer = engine.pipe.transformer
    before = {name: transformer.get_submodule(name).weight for name in fp8_target_names(transformer, ("layers",), 1)}
    report = AccelerationReport()
    apply_fp8_guarded(
        engine.pipe.transformer, ("layers",), partial(render_guard, engine, 64), _guard_plan(30), report,
        quantize=_replace_weights(-3.0),
    )
    assert report.fp8 is False and report.fp8_psnr_db < 30
    assert "FP8 refused: guard PSNR" in report.notes[0]
    assert all(transformer.get_submodule(name).weight is weight for name, weight in before.items())


def test_fp8_guard_accepts_a_faithful_quantization(demo_dir):
    engine = ZImageEngine.load(demo_dir, "cpu")
    report = AccelerationReport()
    apply_fp8_guarded(
        engine.pipe.transformer, ("layers",), partial(render_guard, engine, 64), _guard_plan(30), report,
        quantize=_replace_weights(1.0),
    )
    assert report.fp8 is True and report.fp8_psnr_db == math.inf


def test_a_quantizer_failing_half_way_leaves_the_original_weights(demo_dir):
    """Weights already replaced when the failure comes (a kernel refusing at the first matmul)
    are put back, so the bf16 engine serves exactly what it served before."""
    engine = ZImageEngine.load(demo_dir, "cpu")
    transformer = engine.pipe.transformer
    before = {name: transformer.get_submodule(name).weight for name in fp8_target_names(transformer, ("layers",), 1)}
    reference = render_guard(engine, 64)

    def replace_then_refuse(model, names):
        _replace_weights(0.5)(model, names)
        raise AssertionError("float8 needs SM >= 8.9")

    report = AccelerationReport()
    apply_fp8_guarded(
        engine.pipe.transformer, ("layers",), partial(render_guard, engine, 64), _guard_plan(30), report,
        quantize=replace_then_refuse,
    )
    assert report.fp8 is False and report.notes == ["FP8 refused: AssertionError: float8 needs SM >= 8.9"]
    assert all(transformer.get_submodule(name).weight is weight for name, weight in before.items())
    for image, expected in zip(render_guard(engine, 64), reference):
        assert_regenerates(image, expected)


def test_real_torchao_refusing_the_hardware_leaves_a_working_bf16_engine(demo_dir):
    """torchao reports unsupported hardware (here: no SM >= 8.9 GPU) with an AssertionError, not
    a RuntimeError: the guard must refuse FP8 and keep serving, not stop the worker. (torchao
    refuses before touching a weight; the restore is tested with a quantizer failing half-way.)
    Skipped where torchao is not installed: CPU installs leave it out (requirements-gpu.txt)."""
    pytest.importorskip("torchao")
    engine = ZImageEngine.load(demo_dir, "cpu")
    transformer = engine.pipe.transformer
    before = {name: transformer.get_submodule(name).weight for name in fp8_target_names(transformer, ("layers",), 1)}
    reference = render_guard(engine, 64)
    report = AccelerationReport()
    apply_fp8_guarded(  # the real torchao quantizer
        engine.pipe.transformer, ("layers",), partial(render_guard, engine, 64), _guard_plan(30), report
    )
    assert report.fp8 is False and report.notes[0].startswith("FP8 refused: ")
    assert all(transformer.get_submodule(name).weight is weight for name, weight in before.items())
    for image, expected in zip(render_guard(engine, 64), reference):
        assert_regenerates(image, expected)
