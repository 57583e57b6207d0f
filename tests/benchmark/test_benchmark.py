"""The benchmark end to end against the local endpoint (fake worker), and its pieces that decide."""

from __future__ import annotations

import asyncio
import base64
import json
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from benchmark import cli
from benchmark.bench import Benchmark, parse_capabilities, skip_reason
from benchmark.client import EndpointClient
from benchmark.config import BenchmarkConfig, Permutation, load_config, permutations
from benchmark.report import summarize
from endpoint.background import BackgroundEndpoint
from tests.conftest import API_KEY
from tests.endpoint.fake_worker import CAPABILITIES

SMOKE = Path(__file__).resolve().parents[2] / "benchmarks" / "smoke.json"
RECORD_FIELDS = {"submit_ms", "delay_ms", "execution_ms", "first_image_ms", "all_images_ms", "image_arrival_ms",
                 "images", "failures", "workflow", "mode", "steps", "width", "height", "num_images", "vertical"}


def test_smoke_config_end_to_end(endpoint: BackgroundEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    rc = cli.main(["--config", str(SMOKE), "--base-url", f"{endpoint.base_url}/local",
                   "--out-dir", str(tmp_path), "--plot", "--no-progress"])
    assert rc == 0
    [report_path] = tmp_path.glob("*.json")
    report = json.loads(report_path.read_text())
    assert report_path.with_suffix(".png").stat().st_size > 0
    config = load_config(SMOKE)
    danrisi = [p.key for p in permutations(config) if p.workflow == "z-image-danrisi"]
    assert [s["permutation"] for s in report["skipped"]] == danrisi
    assert all("fixture: not offered" in s["reason"] for s in report["skipped"])
    served = len(permutations(config)) - len(danrisi)
    assert len(report["runs"]) == served * config.repetitions
    for run in report["runs"]:
        assert RECORD_FIELDS <= set(run)
        assert run["ok"] and run["images"] == run["expected_images"] == len(run["image_arrival_ms"])
        assert run["first_image_ms"] <= run["all_images_ms"]
        assert run["submit_ms"] <= run["first_image_ms"]
    base = [r for r in report["runs"] if r["scenario"] == "wizard_base"]
    profile = [r for r in report["runs"] if r["scenario"] == "wizard_profile"]
    from_base = [r for r in report["runs"] if r["scenario"] == "wizard_profile_from_base"]
    assert {(r["jobs"], r["num_images"]) for r in base} == {(3, 1)}
    assert {(r["jobs"], r["num_images"]) for r in profile} == {(1, 8)}
    assert {(r["jobs"], r["num_images"], r["strength"]) for r in from_base} == {(1, 8, 0.6)}
    for run in from_base:  # 8 variations of the first base job's image, made after the 3 base jobs
        assert run["base"]["ok"] and run["base"]["jobs"] == 3
        [job] = run["jobs_detail"]
        first_base = run["base"]["jobs_detail"][0]["id"]
        assert job["summary"]["init_image"] == base64.b64encode(f"img-{first_base}-0".encode()).decode()
    assert len({job["id"] for r in base for job in r["jobs_detail"]}) == 3 * len(base)
    targets = {row["scenario"]: row for row in report["summary"] if row["target"]}
    assert all(targets[s]["meets_target"] for s in ("wizard_base", "wizard_profile", "wizard_profile_from_base"))
    assert "base64" not in json.dumps(report["runs"])  # image data never lands in the report


def _config(**overrides: Any) -> BenchmarkConfig:
    base: dict[str, Any] = {"name": "t", "verticals": {"v": ["p"]}, "matrix": {"num_images": [2]},
                            "repetitions": 1, "limits": {"poll_interval_s": 0.05}}
    return BenchmarkConfig.model_validate({**base, **overrides})


def _run(endpoint: BackgroundEndpoint, config: BenchmarkConfig) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        async with EndpointClient(f"{endpoint.base_url}/local", API_KEY) as client:
            bench = Benchmark(config, client, show_progress=False)
            await bench.run()
            return bench.records
    return asyncio.run(go())


def test_image_errors_are_failures_with_reasons(endpoint: BackgroundEndpoint) -> None:
    [record] = _run(endpoint, _config(defaults={"fault": "image_error"}))
    assert not record["ok"] and record["images"] == 1 and record["all_images_ms"] is None
    failures = [(f["kind"], f["index"], f["reason"]) for f in record["failures"]]
    assert failures == [("image_error", 0, "fixture: injected")]


def test_job_timeout_is_a_failure_and_the_job_is_cancelled(endpoint: BackgroundEndpoint) -> None:
    config = _config(defaults={"delay_s": 2.0}, limits={"poll_interval_s": 0.05, "job_timeout_s": 0.3})
    [record] = _run(endpoint, config)
    assert [f["kind"] for f in record["failures"]] == ["timeout"]
    assert record["jobs_detail"][0]["status"] == "CANCELLED"


def test_failed_job_reason_is_recorded(endpoint: BackgroundEndpoint) -> None:
    [record] = _run(endpoint, _config(matrix={"resolutions": [[100, 64]]}))
    assert record["failures"][0]["kind"] == "failed"
    assert record["failures"][0]["reason"] == "invalid_input: width: multiple of 16 in 16..2048"


def test_capabilities_decide_what_is_skipped() -> None:
    caps = parse_capabilities([CAPABILITIES])  # an async-generator handler returns a list
    perm = Permutation("matrix", "v", "z-image-simple", "fast", 8, 1024, 1024, 4, 1)
    assert skip_reason(perm, caps) is None
    consistent = Permutation(**{**perm.settings(), "mode": "consistent"})
    assert "unavailable: fixture: no PuLID" in skip_reason(consistent, caps)
    assert "not offered" in skip_reason(Permutation(**{**perm.settings(), "workflow": "other"}), caps)
    too_many = Permutation(**{**perm.settings(), "num_images": 17})
    assert skip_reason(too_many, caps) == "num_images 17 > endpoint limit 16"
    assert skip_reason(Permutation(**{**perm.settings(), "width": 4096}), caps) == "width 4096 > endpoint limit 2048"
    assert skip_reason(Permutation(**{**perm.settings(), "height": 8}), caps) == "height 8 < endpoint limit 16"
    assert skip_reason(Permutation(**{**perm.settings(), "steps": 51}), caps) == "steps 51 > endpoint limit 50"
    small = {**caps, "limits": {**caps["limits"], "max_pixels": 1024 * 512}}
    assert skip_reason(perm, small) == "width x height 1048576 > endpoint limit max_pixels 524288"
    assert skip_reason(perm, {**caps, "limits": {}}) is None  # no limits given: nothing skipped for them


def test_failed_runs_count_as_infinitely_slow_against_targets() -> None:
    def run(ok: bool, ms: float) -> dict[str, Any]:
        return {"permutation": "k", "scenario": "wizard_base", "ok": ok, "all_images_ms": ms if ok else None,
                "first_image_ms": ms}
    [row] = summarize([run(True, 1000), run(True, 2000), run(False, 0)])
    assert row["all_images_p50_s"] == 2.0 and math.isinf(row["all_images_p95_s"])
    assert row["failed_runs"] == 1 and row["meets_target"] is False
    [row] = summarize([run(True, 9000), run(True, 9500)])
    assert row["meets_target"] is True
    [row] = summarize([run(True, 9000), run(True, 10500), run(True, 11000)])
    assert row["all_images_p50_s"] == 10.5 and row["meets_target"] is False  # nearest rank: a real run


def test_config_is_bounded_and_strict() -> None:
    with pytest.raises(ValidationError, match="max_runs"):
        _config(matrix={"num_images": [1, 2, 3, 4]}, repetitions=100, limits={"max_runs": 50})
    with pytest.raises(ValidationError):
        _config(surprise=True)


def test_a_matrix_can_add_loras_to_a_permutation_and_mix_them_across_concurrent_jobs():
    from benchmark.config import BenchmarkConfig, job_inputs, permutations

    one, mixed = [{"path": "a.safetensors"}], [[{"path": "a.safetensors"}], [{"path": "b.safetensors", "scale": 0.5}]]
    config = BenchmarkConfig(name="lora", verticals={"v": ["p"]}, repetitions=1,
                             matrix={"loras": [[], one, mixed], "concurrency": [2]})
    plain, same, different = permutations(config)
    assert [job.get("loras") for job in job_inputs(config, plain, 0)] == [None, None]
    assert [job["loras"] for job in job_inputs(config, same, 0)] == [one, one]
    assert [job["loras"] for job in job_inputs(config, different, 0)] == mixed
    assert (same.key.endswith("/lora1"), different.key.endswith("/lora2mixed")) == (True, True)


def test_the_profile_set_from_the_base_image_varies_the_first_base_job():
    from benchmark.config import WIZARD_PROFILE_FROM_BASE, base_step, job_inputs

    config = BenchmarkConfig(name="w", verticals={"v": ["p0", "p1"]}, repetitions=1,
                             wizard={"profile_from_base": True, "strength": 0.5, "profile_images": 8})
    perm = next(p for p in permutations(config) if p.scenario == WIZARD_PROFILE_FROM_BASE)
    assert perm.key.endswith("/1x8img/strength0.5")
    base = job_inputs(config, base_step(config, perm), 2)
    [job] = job_inputs(config, perm, 2, init_image="https://cdn.example/base.jpg")
    assert (job["prompt"], job["num_images"], job["seed"]) == (base[0]["prompt"], 8, base[-1]["seed"] + 1)
    assert (job["init_image"], job["strength"]) == ("https://cdn.example/base.jpg", 0.5)
    with pytest.raises(ValueError, match="needs the base image"):
        job_inputs(config, perm, 2)
    assert "not offered" in skip_reason(perm, {**parse_capabilities([CAPABILITIES]), "image_to_image": None})


def test_a_base_job_without_its_image_fails_the_profile_run_by_name(endpoint: BackgroundEndpoint) -> None:
    config = _config(matrix=None, defaults={"fault": "image_error"},
                     wizard={"base_jobs": 2, "profile_images": 2, "profile_from_base": True})
    record = _run(endpoint, config)[-1]
    assert record["scenario"] == "wizard_profile_from_base" and not record["ok"] and not record["base"]["ok"]
    [failure] = record["failures"]
    assert failure["kind"] == "base_image" and "delivered no image 0" in failure["reason"]
