"""The worker's planning: what keys a stored result and what may share a batch."""

from __future__ import annotations

from pipelines.z_image import BatchSpec, ImageItem
from serving.schema import parse_job_input
from serving.worker import JobPlan


def _plan(spec: BatchSpec) -> JobPlan:
    request = parse_job_input({"prompt": "a fox", "workflow": spec.workflow})
    return JobPlan(request, spec, [ImageItem("a fox", "", 1)], delivery=None, mode_ran="fast")


def test_danrisi_eta_keys_the_result_cache_and_splits_batches(handler_module):
    half, none = (_plan(BatchSpec(64, 64, 8, 0.0, "z-image-danrisi", eta=eta)) for eta in (0.5, 0.0))
    item, model = half.items[0], {"id": "demo"}
    assert half.cache_params(item, model)["eta"] == 0.5
    assert half.cache_params(item, model) != none.cache_params(item, model)
    worker = handler_module.WORKER
    assert worker._batch_group(half) != worker._batch_group(none)
    same = _plan(BatchSpec(64, 64, 8, 0.0, "z-image-danrisi", eta=0.5))
    assert worker._batch_group(half) == worker._batch_group(same)


def test_the_simple_workflows_cache_key_has_no_eta():
    simple = _plan(BatchSpec(64, 64, 8, 0.0, "z-image-simple"))
    assert "eta" not in simple.cache_params(simple.items[0], {"id": "demo"})
