"""Planning: what keys a stored result and what may share a model call."""

from __future__ import annotations

import json

import torch

from pipelines.engine import ImageItem
from pipelines.img2img import InitImage
from pipelines.z_image import BatchSpec
from serving.init_image import InitInput
from serving.modes import ModeChoice
from serving.planning import JobPlan, spec_fields
from serving.schema import parse_job_input


def _plan(engine, spec: BatchSpec) -> JobPlan:
    request = parse_job_input({"prompt": "a fox", "workflow": spec.workflow})
    return JobPlan(request, 1, ModeChoice("fast", engine, spec), [ImageItem("a fox", "", 1)], delivery=None)


def test_danrisi_eta_keys_the_result_cache_but_not_the_model_call(handler_module):
    """eta is per row (its sampler's): rows of any eta, workflow or step count share calls."""
    engine = handler_module.WORKER.engine
    half, none = (_plan(engine, BatchSpec(64, 64, 8, 0.0, "z-image-danrisi", eta=eta)) for eta in (0.5, 0.0))
    item = half.items[0]
    assert half.cache_params(item)["eta"] == 0.5
    assert half.cache_params(item) != none.cache_params(item)
    simple = BatchSpec(64, 64, 4, 0.0, "z-image-simple")
    assert engine.batch_key(half.spec, item) == engine.batch_key(none.spec, item) == engine.batch_key(simple, item)
    assert engine.batch_key(half.spec, item) != engine.batch_key(BatchSpec(64, 80, 8, 0.0, "z-image-simple"), item)


def test_the_simple_workflows_cache_key_and_settings_have_no_eta(handler_module):
    simple = _plan(handler_module.WORKER.engine, BatchSpec(64, 64, 8, 0.0, "z-image-simple"))
    assert "eta" not in simple.cache_params(simple.items[0])
    assert "eta" not in spec_fields(simple.spec)


def test_the_cache_key_names_the_engine_numerics(handler_module):
    engine = handler_module.WORKER.engine
    plan = _plan(engine, BatchSpec(64, 64, 8, 0.0, "z-image-simple"))
    model = plan.cache_params(plan.items[0])["model"]
    assert model["id"] == engine.identity.id and model["dtype"] == str(engine.dtype) and "fp8_layers" in model


def test_init_image_and_mask_hashes_and_strength_key_the_result_cache(handler_module):
    engine = handler_module.WORKER.engine
    request = parse_job_input({"prompt": "a fox", "init_image": "aGk=", "workflow": "z-image-simple"})

    def plan(strength: float, image: str, mask: str | None) -> dict:
        init = InitInput(InitImage(torch.zeros(1, 3, 64, 64)), 64, 64, image, mask)
        spec = BatchSpec(64, 64, 8, 0.0, "z-image-simple", strength=strength)
        job = JobPlan(request, 1, ModeChoice("fast", engine, spec), [ImageItem("a fox", "", 1)], None, init=init)
        return job.cache_params(job.items[0])

    base = plan(0.6, "a" * 64, None)
    assert (base["init_image"], base["mask_image"], base["strength"]) == ("a" * 64, None, 0.6)
    assert len({json.dumps(p, sort_keys=True) for p in (
        base, plan(0.5, "a" * 64, None), plan(0.6, "b" * 64, None), plan(0.6, "a" * 64, "m" * 64))}) == 4
    text_only = _plan(engine, BatchSpec(64, 64, 8, 0.0, "z-image-simple"))
    assert not {"init_image", "mask_image", "strength"} & set(text_only.cache_params(text_only.items[0]))
