"""Planning: what keys a stored result and what may share a model call."""

from __future__ import annotations

from pipelines.engine import ImageItem
from pipelines.z_image import BatchSpec
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
