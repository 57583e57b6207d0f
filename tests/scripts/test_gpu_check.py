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
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--size", "small", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    return done, json.loads((out / "gpu_check.json").read_text())


def test_a_failing_phase_is_recorded_and_the_rest_still_run(tmp_path):
    done, data = _run(tmp_path, "--budget-s", "25", "--inject-failure", "correctness")
    assert done.returncode == 0, done.stderr[-2000:]
    phases = data["phases"]
    assert list(phases) == [phase.name for phase in gpu_check.PHASES]
    for name, phase in phases.items():
        assert phase["status"] in ("ok", "skipped", "error"), name
        if phase["status"] == "skipped":
            assert phase["reason"], name
    failed = phases["correctness"]
    assert failed["status"] == "error" and "injected failure" in failed["error"] and failed["traceback"]
    assert phases["attention"] == {"status": "skipped", "reason": "needs correctness, which did not succeed"}
    assert phases["environment"]["status"] == "ok" and phases["environment"]["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert all(phases[name]["reason"].startswith("needs CUDA") for name in ("compiled", "fp8", "memory"))
    # whatever did not fit the 25-second budget says so, with the numbers
    budget = [p["reason"] for p in phases.values() if p["status"] == "skipped" and p["reason"].startswith("budget")]
    assert all("left of --budget-s 25" in reason for reason in budget)
    assert set(gpu_check.SUMMARY_KEYS) <= data["summary"].keys()
    assert data["summary"]["torch"] == torch.__version__
    assert (tmp_path / "gpu_check.log").read_text().count("phase correctness failed") == 1


def test_results_are_saved_before_a_killed_process_dies(tmp_path):
    done, data = _run(tmp_path, "--inject-failure", "flops:exit")
    assert done.returncode == 3
    assert data["phases"]["environment"]["status"] == "ok"
    assert data["phases"]["flops"] == {"status": "running"}  # what the kill interrupted, visible as such
    assert data["summary"]["gpu"] and data["summary"]["torch"] == torch.__version__
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no staging file behind
