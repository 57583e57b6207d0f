"""Consistent mode's start-up on CPU: FP8 of the FLUX blocks behind the guard, regional compile of
the FLUX blocks with the identity hooks inside and warm-up (in a fresh process: compiled_consistent.py),
and the eager fallback (Z-Image's start-up is covered in test_acceleration.py)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from models.demo_pulid import ensure_demo_bundle
from pipelines.acceleration import AccelerationPlan, AccelerationReport, apply_fp8_guarded, fp8_target_names
from pipelines.engine import ImageItem
from pipelines.pulid_flux import PuLIDFluxPipeline, PuLIDSpec
from pipelines.startup import prepare_pulid, render_pulid_guard
from serving.settings import REPO_ROOT
from tests.conftest import assert_regenerates

SIDE = 64


@pytest.fixture(scope="module")
def bundle():
    return ensure_demo_bundle(REPO_ROOT / ".cache" / "demo-models")


@pytest.fixture
def pipe(bundle) -> PuLIDFluxPipeline:
    """A fresh pipeline per test: compiling or quantizing changes it for good."""
    return PuLIDFluxPipeline.load(bundle, "cpu", torch.float32)


def _spec(pipe: PuLIDFluxPipeline, steps: int = 3) -> PuLIDSpec:
    return PuLIDSpec(SIDE, SIDE, steps, 3.5, "test", 1.0, 1, pipe.blank_identity())


def _images(pipe: PuLIDFluxPipeline, count: int, prompt: str = "a portrait") -> np.ndarray:
    return pipe.generate([ImageItem(prompt, "", seed) for seed in range(count)], _spec(pipe)).images


@pytest.mark.slow
def test_compiled_flux_blocks_with_identity_hooks_match_eager_and_warm_up_leaves_nothing_to_compile(
        compiled_consistent):
    """tests/pipelines/compiled_consistent.py in a fresh process (started in the background at the end
    of collection: tests/pipelines/conftest.py)."""
    folder, run = compiled_consistent
    assert run["compiled"] and run["warmup"] == ["batch 1", "batch 2"]
    assert run["graphs_after_jobs"] == run["graphs_after_warmup"] > 0  # batch 3: batch 2's symbolic graph
    images = np.load(folder / "images.npz")
    for count in (1, 3):
        assert_regenerates(images[f"compiled_{count}"], images[f"eager_{count}"])


@pytest.mark.slow
def test_a_failing_flux_compile_turns_eager_and_the_batch_still_renders(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    eager = _images(pipe, 2)
    torch._dynamo.reset()
    prepare_pulid(pipe, AccelerationPlan(compile=True, compile_cache_dir=tmp_path))
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        first = _images(pipe, 2)
    assert pipe.acceleration.compiled is False
    assert [n for n in pipe.acceleration.notes if n.startswith("compile failed, serving eager")]
    assert_regenerates(first, eager)
    torch._dynamo.reset()


def test_flux_fp8_guard_refuses_a_harmful_quantization_and_restores_the_weights(pipe):
    transformer = pipe.flux.transformer
    names = fp8_target_names(transformer, pipe.fp8_blocks, 1)
    before = {name: transformer.get_submodule(name).weight for name in names}
    reference = render_pulid_guard(pipe, SIDE)

    def harmful(model, targets):
        for name in targets:
            module = model.get_submodule(name)
            module.weight = torch.nn.Parameter(module.weight.detach() * -3.0, requires_grad=False)

    report = AccelerationReport()
    plan = AccelerationPlan(fp8=True, fp8_keep_last_blocks=1, fp8_min_psnr_db=30)
    apply_fp8_guarded(transformer, pipe.fp8_blocks, partial(render_pulid_guard, pipe, SIDE), plan, report,
                      quantize=harmful)
    assert report.fp8 is False and report.fp8_psnr_db < 30 and len(names) > 0
    assert all(transformer.get_submodule(name).weight is weight for name, weight in before.items())
    assert_regenerates(render_pulid_guard(pipe, SIDE), reference)
