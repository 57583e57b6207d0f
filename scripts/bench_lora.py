"""Benchmark per-image LoRA on the loaded engine (the demo model unless --model-dir), in one run.

    .venv/bin/python -m scripts.bench_lora                       # 256x256, 4 steps, rank 16, 5 rounds
    .venv/bin/python -m scripts.bench_lora --size 512 --steps 8 --rank 32 --model-dir /models/z-image

Measured as the median over --repeats rounds (variants interleaved, after one unrecorded round),
each as a ratio in this run:

1. a batch of 4 images with one LoRA vs the same batch plain;
2. 4 images with 4 different LoRAs in ONE batch vs 4 batches of one image each with its LoRA;
3. first use of a LoRA file (read from LORA_DIR, sha256, parse, convert, validate, place) vs the
   same LoRA from the in-memory adapter cache.

The LoRAs are random, kohya format, on every linear layer the model allows. Not a test: figures
depend on the machine; the demo transformer is tiny (dim 32), so a LoRA's relative cost there is far
above its cost at Z-Image's dim 3840 (see docs/LORA.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save

from models.z_image_demo import ensure_demo_model
from pipelines.lora import LoraCache, MixedLoraLayers, load_lora
from pipelines.z_image import BatchSpec, ImageItem, ZImageEngine
from serving.lora_source import LoraSource, LoraSourceConfig

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "a portrait photo of a woman in a red coat"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=None, help="a diffusers Z-Image folder (default: demo)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def kohya_lora(layers: MixedLoraLayers, rank: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in layers.targets.items():
        out_features, in_features = layer.weight.shape
        base = "lora_unet_" + name.replace(".", "_")
        tensors[f"{base}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
        tensors[f"{base}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
        tensors[f"{base}.alpha"] = torch.tensor(float(rank))
    return save(tensors)


def interleaved_medians(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run, measured round-robin (one warm-up round unrecorded), so that a
    shared machine's load drift hits every variant alike and the ratios stay comparable."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if round_index:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    demo_dir = Path(os.environ.get("DEMO_MODEL_DIR", ROOT / ".cache" / "demo-models"))
    model_dir = args.model_dir or ensure_demo_model(demo_dir)
    engine = ZImageEngine.load(model_dir, args.device)
    layers = MixedLoraLayers.install(engine.pipe.transformer)
    spec = BatchSpec(args.size, args.size, args.steps, 0.0, "z-image-simple")
    items = [ImageItem(PROMPT, "", seed) for seed in range(4)]

    with tempfile.TemporaryDirectory() as folder:
        lora_dir = Path(folder)
        for index in range(5):
            (lora_dir / f"l{index}.safetensors").write_bytes(kohya_lora(layers, args.rank, seed=index))
        source = LoraSource(LoraSourceConfig(lora_dir, False, 2**30, 10.0, None, 0))
        adapters = [load_lora(source.resolve(f"l{i}.safetensors").read(), layers) for i in range(4)]

        def plain():
            engine.generate(items, spec)

        def one_lora():
            with layers.active([[(adapters[0], 1.0)]] * 4):
                engine.generate(items, spec)

        def mixed():
            with layers.active([[(adapter, 1.0)] for adapter in adapters]):
                engine.generate(items, spec)

        def grouped():
            for item, adapter in zip(items, adapters):
                with layers.active([[(adapter, 1.0)]]):
                    engine.generate([item], spec)

        def first_use():
            cache = LoraCache(8)
            file = LoraSource(source.config).resolve("l4.safetensors")  # a new source: hashes the file
            cache.get_or_load(file.sha256, lambda: load_lora(file.read(), layers, sha256=file.sha256))

        warm_cache = LoraCache(8)
        warm_file = source.resolve("l4.safetensors")
        warm_cache.get_or_load(warm_file.sha256, lambda: load_lora(warm_file.read(), layers))

        def cached_use():
            file = source.resolve("l4.safetensors")  # hash remembered by file identity
            warm_cache.get_or_load(file.sha256, lambda: load_lora(file.read(), layers))

        figures = interleaved_medians({
            "plain_batch4_s": plain, "one_lora_batch4_s": one_lora, "mixed_4_loras_batch4_s": mixed,
            "grouped_4x_batch1_s": grouped, "first_use_s": first_use, "cached_use_s": cached_use,
        }, args.repeats)
    lora_mb = adapters[0].parameters * torch.finfo(engine.dtype).bits / 8 / 2**20
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"model: {engine.identity.id}  size {args.size}  steps {args.steps}  rank {args.rank} "
          f"({len(adapters[0].factors)} layers, {lora_mb:.2f} MB in {engine.dtype})  repeats {args.repeats} (median)")
    for name, seconds in figures.items():
        print(f"  {name:<24} {seconds * 1000:10.2f} ms")
    ratios = {
        "one LoRA / plain (batch 4)": figures["one_lora_batch4_s"] / figures["plain_batch4_s"],
        "4 LoRAs mixed in 1 batch / 4 batches of 1": figures["mixed_4_loras_batch4_s"] / figures["grouped_4x_batch1_s"],
        "first use / cached": figures["first_use_s"] / figures["cached_use_s"],
    }
    for name, ratio in ratios.items():
        print(f"  {name:<44} {ratio:8.2f}x")
    layers.uninstall()
    return figures | ratios


if __name__ == "__main__":
    main()
