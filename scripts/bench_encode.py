"""Encode time and size per output format at 1024² on photo-like images (docs/STORAGE.md).

The images are scikit-image's sample photos (astronaut, coffee, chelsea, rocket), centre-cropped
to a square, upscaled to 1024² with Lanczos and given mild Gaussian noise (σ = 2 levels, seed 0)
so they carry a camera's grain: not the demo model's noise, which is a worst case for every codec.
Each row is the worker's own encoder (`serving.outputs.encode_image`) unless marked otherwise.
Time is reported as CPU time of the process (what one encode costs, steady on a shared machine)
and as wall time (what it took here, inflated when other processes hold the cores).

    python -m scripts.bench_encode [--repeats 5] [--size 1024]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from serving.outputs import encode_image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
CHUNK_LIMIT = 1_000_000  # MAX_CHUNK_BYTES' default: RunPod's 1 MB per streamed chunk


def photo(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    from skimage import data

    rgb = getattr(data, name)()
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(rgb[top:top + side, left:left + side]).resize((size, size), Image.LANCZOS)
    grain = rng.normal(0, 2, (size, size, 3))
    return np.clip(np.asarray(square, dtype=np.float64) + grain, 0, 255).astype(np.uint8)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.machine()
    return f"{name} ({os.cpu_count()} CPUs)"


def pil_webp(pixels: np.ndarray, quality: int, method: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="WEBP", quality=quality, method=method)
    return buffer.getvalue()


CODECS: dict[str, Callable[[np.ndarray], bytes]] = {
    "png level 1": lambda p: encode_image(p, "png", None),
    "webp q90 method 0 (default)": lambda p: encode_image(p, "webp", 90),
    "webp q90 method 4 (PIL's, not used)": lambda p: pil_webp(p, 90, 4),
    "jpeg q92": lambda p: encode_image(p, "jpeg", 92),
    "jpeg q90 (default)": lambda p: encode_image(p, "jpeg", 90),
}


def chunk_bytes(data: bytes) -> int:
    """One image chunk as the worker streams it: the base64 and its JSON."""
    entry = {"index": 0, "seed": 0, "width": 1024, "height": 1024, "format": "x",
             "base64": base64.b64encode(data).decode("ascii")}
    return len(json.dumps({"image": entry, "progress": {"completed": 1, "total": 1}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = {name: photo(name, args.size, rng) for name in PHOTOS}
    print(f"{args.size}x{args.size}, {', '.join(PHOTOS)}; median of {args.repeats} encodes per image; "
          f"{_cpu()}, Python {platform.python_version()}, "
          f"Pillow {Image.__version__}")
    print("| format | file MB (min–max) | stream chunk MB (max) | fits 1 MB chunk "
          "| CPU ms (median; min–max over images) | wall ms (median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, encode in CODECS.items():
        sizes, chunks, cpu, wall = [], [], [], []
        for pixels in images.values():
            cpu_runs, wall_runs = [], []
            for _ in range(args.repeats):
                cpu_started, wall_started = time.process_time(), time.perf_counter()
                data = encode(pixels)
                cpu_runs.append((time.process_time() - cpu_started) * 1000)
                wall_runs.append((time.perf_counter() - wall_started) * 1000)
            sizes.append(len(data) / 1e6)
            chunks.append(chunk_bytes(data))
            cpu.append(statistics.median(cpu_runs))
            wall.append(statistics.median(wall_runs))
        fits = "yes" if max(chunks) <= CHUNK_LIMIT else "no"
        print(f"| {label} | {min(sizes):.2f}–{max(sizes):.2f} | {max(chunks) / 1e6:.2f} | {fits} | "
              f"{statistics.median(cpu):.1f} ({min(cpu):.1f}–{max(cpu):.1f}) | {statistics.median(wall):.0f} |")


if __name__ == "__main__":
    main()
