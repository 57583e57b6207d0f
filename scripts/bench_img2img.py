"""Image to image and inpainting vs text to image on the loaded engine (the demo model unless
--model-dir), in one run.

    .venv/bin/python -m scripts.bench_img2img --torch-threads 1  # 256x256, 8 steps, strength 0.5, 5 rounds
    .venv/bin/python -m scripts.bench_img2img --workflow z-image-danrisi --model-dir /models/z-image

One image per run (batch 1), each variant's model calls counted on the transformer, its wall
time the median over --repeats rounds (variants interleaved, after one unrecorded round) and its
denoising stage's median, then as ratios to text to image in this run. Image to image adds one VAE
encode and skips the steps above its strength. `shared` is a text-to-image row and an
image-to-image row started together and stepped in shared model calls (as the scheduler runs
concurrent jobs of one size: each row at its own sigma), against the two run one after the other.
Not a test: figures depend on the machine; the demo model's transformer is tiny, so the VAE encode
weighs far more there than at Z-Image's size.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

from models.z_image_demo import ensure_demo_model
from pipelines.engine import run_lockstep
from pipelines.img2img import InitImage, preprocess_image, preprocess_mask
from pipelines.z_image import WORKFLOWS, BatchSpec, ImageItem, ZImageEngine
from scripts.bench_lora import interleaved_medians

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a portrait photo of a woman in a red coat"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--workflow", choices=WORKFLOWS, default="z-image-simple")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=None, help="a diffusers Z-Image folder (default: demo)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--torch-threads", type=int,
                        help="torch's CPU threads (default: torch's own); 1 keeps ratios stable on a shared machine")
    return parser.parse_args(argv)


def model_calls(engine: ZImageEngine, run) -> int:
    calls = []
    hook = engine.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        hook.remove()
    return len(calls)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    demo_dir = Path(os.environ.get("DEMO_MODEL_DIR", ROOT / ".cache" / "demo-models"))
    engine = ZImageEngine.load(args.model_dir or ensure_demo_model(demo_dir), args.device)
    size = args.size
    photo = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    mask = np.zeros_like(photo)
    mask[:, size // 2:] = 255
    eta = 0.5 if args.workflow == "z-image-danrisi" else None
    plain = BatchSpec(size, size, args.steps, 0.0, args.workflow, eta)
    from_image = BatchSpec(size, size, args.steps, 0.0, args.workflow, eta, args.strength)
    init = InitImage(preprocess_image(photo, size, size))
    masked = InitImage(init.pixels, preprocess_mask(mask, size, size))
    jobs = {"text_to_image": ([ImageItem(PROMPT, "", 1)], plain),
            "image_to_image": ([ImageItem(PROMPT, "", 1, init=init)], from_image),
            "inpainting": ([ImageItem(PROMPT, "", 1, init=masked)], from_image)}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in jobs}

    def run(name: str):
        return lambda: stages[name].append(engine.generate(*jobs[name]).timings_ms)

    def shared() -> None:
        rows = engine.start(*jobs["text_to_image"]) + engine.start(*jobs["image_to_image"])
        run_lockstep(rows, engine.step, lambda: False)
        engine.finish(rows)

    def one_after_the_other() -> None:
        engine.generate(*jobs["text_to_image"])
        engine.generate(*jobs["image_to_image"])

    runs = {**{name: run(name) for name in jobs}, "shared": shared, "one_after_the_other": one_after_the_other}
    calls = {name: model_calls(engine, run) for name, run in runs.items()}
    seconds = interleaved_medians(runs, args.repeats)
    denoising = {name: statistics.median(t["denoising"] for t in timings) / 1000 for name, timings in stages.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"model: {engine.identity.id}  {args.workflow}  size {size}  steps {args.steps}  strength {args.strength}  "
          f"repeats {args.repeats} (median)")
    figures: dict[str, float] = {}
    for name in runs:
        figures[f"{name}_s"] = seconds[name]
        figures[f"{name}_calls"] = calls[name]
        denoised = ""
        if name in denoising:
            figures[f"{name}_denoising_s"] = denoising[name]
            denoised = f" (denoising {denoising[name] * 1000:.2f} ms)"
        print(f"  {name:<20} {calls[name]:3d} model calls  {seconds[name] * 1000:10.2f} ms{denoised}")
    for name in ("image_to_image", "inpainting"):
        figures[f"{name} / text_to_image calls"] = calls[name] / calls["text_to_image"]
        figures[f"{name} / text_to_image time"] = seconds[name] / seconds["text_to_image"]
        figures[f"{name} / text_to_image denoising"] = denoising[name] / denoising["text_to_image"]
        print(f"  {name} / text_to_image: calls {calls[name] / calls['text_to_image']:.2f}x, "
              f"time {seconds[name] / seconds['text_to_image']:.2f}x, "
              f"denoising {denoising[name] / denoising['text_to_image']:.2f}x")
    figures["shared / one_after_the_other time"] = seconds["shared"] / seconds["one_after_the_other"]
    print(f"  shared calls: {calls['shared']} instead of {calls['one_after_the_other']}, "
          f"time {figures['shared / one_after_the_other time']:.2f}x of one after the other")
    return figures


if __name__ == "__main__":
    main()
