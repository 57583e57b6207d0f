"""Run by tests/pipelines/test_startup.py in a fresh process: the demo PuLID-FLUX pipeline's eager
images at batch 1 and 3, then consistent mode's start-up on CPU (`prepare_pulid`: regional compile of
the FLUX blocks with the identity hooks inside, warm-up), and the same images compiled. Batch 3 is new
to the warm-up: batch 2's symbolic graph must serve it.
Saves the images to <folder>/images.npz; prints one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

from models.demo_pulid import ensure_demo_bundle
from pipelines.acceleration import AccelerationPlan
from pipelines.engine import ImageItem
from pipelines.pulid_flux import PuLIDFluxPipeline, PuLIDSpec
from pipelines.startup import prepare_pulid
from serving.settings import REPO_ROOT

SIDE = 64
COUNTS = (1, 3)


def images(pipe: PuLIDFluxPipeline, count: int) -> np.ndarray:
    spec = PuLIDSpec(SIDE, SIDE, 3, 3.5, "test", 1.0, 1, pipe.blank_identity())
    return pipe.generate([ImageItem("a portrait", "", seed) for seed in range(count)], spec).images


def main(folder: Path) -> None:
    pipe = PuLIDFluxPipeline.load(ensure_demo_bundle(REPO_ROOT / ".cache" / "demo-models"), "cpu", torch.float32)
    eager = {count: images(pipe, count) for count in COUNTS}
    plan = AccelerationPlan(compile=True, compile_cache_dir=folder / "compile-cache", warmup=True)
    prepare_pulid(pipe, plan, max_batch=4, warmup_size=SIDE)
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    compiled = {count: images(pipe, count) for count in COUNTS}
    np.savez(folder / "images.npz", **{f"eager_{count}": eager[count] for count in COUNTS},
             **{f"compiled_{count}": compiled[count] for count in COUNTS})
    print(json.dumps({
        "compiled": pipe.acceleration.compiled, "warmup": list(pipe.acceleration.warmup_ms),
        "graphs_after_warmup": graphs_after_warmup, "graphs_after_jobs": counters["stats"]["unique_graphs"],
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
