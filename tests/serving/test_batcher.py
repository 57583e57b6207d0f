"""The scheduler's policy: merging, fairness, failure isolation, cancellation.

The model call is a stand-in here (it records what it was asked to run): out-of-memory and
device failures cannot be produced on this machine. The real engine runs behind the batcher in
tests/test_handler.py and tests/pipelines/test_z_image.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from pipelines.engine import BatchResult, ImageItem, ModelIdentity, SamplingStopped
from pipelines.z_image import BatchSpec
from serving.batcher import Batcher, ImageOutcome

SPEC = BatchSpec(64, 64, 2, 0.0, "z-image-simple")
OTHER = BatchSpec(128, 64, 2, 0.0, "z-image-simple")


class Recorder:
    """Collects each job's outcomes and lets a test wait for them."""

    def __init__(self) -> None:
        self.outcomes: dict[str, list[ImageOutcome]] = {}
        self._cond = threading.Condition()

    def sink(self, job_id: str):
        def on_outcome(outcome: ImageOutcome) -> None:
            with self._cond:
                self.outcomes.setdefault(job_id, []).append(outcome)
                self._cond.notify_all()
        return on_outcome

    def wait(self, job_id: str, count: int, timeout: float = 10.0) -> list[ImageOutcome]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.outcomes.get(job_id, [])) >= count, timeout), job_id
            return sorted(self.outcomes[job_id], key=lambda o: o.index)


class StubEngine:
    """The Engine interface around a test's model call: images of equal specs share a batch."""

    name = "stub"
    device = torch.device("cpu")
    identity = ModelIdentity("stub", "none", demo=True)

    def __init__(self, run) -> None:
        self.run = run

    def batch_key(self, spec, item):
        return spec

    def activation_bytes(self, spec) -> float:
        return 0.0

    def generate(self, batch, spec, should_stop):
        return self.run(batch, spec, should_stop)

    def numerics(self) -> dict:
        return {}


def make_batcher(run, max_batch=4, wait_s=0.05, fatal=lambda err: False, on_fatal=lambda err: None) -> Batcher:
    batcher = Batcher(lambda engine, spec: max_batch, wait_s, lambda err: isinstance(err, torch.OutOfMemoryError),
                      fatal, on_fatal)
    batcher.engine = StubEngine(run)
    return batcher


def items(prefix: str, count: int) -> list[tuple[int, ImageItem]]:
    return [(i, ImageItem(f"{prefix}{i}", "", i)) for i in range(count)]


def fake_images(batch: list[ImageItem], spec) -> BatchResult:
    return BatchResult(np.zeros((len(batch), spec.height, spec.width, 3), np.uint8), {"denoising": 1.0})


def test_compatible_images_of_concurrent_jobs_share_a_call():
    calls: list[list[str]] = []
    gate = threading.Event()

    def run(batch, spec, stop):
        gate.wait(5)
        calls.append([item.prompt for item in batch])
        return fake_images(batch, spec)

    recorder, batcher = Recorder(), make_batcher(run, wait_s=0.2)
    batcher.submit("a", batcher.engine, SPEC, items("a", 2), recorder.sink("a"))
    batcher.submit("b", batcher.engine, SPEC, items("b", 2), recorder.sink("b"))
    gate.set()
    assert [o.batch_size for o in recorder.wait("a", 2)] == [4, 4]
    recorder.wait("b", 2)
    assert calls == [["a0", "b0", "a1", "b1"]]
    batcher.stop()


def test_a_small_job_waits_at_most_one_batch_behind_a_large_one():
    calls: list[list[str]] = []
    first_started = threading.Event()
    release = threading.Event()

    def run(batch, spec, stop):
        calls.append([item.prompt for item in batch])
        first_started.set()
        release.wait(5)
        return fake_images(batch, spec)

    recorder, batcher = Recorder(), make_batcher(run, max_batch=2, wait_s=0.0)
    batcher.submit("big", batcher.engine, SPEC, items("big", 8), recorder.sink("big"))
    assert first_started.wait(5)
    batcher.submit("small", batcher.engine, OTHER, items("small", 1), recorder.sink("small"))  # another size even
    release.set()
    recorder.wait("big", 8)
    recorder.wait("small", 1)
    assert calls[1] == ["small0"]  # right after the batch that was running when it came
    batcher.stop()


