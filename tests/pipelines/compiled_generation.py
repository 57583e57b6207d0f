"""Run by tests/pipelines/test_acceleration.py in a fresh process (a restarted worker, as far as dynamo
and Inductor's in-memory caches know): the demo engine, eager images, then the CUDA path's
attention selection and regional compile on CPU, the same images compiled, and the cache saved.
Prints one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root

from torch._dynamo.utils import counters  # noqa: E402

from models.z_image_demo import ensure_demo_model  # noqa: E402
from pipelines.acceleration import AccelerationReport, compile_blocks, save_compile_cache, select_attention  # noqa: E402
from pipelines.z_image import BatchSpec, ImageItem, ZImageEngine  # noqa: E402
from serving.settings import REPO_ROOT  # noqa: E402

# (batch size, prompt): batch 1 compiles static, batch 3 once with a symbolic batch; the last case
# (another batch size and a caption of another 32-token bucket) must reuse those graphs.
CASES = [(1, "a cat"), (3, "a cat"), (2, "a lighthouse on a cliff above a stormy sea at night, " * 3)]


def images(engine: ZImageEngine, count: int, prompt: str) -> np.ndarray:
    items = [ImageItem(prompt, "", seed) for seed in range(count)]
    return engine.generate(items, BatchSpec(64, 64, 2, 0.0, "z-image-simple")).images


def main(cache_dir: Path) -> None:
    engine = ZImageEngine.load(ensure_demo_model(REPO_ROOT / ".cache" / "demo-models"), "cpu")
    eager = [images(engine, count, prompt) for count, prompt in CASES]
    report = AccelerationReport()
    select_attention(engine.pipe.transformer, "native", report)
    compile_blocks(engine.pipe.transformer, cache_dir, report)
    max_diff, graphs = [], []
    for (count, prompt), reference in zip(CASES, eager):
        compiled = images(engine, count, prompt)
        max_diff.append(int(np.abs(compiled.astype(int) - reference).max()))
        graphs.append(counters["stats"]["unique_graphs"])
    saved = save_compile_cache(cache_dir)
    transformer = engine.pipe.transformer
    blocks = [m for m in transformer.modules() if type(m).__name__ in transformer._repeated_blocks]
    print(json.dumps({
        "max_pixel_diff": max_diff, "unique_graphs": graphs, "notes": report.notes,
        "blocks": len(blocks), "compiled_blocks": sum(block._compiled_call_impl is not None for block in blocks),
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "saved": str(saved) if saved else None,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
