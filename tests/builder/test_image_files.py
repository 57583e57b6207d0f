"""The Dockerfile and the RunPod Hub metadata agree with the code: pins, paths, settings, job schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from builder.manifest import load_manifest
from serving.schema import parse_job_input
from serving.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = [re.sub(r"\\\n\s*", " ", block).strip()  # one line per instruction, continuations joined
                for block in re.split(r"\n(?=[A-Z]+ )", re.sub(r"(?m)^\s*#.*\n", "", DOCKERFILE))]


def dockerfile_env() -> dict[str, str]:
    """The image's ENV, with build ARGs at their defaults."""
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", DOCKERFILE, re.M))
    env: dict[str, str] = {}
    for line in (i for i in INSTRUCTIONS if i.startswith("ENV ")):
        for key, value in re.findall(r"(\w+)=(\S+)", line):
            env[key] = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], value)
    return env


def position(fragment: str) -> int:
    return next(i for i, line in enumerate(INSTRUCTIONS) if fragment in line)


# torch==2.13.0 on PyPI is the Linux build for CUDA 13.0 (its wheel requires cuda-toolkit 13.0 and
# nvidia-cudnn-cu13); PyTorch publishes no CUDA 12.8 build of 2.12 or later.
TORCH_PIN, TORCH_CUDA = "torch==2.13.0", "13.0"


def test_the_image_installs_the_pinned_torch_for_the_cuda_its_base_and_hosts_have() -> None:
    lines = [line.split("#")[0].strip() for name in ("requirements.txt", "requirements-gpu.txt")
             for line in (ROOT / name).read_text().splitlines()]
    pins = [line for line in lines if line and line != "-r requirements.txt"]
    assert all("==" in line for line in pins), "every runtime requirement is pinned"
    assert TORCH_PIN in pins and "torchao==0.18.0" in pins  # torchao: FP8 on CUDA, the image only
    install = INSTRUCTIONS[position("pip install")]
    assert install == "RUN pip install -r requirements-gpu.txt"  # PyPI's build: no other index, no other torch
    assert not any("--index-url" in line or "torch==" in line for line in INSTRUCTIONS)
    assert re.fullmatch(rf"FROM nvidia/cuda:{re.escape(TORCH_CUDA)}\.\d+-base-ubuntu24\.04", INSTRUCTIONS[0])
    for name in ("hub.json", "tests.json"):
        assert json.loads((ROOT / ".runpod" / name).read_text())["config"]["allowedCudaVersions"] == [TORCH_CUDA]


def test_weights_are_fetched_before_the_worker_goes_offline() -> None:
    fetch = INSTRUCTIONS[position("builder/fetch_models.py")]
    assert "--target /models" in fetch and "--mount=type=secret,id=hf_token" in fetch
    assert position("builder/fetch_models.py") < position("HF_HUB_OFFLINE=1")
    assert position("COPY builder/") < position("builder/fetch_models.py") < position("COPY . .")


def test_the_image_env_points_at_the_fetched_folders_and_loads() -> None:
    env = dockerfile_env()
    manifest = load_manifest()
    assert env["MODEL_DIR"] == f"/models/{manifest.model('z-image-turbo').dir}"
    assert env["PULID_MODEL_DIR"] == f"/models/{manifest.model('pulid-flux').dir}"
    settings = load_settings(env)
    assert not settings.pulid_enabled  # WITH_PULID=0 by default: no bundle, so no attempt to load one
    assert env["RUNPOD_LOG_LEVEL"] == "INFO"


def test_the_start_command_runs_the_handler() -> None:
    assert INSTRUCTIONS[-1] == 'CMD ["python", "-u", "handler.py"]'


def hub_env(document: dict) -> dict[str, str]:
    return {item["key"]: str(item["input"]["default"]) for item in document["config"]["env"]}


def test_hub_json_lists_a_serverless_gpu_worker_with_settings_it_reads() -> None:
    hub = json.loads((ROOT / ".runpod/hub.json").read_text())
    assert {"title", "description", "type", "category", "iconUrl", "config"} <= hub.keys()
    assert hub["type"] == "serverless" and hub["config"]["runsOn"] == "GPU"
    read_by_worker = (ROOT / "serving/settings.py").read_text() + (ROOT / "serving/storage.py").read_text()
    for item in hub["config"]["env"]:
        assert f'"{item["key"]}"' in read_by_worker, item["key"]
        if "options" in item["input"]:
            assert item["input"]["default"] in [o["value"] for o in item["input"]["options"]]
    load_settings({**dockerfile_env(), **hub_env(hub)})


@pytest.mark.parametrize("test", json.loads((ROOT / ".runpod/tests.json").read_text())["tests"], ids=lambda t: t["name"])
def test_hub_smoke_tests_send_valid_jobs(test: dict) -> None:
    parse_job_input(test["input"])
    assert test["timeout"] >= 60_000  # milliseconds: a cold start loads ~21 GB of weights


def test_hub_smoke_test_env_loads() -> None:
    config = json.loads((ROOT / ".runpod/tests.json").read_text())["config"]
    env = {item["key"]: item["value"] for item in config["env"]}
    assert config["gpuCount"] == 1
    load_settings({**dockerfile_env(), **env})
