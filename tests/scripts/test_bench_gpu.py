"""bench_gpu: its FLOP model against PyTorch's FLOP counter, and its small mode end to end."""

from __future__ import annotations

import json

import pytest
import torch

from scripts import bench_gpu


def _counted_flops(config: dict, side: int, text_tokens: int) -> float:
    """FLOPs PyTorch counts for one forward, on the meta device (no memory, no compute)."""
    from diffusers import ZImageTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**config)
        latents = [torch.randn(16, 1, side // 8, side // 8)]
        captions = [torch.randn(text_tokens, config["cap_feat_dim"])]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(latents, torch.tensor([0.5]), captions, return_dict=False)
    return counter.get_total_flops()


@pytest.mark.parametrize("size, side, tolerance", [("full", 1024, 1e-3), ("small", 128, 2e-2)])
def test_flop_model_matches_the_counter(size, side, tolerance):
    config = bench_gpu.CONFIGS[size]["transformer"]
    model = bench_gpu.transformer_flops(config, bench_gpu.image_tokens_for(side, side), 128)
    assert model["total"] == pytest.approx(_counted_flops(config, side, 128), rel=tolerance)
    if size == "full":  # the REFERENCE anchor: 47.8 T linear + 8.7 T attention per step
        assert (model["linear"] / 1e12, model["attention"] / 1e12) == (pytest.approx(47.8, abs=0.05),
                                                                        pytest.approx(8.7, abs=0.05))


def test_random_pipeline_recomputes_rope_buffers():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    pipe = bench_gpu.build_random_pipeline("small", "cpu", torch.float32)
    fresh = Qwen3RotaryEmbedding(pipe.text_encoder.config)
    torch.testing.assert_close(pipe.text_encoder.rotary_emb.inv_freq, fresh.inv_freq)
    assert pipe.text_encoder.embed_tokens.num_embeddings == 151936
    assert all(p.isfinite().all() for p in pipe.transformer.parameters())


def test_small_mode_runs_and_writes_the_json(tmp_path, capsys):
    result = bench_gpu.main(["--size", "small", "--out", str(tmp_path)])
    [path] = tmp_path.glob("*-small-fp8off.json")
    saved = json.loads(path.read_text())
    assert {"cold_load_s", "accelerate_s", "warmup_ms", "acceleration", "flops", "single_image", "images_3",
            "images_8", "throughput", "gpu", "peak_bf16_tflops"} <= saved.keys()
    assert saved["flops"]["text_tokens"] == 128
    stages = saved["single_image"]["p50_ms"]
    assert all(stages[s] > 0 for s in ("text_encoding", "denoising", "decoding"))
    assert (saved["images_3"]["batch"], saved["images_8"]["batch"]) == (3, 8)
    assert [(t["side"], t["batch"]) for t in saved["throughput"]] == [(64, 1), (64, 4), (128, 1), (128, 4)]
    assert saved["device"] == "cpu" and saved["single_image"]["denoise_mfu"] is None  # no peak claimed on CPU
    assert result["json_path"] == str(path) and "8 images (one batch)" in capsys.readouterr().out
