"""The CUDA speed switches, exercised on CPU: settings, backend fallback through diffusers' real
attention dispatch, FP8 layer choice and its quality guard, and that CPU stays plain."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from models.z_image_demo import build_pipeline, ensure_demo_model
from pipelines.acceleration import (
    AccelerationPlan, AccelerationReport, MaskRoutedAttnProcessor, apply_fp8_guarded, fp8_target_names, psnr_db,
    select_attention,
)
from pipelines.z_image import ZImageEngine
from serving.settings import REPO_ROOT, SettingsError, load_settings


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
            settings.warmup) == ("auto", None, False, "gpu", None)
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
    with caplog.at_level(logging.WARNING, logger="pipelines.acceleration"):
        plan = AccelerationPlan.from_settings(settings, "cpu")
    assert (plan.compile, plan.fp8, plan.warmup, plan.text_encoder_on_cpu) == (False, False, False, False)
    assert "COMPILE=1 ignored on cpu" in caplog.text and "FP8=1 refused on cpu" in caplog.text


def test_cuda_plan_defaults_on_with_off_switches():
    on = AccelerationPlan.from_settings(load_settings({}), "cuda")
    assert (on.compile, on.warmup, on.fp8, on.text_encoder_on_cpu) == (True, True, False, False)
    off = AccelerationPlan.from_settings(load_settings({"COMPILE": "0", "WARMUP": "0", "FP8": "1",
                                                        "TEXT_ENCODER_DEVICE": "cpu"}), "cuda")
    assert (off.compile, off.warmup, off.fp8, off.text_encoder_on_cpu) == (False, False, True, True)


def test_cpu_load_with_default_plan_touches_nothing(demo_dir):
    plan = AccelerationPlan.from_settings(load_settings({}), "cpu")
    engine = ZImageEngine.load(demo_dir, "cpu", acceleration=plan)
    report = engine.acceleration
    assert (report.attention, report.compiled, report.fp8) == ("default", False, False)
    assert all(block._compiled_call_impl is None for block in engine.pipe.transformer.layers)


# -- attention -----------------------------------------------------------------------------------
def test_masks_are_skipped_when_every_caption_pads_alike(transformer):
    """diffusers passes attn_mask=None for equal lengths: a kernel that refuses masks runs such a
    batch (the batcher's grouping relies on it), and refuses one with mixed lengths."""
    transformer.set_attention_backend("_native_flash")
    assert _forward(transformer, [20, 25]).isfinite().all()  # both pad to 32 tokens
    with pytest.raises(ValueError, match="attn_mask"):
        _forward(transformer, [20, 50])  # 32 vs 64 tokens: masked


def test_backend_refusing_masks_routes_masked_calls(transformer):
    reference = _forward(transformer, [20, 50])  # diffusers' default (native SDPA)
    report = AccelerationReport()
    select_attention(transformer, "sdpa", report)
    # cuDNN has no CPU kernel; torch's flash kernel runs here but refuses masks.
    assert (report.attention, report.attention_masked) == ("_native_flash", "native")
    assert any("_native_cudnn unavailable" in note for note in report.notes)
    assert isinstance(transformer.layers[0].attention.processor, MaskRoutedAttnProcessor)
    torch.testing.assert_close(_forward(transformer, [20, 50]), reference, rtol=1e-4, atol=1e-5)


def test_missing_kernel_falls_back_to_native(transformer):
    report = AccelerationReport()
    select_attention(transformer, "flash3", report)  # flash-attn 3 is not installed here
    assert (report.attention, report.attention_masked) == ("native", "native")
    assert "_flash_3 unavailable" in report.notes[0]
    assert _forward(transformer, [20, 50]).isfinite().all()


def test_reselection_replaces_a_previous_router(transformer):
    select_attention(transformer, "sdpa", AccelerationReport())
    select_attention(transformer, "native", report := AccelerationReport())
    assert report.attention == "native"
    assert not isinstance(transformer.layers[0].attention.processor, MaskRoutedAttnProcessor)


# -- FP8 -----------------------------------------------------------------------------------------
def test_fp8_targets_keep_sensitive_layers_in_full_precision():
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(dim=32, n_layers=4, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=32, axes_dims=[8, 4, 4], axes_lens=[256, 64, 64])
    names = fp8_target_names(model, keep_last_blocks=1)
    assert {name.split(".")[1] for name in names} == {"0", "1", "2"}  # block 3 (the last) stays bf16
    assert len(names) == 3 * 7  # q, k, v, out + three FFN matrices per block
    assert not any("adaLN" in name or "refiner" in name or "embedder" in name or "final" in name for name in names)
    assert fp8_target_names(model, keep_last_blocks=4) == []


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
    before = {name: transformer.get_submodule(name).weight for name in fp8_target_names(transformer, 1)}
    report = AccelerationReport()
    apply_fp8_guarded(engine, _guard_plan(30), report, quantize=_replace_weights(-3.0), size=64)
    assert report.fp8 is False and report.fp8_psnr_db < 30
    assert "FP8 refused: guard PSNR" in report.notes[0]
    assert all(transformer.get_submodule(name).weight is weight for name, weight in before.items())


def test_fp8_guard_accepts_a_faithful_quantization(demo_dir):
    engine = ZImageEngine.load(demo_dir, "cpu")
    report = AccelerationReport()
    apply_fp8_guarded(engine, _guard_plan(30), report, quantize=_replace_weights(1.0), size=64)
    assert report.fp8 is True and report.fp8_psnr_db == math.inf


def test_fp8_without_torchao_is_refused_not_raised(demo_dir):
    try:
        import torchao  # noqa: F401
        pytest.skip("torchao is installed here")
    except ImportError:
        pass
    engine = ZImageEngine.load(demo_dir, "cpu")
    report = AccelerationReport()
    apply_fp8_guarded(engine, _guard_plan(30), report, size=64)
    assert report.fp8 is False and "torchao" in report.notes[0]
