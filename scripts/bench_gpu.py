"""GPU benchmark of the Z-Image engine on the full-size architecture with random weights.

Why random weights: speed depends on shapes, not values, so no 20 GB download is needed. The
model is built on the meta device (no memory, instant), materialised on the target device with a
cheap init, saved once as safetensors to a temp dir, then loaded by the very `ZImageEngine.load`
the worker uses (cold-load time) and accelerated by the same `pipelines.acceleration` code.

    python -m scripts.bench_gpu --size full --fp8 off   # on an H100 (docs/PERFORMANCE.md)
    python -m scripts.bench_gpu                          # small config, CPU, < 60 s

Writes tmp/bench_gpu/<timestamp>.json and prints a table. Image quality is meaningless here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from models.z_image_demo import MODEL_INFO_FILE, build_tokenizer, z_image_scheduler, z_image_vae
from pipelines.startup import prepare_engine
from pipelines.z_image import ZImageEngine, serving_dtype
from serving.settings import load_settings
from serving.startup import acceleration_plan

ROOT = Path(__file__).resolve().parent.parent

# A prompt whose chat-templated byte-level tokens pad to 128, the caption length of the FLOP anchor.
PROMPT = "a portrait photo of a woman in a red wool coat on a rainy city street at dusk, 85mm, soft light"
STEPS = 8
VOCAB = 151936  # Qwen3's: the text encoder embedding has its real size whatever the tokenizer

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {  # Z-Image-Turbo (docs: /work/shared/REFERENCE.md)
        "transformer": dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                            axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
        "text": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
        "size": 1024, "sizes": [768, 1024], "batches": [1, 4, 8], "repeats": 5,
    },
    "small": {  # same classes, scaled down so CPU finishes in seconds
        "transformer": dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=64,
                            axes_dims=[8, 12, 12], axes_lens=[1024, 512, 512]),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, rope_theta=1_000_000),
        "vae": dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4),
        "size": 128, "sizes": [64, 128], "batches": [1, 4], "repeats": 3,
    },
}
# Dense bf16 tensor-core peaks from NVIDIA's spec sheets, TFLOP/s (FP8 is twice these).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def transformer_flops(config: dict[str, Any], image_tokens: int, text_tokens: int) -> dict[str, float]:
    """FLOPs of one transformer forward for one image (a multiply-add counts 2).

    Per token and block: attention projections q, k, v, out = 4·d² MACs; the SwiGLU FFN
    (h = 8d/3) = 3·d·h MACs. Attention scores and weighted sum = 2·S²·d MACs per block.
    Main blocks see S = image + text tokens; the noise refiner sees image tokens, the context
    refiner text tokens. Embedders and the final layer are per-token linears; the adaLN and
    timestep MLPs are per image and negligible.
    At 1024² (4096 image tokens), 128 text tokens and the full config: 47.8 T linear + 8.7 T
    attention ≈ 56.6 TFLOP per step."""
    d, layers, refiners = config["dim"], config["n_layers"], config["n_refiner_layers"]
    hidden = int(d / 3 * 8)
    patch = 2 * 2 * 16  # patch 2x2, 16 latent channels
    tokens = image_tokens + text_tokens
    per_token_block = 2 * (4 * d * d + 3 * d * hidden)
    linear = per_token_block * (layers * tokens + refiners * (image_tokens + text_tokens))
    linear += 2 * d * (patch * image_tokens + config["cap_feat_dim"] * text_tokens + patch * tokens)
    attention = 4 * d * (layers * tokens**2 + refiners * (image_tokens**2 + text_tokens**2))
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def image_tokens_for(width: int, height: int) -> int:
    """Latent patches (VAE /8, patch /2), padded to a multiple of 32 as the transformer does."""
    return -(-(width // 16) * (height // 16) // 32) * 32


def _cheap_init(module: torch.nn.Module) -> None:
    """Scaled normal weights (activations stay finite through 30 blocks), unit norms, zero biases."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def build_random_pipeline(size: str, device: str, dtype: torch.dtype):
    """The ZImagePipeline of `size` with random weights: meta construction, then `to_empty` on `device`."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = CONFIGS[size]
    text_config = Qwen3Config(vocab_size=VOCAB, **config["text"])
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**config["transformer"])
        text_encoder = Qwen3Model(text_config)
        vae = z_image_vae(**config["vae"])
    torch.manual_seed(0)
    for model in (transformer, text_encoder, vae):
        model.to_empty(device=device)
        _cheap_init(model)
        model.to(dtype)
    # RoPE frequencies are computed buffers, not weights: to_empty left them uninitialised.
    text_encoder.rotary_emb = Qwen3RotaryEmbedding(text_config).to(device)
    return ZImagePipeline(scheduler=z_image_scheduler(), vae=vae, text_encoder=text_encoder,
                          tokenizer=build_tokenizer(), transformer=transformer)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_batch(engine: ZImageEngine, count: int, side: int, device: str) -> dict[str, Any]:
    """Wall time of one batched call (what a job of `count` images costs) and its stages."""
    _sync(device)
    started = time.perf_counter()
    stages = _batch(engine, count, side, side).timings_ms
    _sync(device)
    seconds = time.perf_counter() - started
    return {"side": side, "batch": count, "ms": round(seconds * 1000, 1), "images_per_s": round(count / seconds, 3),
            "stages_ms": stages}


def _batch(engine: ZImageEngine, count: int, width: int, height: int, prompt: str = PROMPT):
    return engine.generate_fixed(prompt, count, width, height, STEPS)


def peak_tflops(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(0)
    return name, next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def run(size: str, fp8: bool, out_dir: Path) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = serving_dtype(device)
    config = CONFIGS[size]
    settings = load_settings().model_copy(update={"fp8": fp8})
    plan = acceleration_plan(settings, device)
    result: dict[str, Any] = {"size": size, "device": device, "dtype": str(dtype).removeprefix("torch."),
                              "torch": torch.__version__,
                              "plan": {k: str(v) for k, v in dataclasses.asdict(plan).items()}}
    gpu, peak = peak_tflops(device)
    result["gpu"], result["peak_bf16_tflops"] = gpu, peak

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as model_dir:
        started = time.perf_counter()
        build_random_pipeline(size, device, dtype).save_pretrained(model_dir)
        Path(model_dir, MODEL_INFO_FILE).write_text(
            json.dumps({"id": f"random-{size}", "revision": "bench", "demo": True})
        )
        result["build_and_save_s"] = round(time.perf_counter() - started, 2)
        if device == "cuda":
            torch.cuda.empty_cache()
        side = config["size"]
        # the worker's start-up, warm-up always on (files in page cache: just written)
        engine = prepare_engine(Path(model_dir), device, dataclasses.replace(plan, warmup=True),
                                prompt_cache_size=settings.prompt_cache_size,
                                max_batch=lambda _: max(config["batches"]), warmup_size=side)
        _sync(device)
    result["startup_ms"] = engine.startup_ms
    result["cold_load_s"] = round(engine.startup_ms["load"] / 1000, 2)
    result["accelerate_s"] = round(engine.startup_ms["acceleration"] / 1000, 2)
    result["warmup_ms"] = engine.acceleration.warmup_ms
    result["acceleration"] = dataclasses.asdict(engine.acceleration)

    text_tokens = engine.text_length_bucket(PROMPT)
    step_flops = transformer_flops(config["transformer"], image_tokens_for(side, side), text_tokens)
    result["flops"] = {"text_tokens": text_tokens, "per_step_tflop": round(step_flops["total"] / 1e12, 4),
                       "per_step_linear_tflop": round(step_flops["linear"] / 1e12, 4),
                       "per_step_attention_tflop": round(step_flops["attention"] / 1e12, 4)}

    # A new prompt each run, so text encoding is measured uncached (same 128-token bucket).
    singles = [_batch(engine, 1, side, side, f"{PROMPT} {i}").timings_ms for i in range(config["repeats"])]
    single = {stage: statistics.median(t[stage] for t in singles) for stage in singles[0]}
    single["total"] = statistics.median(sum(t.values()) for t in singles)
    denoise_tflops = step_flops["total"] * STEPS / (single["denoising"] / 1000) / 1e12
    result["single_image"] = {"width": side, "height": side, "steps": STEPS, "repeats": config["repeats"],
                              "p50_ms": single, "denoise_tflops": round(denoise_tflops, 3),
                              "denoise_mfu": round(denoise_tflops / peak, 4) if peak else None}
    result["images_3"] = _timed_batch(engine, 3, side, device)
    result["images_8"] = _timed_batch(engine, 8, side, device)
    throughput = []
    for width in config["sizes"]:
        for count in config["batches"]:
            _batch(engine, count, width, width)  # a new shape may compile once: not timed
            throughput.append(_timed_batch(engine, count, width, device))
    result["throughput"] = throughput
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{size}-fp8{'on' if fp8 else 'off'}.json"
    path.write_text(json.dumps(result, indent=2))
    result["json_path"] = str(path)
    return result


def print_table(result: dict[str, Any]) -> None:
    single = result["single_image"]
    rows = [
        ("device", f"{result['gpu']} ({result['device']}, {result['dtype']})"),
        ("attention", f"{result['acceleration']['attention']} / masked {result['acceleration']['attention_masked']}"),
        ("compiled / fp8", f"{result['acceleration']['compiled']} / {result['acceleration']['fp8']}"),
        ("cold load (page cache)", f"{result['cold_load_s']} s, accelerate {result['accelerate_s']} s"),
        (f"1 image {single['width']}² p50", f"{single['p50_ms']['total']:.1f} ms"),
        ("  text / denoise / decode", " / ".join(f"{single['p50_ms'][s]:.1f}" for s in
                                                ("text_encoding", "denoising", "decoding")) + " ms"),
        ("  denoise TFLOP/s (MFU)", f"{single['denoise_tflops']} ({single['denoise_mfu']})"),
        ("3 images (one batch)", f"{result['images_3']['ms']} ms"),
        ("8 images (one batch)", f"{result['images_8']['ms']} ms"),
    ] + [(f"throughput {t['side']}² b{t['batch']}", f"{t['images_per_s']} img/s") for t in result["throughput"]]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"json: {result['json_path']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(CONFIGS), default="full" if torch.cuda.is_available() else "small")
    parser.add_argument("--fp8", choices=("off", "on"), default="off")
    parser.add_argument("--out", type=Path, default=ROOT / "tmp" / "bench_gpu")
    args = parser.parse_args(argv)
    result = run(args.size, args.fp8 == "on", args.out)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