def test_out_of_memory_splits_the_batch_and_every_image_arrives():
    sizes: list[int] = []

    def run(batch, spec, stop):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return fake_images(batch, spec)

    recorder, batcher = Recorder(), make_batcher(run)
    batcher.submit("a", batcher.engine, SPEC, items("a", 4), recorder.sink("a"))
    outcomes = recorder.wait("a", 4)
    assert all(o.pixels is not None for o in outcomes) and sizes == [4, 2, 1, 1, 2, 1, 1]
    batcher.stop()


def test_one_bad_image_fails_alone_and_its_batch_mates_succeed():
    def run(batch, spec, stop):
        if any(item.prompt == "a2" for item in batch):
            raise ValueError("bad latent")
        return fake_images(batch, spec)

    recorder, batcher = Recorder(), make_batcher(run)
    batcher.submit("a", batcher.engine, SPEC, items("a", 4), recorder.sink("a"))
    outcomes = recorder.wait("a", 4)
    assert [o.error_code for o in outcomes] == [None, None, "generation_failed", None]
    assert "Traceback" not in outcomes[2].error_message
    batcher.stop()


def test_a_device_failure_asks_for_a_fresh_worker():
    fatal_seen: list[BaseException] = []

    def run(batch, spec, stop):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    recorder = Recorder()
    batcher = make_batcher(run, fatal=lambda err: "CUDA error" in str(err), on_fatal=fatal_seen.append)
    batcher.submit("a", batcher.engine, SPEC, items("a", 2), recorder.sink("a"))
    assert {o.error_code for o in recorder.wait("a", 2)} == {"device_failure"}
    assert len(fatal_seen) == 1
    batcher.stop()


def test_cancelling_the_only_job_stops_its_batch_at_the_next_step():
    steps_run: list[int] = []
    started = threading.Event()

    def run(batch, spec, stop):
        for step in range(100):
            if stop():
                raise SamplingStopped
            steps_run.append(step)
            started.set()
            time.sleep(0.01)
        return fake_images(batch, spec)

    recorder, batcher = Recorder(), make_batcher(run)
    ticket = batcher.submit("a", batcher.engine, SPEC, items("a", 4), recorder.sink("a"))
    assert started.wait(5)
    batcher.cancel(ticket)
    deadline = time.monotonic() + 5
    while len(steps_run) < 100 and time.monotonic() < deadline:
        before = len(steps_run)
        time.sleep(0.05)
        if len(steps_run) == before:
            break
    assert len(steps_run) < 100
    assert recorder.outcomes.get("a") is None  # nobody is sent images of a cancelled job
    batcher.stop()


def test_a_batch_shared_with_a_live_job_keeps_running_when_one_job_cancels():
    release = threading.Event()

    def run(batch, spec, stop):
        release.wait(5)
        assert not stop()
        return fake_images(batch, spec)

    recorder, batcher = Recorder(), make_batcher(run, wait_s=0.2)
    cancelled = batcher.submit("a", batcher.engine, SPEC, items("a", 1), recorder.sink("a"))
    batcher.submit("b", batcher.engine, SPEC, items("b", 1), recorder.sink("b"))
    time.sleep(0.3)
    batcher.cancel(cancelled)
    release.set()
    assert recorder.wait("b", 1)[0].pixels is not None
    assert recorder.outcomes.get("a") is None
    batcher.stop()


@pytest.mark.parametrize("max_batch", [1, 3])
def test_batches_never_exceed_the_limit(max_batch):
    sizes: list[int] = []

    def run(batch, spec, stop):
        sizes.append(len(batch))
        return fake_images(batch, spec)

    recorder, batcher = Recorder(), make_batcher(run, max_batch=max_batch)
    batcher.submit("a", batcher.engine, SPEC, items("a", 7), recorder.sink("a"))
    recorder.wait("a", 7)
    assert max(sizes) <= max_batch and sum(sizes) == 7
    batcher.stop()
