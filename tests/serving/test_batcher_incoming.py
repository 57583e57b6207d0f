"""The scheduler holds a batch for jobs the worker has taken but not started (`IncomingJobs`), and
no longer than its bound. Through the real SDK loop: tests/endpoint/test_real_loop.py."""

from __future__ import annotations

import threading

from serving.batcher import Batcher, IncomingJobs
from tests.serving.test_batcher import SPEC, Recorder, StubEngine, fake_images, items


def batcher_with(incoming: IncomingJobs, calls: list[list[str]], wait_s: float) -> Batcher:
    def run(batch, spec, stop):
        calls.append([item.prompt for item in batch])
        return fake_images(batch, spec)

    batcher = Batcher(lambda engine, spec: 4, wait_s, lambda err: False, lambda err: False, lambda err: None,
                      incoming=incoming)
    batcher.engine = StubEngine(run)
    return batcher


def test_a_job_on_its_way_joins_the_batch_that_waited_for_it():
    on_its_way = threading.Event()
    on_its_way.set()
    calls: list[list[str]] = []
    recorder = Recorder()
    batcher = batcher_with(IncomingJobs(pending=on_its_way.is_set, wait_s=30.0), calls, wait_s=0.2)
    batcher.submit("a", batcher.engine, SPEC, items("a", 1), recorder.sink("a"))
    threading.Timer(0.3, on_its_way.clear).start()  # past the 0.2 s window: only the hold keeps "a" waiting
    # "b" starts (no longer on its way), then plans and submits within the usual window
    threading.Timer(0.35, lambda: batcher.submit("b", batcher.engine, SPEC, items("b", 1), recorder.sink("b"))).start()
    recorder.wait("a", 1)
    recorder.wait("b", 1)
    assert calls == [["a0", "b0"]]
    batcher.stop()


def test_the_hold_is_bounded_when_the_job_never_comes():
    calls: list[list[str]] = []
    recorder = Recorder()
    batcher = batcher_with(IncomingJobs(pending=lambda: True, wait_s=0.1), calls, wait_s=0.01)
    batcher.submit("a", batcher.engine, SPEC, items("a", 1), recorder.sink("a"))
    assert [o.batch_size for o in recorder.wait("a", 1)] == [1]
    assert calls == [["a0"]]
    batcher.stop()
