"""Run by tests/pipelines/test_acceleration.py in a fresh process (a restarted worker, as far as
dynamo and Inductor's in-memory caches know): the demo engine's eager images for a few jobs, then
what a CUDA worker does at start (`prepare_engine`: attention selection, regional compile, warm-up,
compile cache saved) on CPU, the same jobs compiled (LoRA jobs among them, and rows run as the
scheduler runs them: joining mid-way, each call over another number of rows at their own sigmas),
and a save to a path it cannot be written to.
Prints one JSON line."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import numpy as np


import torch
from torch._dynamo.utils import counters

from models.z_image_demo import ensure_demo_model
from pipelines.acceleration import MEGA_CACHE_FILE, AccelerationPlan, save_compile_cache
from pipelines.engine import ImageItem
from pipelines.lora import LoraAdapter
from pipelines.startup import prepare_engine
from pipelines.z_image import BatchSpec, ZImageEngine
from serving.settings import REPO_ROOT

WARMUP_SIDE, WARMUP_MAX_BATCH = 64, 4
# (batch size, prompt, width, height, LoRA): batch sizes, caption lengths, sizes and LoRAs (other
# ranks, so another stacked rank) the warm-up never ran.
JOBS = [
    (1, "a lighthouse on a cliff above a stormy sea at night, " * 3, 96, 64, None),
    (4, "a red fox in the snow", 128, 128, None),
    (2, "a cat", 80, 112, None),
    (3, "a lighthouse on a cliff above a stormy sea at night, " * 3, 64, 64, None),
    (1, "a cat", 128, 96, None),
    (2, "a red fox in the snow", 64, 64, ("a", 4)),
    (1, "a cat", 96, 64, ("b", 16)),
    (3, "a cat", 64, 64, ("a", 4)),
]


def adapter(engine: ZImageEngine, name: str, rank: int) -> LoraAdapter:
    """Random factors on every hooked layer: a LoRA that changes the image."""
    generator = torch.Generator().manual_seed(rank)
    factors = {layer_name: (torch.randn(rank, layer.in_features, generator=generator) * 0.1,
                            torch.randn(layer.out_features, rank, generator=generator) * 0.1)
               for layer_name, layer in engine.lora_layers.targets.items()}
    return LoraAdapter(name * 64, "test", factors)


def images(engine: ZImageEngine, *, count: int, prompt: str, width: int, height: int, lora) -> np.ndarray:
    loras = ((adapter(engine, *lora), 1.0),) if lora else ()
    return engine.generate_fixed(prompt, count, width, height, 2, loras).images


def staggered_rows(engine: ZImageEngine) -> np.ndarray:
    """Rows as the scheduler runs them: started at different times, every call over another subset
    (1, 3, 2, 3 rows, then what is left) at different sigmas, danrisi beside simple."""
    jobs = [(ImageItem("a cat", "", 1), BatchSpec(64, 64, 3, 0.0, "z-image-simple")),
            (ImageItem("a dog", "", 2), BatchSpec(64, 64, 2, 0.0, "z-image-danrisi", eta=0.5)),
            (ImageItem("a cow", "", 3), BatchSpec(64, 64, 4, 0.0, "z-image-simple"))]
    rows = engine.start([jobs[0][0]], jobs[0][1])
    engine.step(rows)
    rows += engine.start([jobs[1][0]], jobs[1][1]) + engine.start([jobs[2][0]], jobs[2][1])
    engine.step(rows)
    engine.step(rows[1:])
    while not all(row.done for row in rows):
        engine.step([row for row in rows if not row.done])
    return engine.finish(rows)


def main(cache_dir: Path) -> None:
    model_dir = ensure_demo_model(REPO_ROOT / ".cache" / "demo-models")
    runs = [partial(images, count=job[0], prompt=job[1], width=job[2], height=job[3], lora=job[4]) for job in JOBS]
    runs.append(staggered_rows)
    eager_engine = ZImageEngine.load(model_dir, "cpu")
    eager = [run(eager_engine) for run in runs]
    del eager_engine
    # What a CUDA worker does at start, on CPU: attention selection, regional compile, warm-up, cache saved.
    plan = AccelerationPlan(attention="native", compile=True, compile_cache_dir=cache_dir, warmup=True)
    engine = prepare_engine(model_dir, "cpu", plan, max_batch=lambda _: WARMUP_MAX_BATCH, warmup_size=WARMUP_SIDE)
    transformer, report = engine.pipe.transformer, engine.acceleration
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    max_diff, graphs = [], []
    for run, reference in zip(runs, eager):
        max_diff.append(int(np.abs(run(engine).astype(int) - reference).max()))
        graphs.append(counters["stats"]["unique_graphs"])
    unwritable = save_compile_cache(Path("/dev/null"))  # not a directory: logged, start goes on
    saved = cache_dir / MEGA_CACHE_FILE if (cache_dir / MEGA_CACHE_FILE).is_file() else None  # saved by the start-up
    blocks = [m for m in transformer.modules() if type(m).__name__ in transformer._repeated_blocks]
    print(json.dumps({
        "blocks": len(blocks), "compiled_blocks": sum(block._compiled_call_impl is not None for block in blocks),
        "graphs_after_warmup": graphs_after_warmup, "graphs_after_each_job": graphs, "max_pixel_diff": max_diff,
        "notes": report.notes, "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"], "saved": str(saved) if saved else None,
        "saved_unwritable": unwritable,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
