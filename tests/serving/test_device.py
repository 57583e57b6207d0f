"""The batch limit and the device-error policy: pure rules, checked without a GPU."""

from __future__ import annotations

import types

import torch

from pipelines.z_image import BatchSpec
from serving.device import CPU_MAX_BATCH, batch_limit, is_fatal_device_error, is_oom
from serving.settings import load_settings

SPEC = BatchSpec(1024, 1024, 8, 0.0, "z-image-simple")


def _engine(device: str, per_image_gib: float):
    return types.SimpleNamespace(device=torch.device(device), activation_bytes=lambda spec: per_image_gib * 2**30)


def test_max_batch_setting_wins_then_cpu_default_then_free_gpu_memory():
    assert batch_limit(load_settings({"MAX_BATCH": "3"}), _engine("cuda", 4.5), SPEC, free_bytes=0) == 3
    assert batch_limit(load_settings({}), _engine("cpu", 4.5), SPEC) == CPU_MAX_BATCH
    settings = load_settings({})
    assert batch_limit(settings, _engine("cuda", 4.5), SPEC, free_bytes=int(40 * 2**30)) == 8  # 40 GiB / 4.5
    assert batch_limit(settings, _engine("cuda", 4.5), SPEC, free_bytes=2**30) == 1  # never 0
    assert batch_limit(settings, _engine("cuda", 0.5), SPEC, free_bytes=int(120 * 2**30)) == 16  # one job's worth


def test_only_errors_that_break_the_cuda_context_are_fatal():
    assert is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_fatal_device_error(RuntimeError("device-side assert triggered"))
    assert not is_fatal_device_error(RuntimeError("shapes cannot be multiplied"))
    assert not is_fatal_device_error(ValueError("CUDA error"))  # not a device failure
    oom = torch.OutOfMemoryError("CUDA out of memory. CUDA error")
    assert is_oom(oom) and not is_fatal_device_error(oom)  # out of memory splits the batch instead
