"""Cold-start load time of the same model stored in fp32 and in bf16 (builder/to_bf16.py), on CPU.

    .venv/bin/python -m scripts.bench_load                     # the demo model, 5 loads of each
    .venv/bin/python -m scripts.bench_load --dim 1024 --layers 6 --repeats 3   # a wider random transformer

Builds the demo model (models/z_image_demo.py) into a temp folder, copies it and converts the copy
to bf16, then loads each folder alternately with the worker's loader (`ZImageEngine.load`, float32
on CPU: bf16 files are upcast) and, to see the weights alone, the transformer by itself, in float32
(the CPU path) and in bf16 (the dtype the CUDA path loads: a cast from fp32 files, none from bf16
files). With
--dim/--layers the demo's transformer is replaced by a wider random one of the same class, so that
the weight bytes, not the fixed costs, dominate. Files are in the page cache after the first load:
this measures read + cast, not a cold disk. Prints sizes, the median load of each and the ratio,
and how far the bf16 folder's images are from the fp32 folder's. Not a test: figures depend on
the machine.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(folder: Path, dim: int | None, layers: int) -> Path:
    """The demo model in `folder`, its transformer widened when `dim` is given."""
    import torch
    from diffusers import ZImageTransformer2DModel

    from models.z_image_demo import TEXT_HIDDEN, ensure_demo_model

    model = ensure_demo_model(folder)
    if dim is not None:
        torch.manual_seed(0)
        heads = dim // 128
        wide = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=dim, n_layers=layers,
            n_refiner_layers=1, n_heads=heads, n_kv_heads=heads, cap_feat_dim=TEXT_HIDDEN,
            axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512],
        )
        with torch.no_grad():
            wide.x_pad_token.normal_(std=0.02)
            wide.cap_pad_token.normal_(std=0.02)
        shutil.rmtree(model / "transformer")
        wide.save_pretrained(model / "transformer", max_shard_size="200MB")
    return model


def weight_bytes(component: Path) -> int:
    return sum(p.stat().st_size for p in component.glob("*.safetensors"))


def timed(load) -> float:
    started = time.perf_counter()
    load()
    return (time.perf_counter() - started) * 1000


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dim", type=int, help="a wider transformer (a multiple of 128)")
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import diffusers
    import numpy as np
    import torch
    import transformers
    from diffusers import ZImageTransformer2DModel

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    from builder.to_bf16 import convert
    from pipelines.z_image import BatchSpec, ImageItem, ZImageEngine

    with tempfile.TemporaryDirectory(prefix="bench-load-") as scratch:
        fp32 = build(Path(scratch) / "fp32", args.dim, args.layers)
        bf16 = Path(shutil.copytree(fp32, Path(scratch) / "bf16" / fp32.name))
        convert(bf16)
        folders = {"fp32": fp32, "bf16": bf16}
        for name, folder in folders.items():
            print(f"{name}: transformer {weight_bytes(folder / 'transformer'):,} bytes")

        kinds = {"pipeline": None, "transformer as float32": torch.float32, "transformer as bf16": torch.bfloat16}
        loads: dict[str, dict[str, list[float]]] = {n: {kind: [] for kind in kinds} for n in folders}
        for _name, folder in folders.items():  # one unrecorded pass: page cache, lazy imports
            ZImageEngine.load(folder, "cpu")
        for _ in range(args.repeats):
            for name, folder in folders.items():
                loads[name]["pipeline"].append(timed(lambda f=folder: ZImageEngine.load(f, "cpu")))
                for kind, dtype in list(kinds.items())[1:]:
                    loads[name][kind].append(timed(lambda f=folder, d=dtype: ZImageTransformer2DModel.from_pretrained(
                        f / "transformer", torch_dtype=d)))
        for what in kinds:
            medians = {n: statistics.median(loads[n][what]) for n in folders}
            print(f"{what} load, median of {args.repeats}: "
                  f"fp32 {medians['fp32']:.0f} ms, bf16 {medians['bf16']:.0f} ms, "
                  f"fp32/bf16 = {medians['fp32'] / medians['bf16']:.2f}")

        spec = BatchSpec(64, 64, 3, 0.0, "z-image-simple")
        items = [ImageItem("a lighthouse at dusk", "", 7)]
        images = {n: ZImageEngine.load(f, "cpu").generate(items, spec).images.astype(int) for n, f in folders.items()}
        difference = np.abs(images["fp32"] - images["bf16"])
        print(f"images (64x64, 3 steps): |fp32 - bf16| mean {difference.mean():.2f}, max {difference.max()} (of 255)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
