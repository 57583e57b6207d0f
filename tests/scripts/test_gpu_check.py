"""gpu_check at --size small, run as the GPU machine runs it (a subprocess): every phase accounted
for, the summary's keys there, and results saved as they come (an injected failure or a killed
process loses nothing measured before it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from scripts import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OUT": str(out)}
    done = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--size", "small", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    return done, json.loads((out / "gpu_check.json").read_text())


def test_a_failing_phase_is_recorded_and_the_rest_still_run(tmp_path):
    selected = "environment,flops,build,compiled"
    done, data = _run(tmp_path, "--only", selected, "--inject-failure", "flops", "--budget-s", "1000")
    assert done.returncode == 0, done.stderr[-2000:]
    phases = data["phases"]
    assert list(phases) == [phase.name for phase in gpu_check.PHASES]
    for name, phase in phases.items():
        assert phase["status"] in ("ok", "skipped", "error"), name
        if phase["status"] == "skipped":
            assert phase["reason"], name
        if name not in selected.split(","):
            assert phase == {"status": "skipped", "reason": "not selected (--only)"}
    failed = phases["flops"]
    assert failed["status"] == "error" and "injected failure" in failed["error"] and failed["traceback"]
    assert phases["environment"]["status"] == "ok" and phases["environment"]["torch"] == torch.__version__
    assert phases["build"]["status"] == "ok" and phases["build"]["parameters_b"] > 0  # ran after the failure
    if not torch.cuda.is_available():
        assert phases["compiled"]["reason"].startswith("needs CUDA")
    assert set(gpu_check.SUMMARY_KEYS) <= data["summary"].keys()
    assert data["summary"]["torch"] == torch.__version__
    assert (tmp_path / "gpu_check.log").read_text().count("phase flops failed") == 1


def test_budget_skips_what_would_not_fit_and_says_why(tmp_path):
    ran = []
    phases = (
        gpu_check.Phase("first", lambda ctx: ran.append("first"), {"small": 1}),
        gpu_check.Phase("large", lambda ctx: ran.append("large"), {"small": 1000}),
        gpu_check.Phase("after", lambda ctx: ran.append("after"), {"small": 1}, ("large",)),
        gpu_check.Phase("last", lambda ctx: ran.append("last"), {"small": 1}),
    )
    results = gpu_check.Results(tmp_path / "gpu_check.json", {})
    ctx = gpu_check.Context("small", gpu_check.SIZES["small"], "cpu", torch.float32, results, tmp_path)
    gpu_check.run_phases(ctx, phases, budget_s=60, fail=None)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["phases"]
    assert ran == ["first", "last"]
    assert saved["large"]["status"] == "skipped" and saved["large"]["reason"].startswith("budget: estimated 1000 s")
    assert saved["after"] == {"status": "skipped", "reason": "needs large, which did not succeed"}
    assert saved["last"]["status"] == "ok"


def test_results_are_saved_before_a_killed_process_dies(tmp_path):
    done, data = _run(tmp_path, "--inject-failure", "flops:exit")
    assert done.returncode == 3
    assert data["phases"]["environment"]["status"] == "ok"
    assert data["phases"]["flops"] == {"status": "running"}  # what the kill interrupted, visible as such
    assert data["summary"]["gpu"] and data["summary"]["torch"] == torch.__version__
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no staging file behind


def test_mfu_counts_the_workflows_transformer_calls(tmp_path):
    results = gpu_check.Results(tmp_path / "gpu_check.json", {})
    ctx = gpu_check.Context("full", gpu_check.SIZES["full"], "cuda", torch.bfloat16, results, tmp_path)
    ctx.flops = {"steps": 8, "text_tflop_per_image": 0.84, "decode_tflop_per_image": 10.47,
                 "transformer_call_tflop_per_image": 56.58}  # counted at 1024² (docs/PERFORMANCE.md)
    simple = (0.84 + 10.47 + 8 * 56.58) / 989
    assert gpu_check.mfu(ctx, 1, simple) == 1.0  # one image at the physical floor: the whole peak
    assert gpu_check.mfu(ctx, 8, 8 * simple * 2) == 0.5
    danrisi = (0.84 + 10.47 + 17 * 56.58) / 989  # 2·steps + 1 calls
    assert gpu_check.mfu(ctx, 1, danrisi, "z-image-danrisi") == 1.0
    ctx.device = "cpu"
    assert gpu_check.mfu(ctx, 1, simple) is None  # no peak is claimed for a CPU


def test_the_img2img_phase_records_each_variants_calls_and_time_beside_text_to_image(tmp_path, handler_module):
    results = gpu_check.Results(tmp_path / "gpu_check.json", {})
    ctx = gpu_check.Context("small", gpu_check.SIZES["small"], "cpu", torch.float32, results, tmp_path,
                            engine=handler_module.WORKER.engine)
    results.summarise(one_image_1024_p50_s=0.5)  # what the eager phase left
    gpu_check.phase_img2img(ctx)
    phase = json.loads((tmp_path / "gpu_check.json").read_text())["phases"]["img2img"]
    assert phase["text_to_image_p50_s"] == 0.5
    for name in ("image_to_image", "inpainting"):
        row = phase[name]
        assert (row["side"], row["steps"], row["strength"]) == (64, 4, 0.6)
        assert row["model_calls"] == 3  # 4 steps at strength 0.6 start at step int(4 - 2.4) = 1
        assert "vae_encoding" in row["stages_ms"] and row["vs_text_to_image"] == round(row["s"] / 0.5, 3)
