"""LoRA per request through the worker on the demo model: files from LORA_DIR, mixed-LoRA batches
across concurrent jobs, refusals naming `loras[i]`, cache reports, and nothing left applied."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import save

from serving.local_run import collect
from serving.settings import load_settings
from serving.startup import LoadedEngines
from serving.worker import Worker
from tests.conftest import assert_differs, assert_regenerates, pixels
from tests.pipelines.test_lora import factors, kohya_file, peft_file

JOB = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "workflow": "z-image-simple",
       "output_format": "png"}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, handler_module):
    folder = tmp_path_factory.mktemp("loras")
    layers = handler_module.WORKER.engine.lora_layers
    (folder / "alice.safetensors").write_bytes(kohya_file(factors(layers, seed=21)))
    (folder / "bob.safetensors").write_bytes(peft_file(factors(layers, seed=22, rank=6)))
    (folder / "copy-of-alice.safetensors").write_bytes((folder / "alice.safetensors").read_bytes())
    a, b = next(iter(factors(layers, seed=23).values()))
    wrong = {"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, a.shape[1] + 1),
             "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(b.shape[0], 4)}
    (folder / "wrong-shape.safetensors").write_bytes(save(wrong))
    return folder


@pytest.fixture(scope="module")
def worker(handler_module, lora_dir, tmp_path_factory) -> Worker:
    """The served engine behind a worker whose LORA_DIR holds the test files; a long batch wait so
    concurrent jobs meet in one batch, and rows always join (not as timings on this machine say)."""
    settings = load_settings({"LORA_DIR": str(lora_dir), "LORA_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
                              "MAX_BATCH": "4", "BATCH_WAIT_MS": "400", "BATCH_JOIN_COST": "1",
                              "PULID_ENABLED": "0"})
    return Worker(settings, LoadedEngines(handler_module.WORKER.engine, None, "off"))


def run(worker: Worker, job_input: dict, job_id: str = "j") -> dict:
    return asyncio.run(collect(worker.run_job, {"id": job_id, "input": job_input}))


def test_a_lora_changes_the_image_scale_zero_does_not_and_nothing_stays_applied(worker):
    plain = pixels(run(worker, {**JOB, "seed": 3})["images"][0])
    styled = run(worker, {**JOB, "seed": 3, "loras": [{"path": "alice.safetensors"}]})
    assert_differs(pixels(styled["images"][0]), plain)
    zero = run(worker, {**JOB, "seed": 3, "loras": [{"path": "alice.safetensors", "scale": 0}]})
    assert_regenerates(pixels(zero["images"][0]), plain)
    assert_regenerates(pixels(run(worker, {**JOB, "seed": 3})["images"][0]), plain)


def test_concurrent_jobs_with_different_loras_share_one_batch_and_equal_their_solo_runs(worker):
    jobs = [{**JOB, "seed": 5, "loras": [{"path": "alice.safetensors"}]},
            {**JOB, "seed": 5, "loras": [{"path": "bob.safetensors", "scale": -1.5}]},
            {**JOB, "seed": 5}]

    async def together():
        return await asyncio.gather(*(collect(worker.run_job, {"id": f"c{i}", "input": job})
                                      for i, job in enumerate(jobs)))

    mixed = asyncio.run(together())
    assert all(result["batch_sizes"] == [3] for result in mixed), [r["batch_sizes"] for r in mixed]
    for job, result in zip(jobs, mixed):
        assert_regenerates(pixels(result["images"][0]), pixels(run(worker, job)["images"][0]))
    assert_differs(pixels(mixed[0]["images"][0]), pixels(mixed[1]["images"][0]))


def test_the_summary_reports_each_lora_and_its_cache_hits(worker):
    first = run(worker, {**JOB, "loras": [{"path": "bob.safetensors", "scale": 0.5}]})
    again = run(worker, {**JOB, "loras": [{"path": "bob.safetensors", "scale": 0.5}]})
    (report,) = again["loras"]
    assert report["adapter_cache_hit"] is True and report["scale"] == 0.5 and len(report["sha256"]) == 64
    assert first["loras"][0]["sha256"] == report["sha256"] and report["format"] == "diffusers"
    # the same bytes under another name are the same adapter
    assert run(worker, {**JOB, "loras": [{"path": "copy-of-alice.safetensors"}]})["loras"][0]["sha256"] == \
        run(worker, {**JOB, "loras": [{"path": "alice.safetensors"}]})["loras"][0]["sha256"]


@pytest.mark.parametrize(("loras", "error"), [
    ([{"path": "missing.safetensors"}], "invalid_lora: loras[0]: no such file in LORA_DIR"),
    ([{"path": "alice.safetensors"}, {"path": "../alice.safetensors"}], "invalid_lora: loras[1]: "),
    ([{"path": "wrong-shape.safetensors"}], "invalid_lora: loras[0]: "),
    ([{"path": "/etc/passwd"}], "invalid_lora: loras[0]: must be a file name inside LORA_DIR"),
    ([{"path": "http://example.com/a.safetensors"}], "invalid_lora: loras[0]: URLs must use https"),
    ([{"path": "a.safetensors", "scale": 5}], "invalid_input: loras.0.scale: must be a finite number between -4 and 4"),
])
def test_a_lora_that_cannot_be_used_fails_the_job_naming_it(worker, loras, error):
    assert run(worker, {**JOB, "loras": loras})["error"].startswith(error)


def test_loras_are_refused_in_consistent_mode(worker):
    job = {**JOB, "mode": "consistent", "reference_image": "aGVsbG8=", "loras": [{"path": "alice.safetensors"}]}
    assert run(worker, job)["error"].startswith("invalid_input: loras: are only available in fast mode")


def test_capabilities_describe_lora_support(worker):
    loras = run(worker, {"action": "capabilities"})["loras"]
    assert loras["max_count"] == 4 and loras["lora_dir"] is True and loras["mixed_batches"] is True
    assert set(loras["formats"]) >= {"diffusers", "kohya", "ai-toolkit"}
