"""The GPU thread around the scheduler: preemption and joining as calls happen, nothing redone,
failure isolation (out of memory, a failing row, a broken device), cancellation at the next call,
decode chunks between calls, and what each job is told it used.

The engine is a stand-in for the GPU that records its calls (rows that count their model calls
down), and a call of n rows costs it `call_seconds(n)` on the loop's clock (real time plus that
cost), so the scheduler's timings are the stand-in's and never this machine's load. Out of memory
and device failures cannot be produced here. The real engines run behind the loop in
tests/test_handler.py, tests/test_consistent_mode.py and tests/serving/test_lora_jobs.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from pipelines.engine import ImageItem, ModelIdentity, Row, call_model
from pipelines.z_image import BatchSpec
from serving.engine_loop import NO_INCOMING, EngineLoop, IncomingJobs
from serving.job_ticket import ImageOutcome
from serving.scheduler import CallCosts, Policy, Scheduler

SPEC = BatchSpec(64, 64, 6, 0.0, "z-image-simple")
GROUP = ("stub", SPEC)


def counter(steps: int):
    """A row's sampler that only counts its model calls."""
    x = torch.zeros(1, 1, 1, 1)
    for _ in range(steps):
        x = x + (yield x, torch.tensor(1.0))
    return x


COMPUTE_BOUND = {1: 1.0, 4: 4.0}  # seconds per call by rows: a call costs its rows (1024² on a GPU)
CHEAP = {1: 1.0, 4: 1.3}  # batching nearly free (small images)


class StubEngine:
    """The Engine interface with recorded calls; `on_step(names)` may block or raise. Its clock
    is real time plus the simulated cost of the calls made so far."""

    name = "stub"
    device = torch.device("cpu")
    identity = ModelIdentity("stub", "none", demo=True)

    def __init__(self, on_step=lambda names: None, costs: dict[int, float] | None = None) -> None:
        self.on_step = on_step
        self.costs = costs or {1: 1.0, 4: 1.0}
        self.calls: list[list[str]] = []
        self.decodes: list[list[str]] = []
        self.events: list[str] = []  # "call" and "decode", in the order they ran
        self.simulated_s = 0.0

    def clock(self) -> float:
        return time.perf_counter() + self.simulated_s

    def call_seconds(self, rows: int) -> float:
        """The line through `costs` (two row counts)."""
        (n1, s1), (n2, s2) = sorted(self.costs.items())
        return s1 + (s2 - s1) * (rows - n1) / (n2 - n1)

    def batch_key(self, spec, item):
        return spec

    def activation_bytes(self, spec) -> float:
        return 2.0**30

    def model_calls(self, spec) -> int:
        return spec.steps

    def start(self, items, spec, clock=None):
        return [Row(counter(spec.steps), spec.steps, item, spec) for item in items]

    def step(self, rows) -> None:
        names = [row.item.prompt for row in rows]
        self.on_step(names)
        self.calls.append(names)
        self.events.append("call")
        self.simulated_s += self.call_seconds(len(rows))
        call_model(rows, lambda x, sigma: torch.ones_like(x))

    def finish(self, rows) -> np.ndarray:
        self.decodes.append([row.item.prompt for row in rows])
        self.events.append("decode")
        return np.stack([np.full((2, 2, 3), int(row.latents.sum()), np.uint8) for row in rows])


class Recorder:
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


def seeded(engine: StubEngine) -> CallCosts:
    """What the loop would have measured on this stand-in already (two row counts timed)."""
    costs = CallCosts()
    for rows, seconds in engine.costs.items():
        costs.record(GROUP, rows, float(rows), seconds)
    return costs


@pytest.fixture
def make_loop():
    loops: list[EngineLoop] = []

    def make(engine: StubEngine, costs: CallCosts | None = None, max_batch: int = 4, wait_s: float = 0.0,
             decode_megapixels: float = 0.25, fatal=lambda err: False, on_fatal=lambda err: None,
             incoming: IncomingJobs = NO_INCOMING) -> EngineLoop:
        loop = EngineLoop(Scheduler(Policy(work_weight=1.0, priority_offset_s=30, join_cost=0.5), costs),
                          lambda engine, spec: max_batch, wait_s, decode_megapixels,
                          lambda err: isinstance(err, torch.OutOfMemoryError), fatal, on_fatal, engine.clock,
                          incoming)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.stop()


def items(prefix: str, count: int) -> list[tuple[int, ImageItem]]:
    return [(i, ImageItem(f"{prefix}{i}", "", i)) for i in range(count)]


class Gate:
    """Holds the GPU thread inside call number `at` until released (a submit lands mid-run)."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, names) -> None:
        self.seen += 1
        if self.seen == self.at:
            self.reached.set()
            assert self.release.wait(10)


def test_a_small_job_preempts_a_compute_bound_group_which_resumes_where_it_stopped(make_loop):
    gate = Gate(at=2)
    engine = StubEngine(gate, COMPUTE_BOUND)
    loop, recorder = make_loop(engine, seeded(engine)), Recorder()
    loop.submit("big", engine, SPEC, items("big", 4), recorder.sink("big"))
    assert gate.reached.wait(10)
    loop.submit("small", engine, SPEC, items("small", 1), recorder.sink("small"))
    gate.release.set()
    assert recorder.wait("small", 1)[0].pixels is not None
    big = recorder.wait("big", 4)
    group = ["big0", "big1", "big2", "big3"]
    assert engine.calls == [group, group] + [["small0"]] * 6 + [group] * 4  # nothing redone: 6 calls each
    assert [int(o.pixels[0, 0, 0]) for o in big] == [6] * 4


def test_rows_join_a_running_group_where_batching_is_cheap(make_loop):
    gate = Gate(at=3)
    engine = StubEngine(gate, CHEAP)
    loop, recorder = make_loop(engine, seeded(engine), max_batch=4), Recorder()
    loop.submit("big", engine, SPEC, items("big", 3), recorder.sink("big"))
    assert gate.reached.wait(10)
    ticket = loop.submit("small", engine, SPEC, items("small", 1), recorder.sink("small"))
    gate.release.set()
    recorder.wait("small", 1)
    recorder.wait("big", 3)
    # the group had run 3 of its 6 calls: 9 row-calls left against the newcomer's 6 plus its later
    # arrival, so the group stays first, and the newcomer joins it (one more row is nearly free)
    assert engine.calls[3:9] == [["big0", "big1", "big2", "small0"]] * 3 + [["small0"]] * 3
    assert loop.usage(ticket).model_calls == 6 and loop.usage(ticket).batch_sizes == [4, 1]


def test_jobs_arriving_together_on_an_idle_gpu_start_together(make_loop):
    engine = StubEngine()
    loop, recorder = make_loop(engine, wait_s=0.5), Recorder()
    loop.submit("a", engine, SPEC, items("a", 1), recorder.sink("a"))
    loop.submit("b", engine, SPEC, items("b", 2), recorder.sink("b"))
    recorder.wait("a", 1)
    recorder.wait("b", 2)
    assert engine.calls == [["a0", "b0", "b1"]] * 6


def test_a_job_on_its_way_joins_the_first_call_that_waited_for_it(make_loop):
    """Jobs the worker has taken but not started (under the runpod SDK: handler.py) hold an idle
    GPU's first call past `wait_s`; once they start, the usual window lets them plan and submit.
    Through the real SDK loop: tests/endpoint/test_real_loop.py."""
    on_its_way = threading.Event()
    on_its_way.set()
    engine = StubEngine()
    incoming = IncomingJobs(pending=on_its_way.is_set, wait_s=30.0)
    loop, recorder = make_loop(engine, wait_s=0.2, incoming=incoming), Recorder()
    loop.submit("a", engine, SPEC, items("a", 1), recorder.sink("a"))
    threading.Timer(0.3, on_its_way.clear).start()  # past the 0.2 s window: only the hold keeps "a" waiting
    threading.Timer(0.35, lambda: loop.submit("b", engine, SPEC, items("b", 1), recorder.sink("b"))).start()
    recorder.wait("a", 1)
    recorder.wait("b", 1)
    assert engine.calls == [["a0", "b0"]] * SPEC.steps


def test_the_hold_for_jobs_on_their_way_is_bounded(make_loop):
    engine = StubEngine()
    loop, recorder = make_loop(engine, wait_s=0.01, incoming=IncomingJobs(pending=lambda: True, wait_s=0.1)), Recorder()
    ticket = loop.submit("a", engine, SPEC, items("a", 1), recorder.sink("a"))
    recorder.wait("a", 1)
    assert engine.calls == [["a0"]] * SPEC.steps and loop.usage(ticket).batch_sizes == [1]


def test_out_of_memory_splits_the_call_and_later_calls_stay_that_small(make_loop):
    def oom_over_two(names) -> None:
        if len(names) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")

    engine = StubEngine(oom_over_two)
    loop, recorder = make_loop(engine), Recorder()
    loop.submit("a", engine, SPEC, items("a", 4), recorder.sink("a"))
    outcomes = recorder.wait("a", 4)
    assert all(o.pixels is not None and int(o.pixels[0, 0, 0]) == 6 for o in outcomes)
    assert engine.calls[:2] == [["a0", "a1"], ["a2", "a3"]] and max(len(c) for c in engine.calls) == 2


def test_a_row_that_fails_fails_alone_and_its_call_mates_go_on(make_loop):
    def refuse_a2(names) -> None:
        if "a2" in names:
            raise ValueError("bad latent")

    engine = StubEngine(refuse_a2)
    loop, recorder = make_loop(engine), Recorder()
    loop.submit("a", engine, SPEC, items("a", 4), recorder.sink("a"))
    outcomes = recorder.wait("a", 4)
    assert [o.error_code for o in outcomes] == [None, None, "generation_failed", None]
    assert "Traceback" not in outcomes[2].error_message and outcomes[2].seed == 2
    assert engine.calls[:4] == [["a0"], ["a1"], ["a3"], ["a0", "a1", "a3"]]  # retried one by one, then on together


def test_a_device_failure_fails_its_rows_and_asks_for_a_fresh_worker(make_loop):
    fatal_seen: list[BaseException] = []

    def broken(names) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine = StubEngine(broken)
    loop = make_loop(engine, fatal=lambda err: "CUDA error" in str(err), on_fatal=fatal_seen.append)
    recorder = Recorder()
    loop.submit("a", engine, SPEC, items("a", 2), recorder.sink("a"))
    assert {o.error_code for o in recorder.wait("a", 2)} == {"device_failure"}
    assert len(fatal_seen) == 1 and loop.queued_images() == 0


def test_a_cancelled_job_leaves_at_the_next_call_and_its_call_mates_go_on(make_loop):
    gate = Gate(at=2)
    engine = StubEngine(gate)
    loop, recorder = make_loop(engine, wait_s=0.5), Recorder()
    cancelled = loop.submit("a", engine, SPEC, items("a", 2), recorder.sink("a"))
    loop.submit("b", engine, SPEC, items("b", 1), recorder.sink("b"))
    assert gate.reached.wait(10)
    loop.cancel(cancelled)
    gate.release.set()
    assert recorder.wait("b", 1)[0].pixels is not None
    # first by arrival (nothing timed yet), then b ranks first (less work left); a leaves after call 2
    assert engine.calls == [["a0", "a1", "b0"], ["b0", "a0", "a1"]] + [["b0"]] * 4
    assert recorder.outcomes.get("a") is None and loop.queued_images() == 0


def test_finished_rows_decode_between_calls_within_the_pixel_budget(make_loop):
    engine = StubEngine()
    two_rows = 2 * 64 * 64 / 2**20  # megapixels: two 64² images per decode
    loop, recorder = make_loop(engine, max_batch=4, decode_megapixels=two_rows), Recorder()
    short = BatchSpec(64, 64, 2, 0.0, "z-image-simple")
    loop.submit("a", engine, short, items("a", 4), recorder.sink("a"))  # 4 rows done after 2 calls
    loop.submit("b", engine, SPEC, items("b", 4), recorder.sink("b"))  # another group: 6 calls to go
    recorder.wait("a", 4)
    recorder.wait("b", 4)
    assert engine.decodes == [["a0", "a1"], ["a2", "a3"], ["b0", "b1"], ["b2", "b3"]]
    assert len(engine.calls) == 2 + 6
    assert "decode,decode" not in ",".join(engine.events[: engine.events.index("decode") + 3])  # b's call between


def test_real_jobs_of_both_workflows_sharing_calls_equal_their_solo_runs(handler_module):
    """The real engine behind the loop, two jobs at once (a danrisi job of 3 images, rows two at a
    time, and a simple 1-image job arriving while it runs): whatever calls they shared or waited
    through, each image equals its solo run, and the 1-image job made exactly its own calls."""
    import asyncio

    from serving.local_run import collect
    from serving.settings import load_settings
    from serving.startup import LoadedEngines
    from serving.worker import Worker
    from tests.conftest import SMALL, assert_regenerates, pixels

    settings = load_settings({"MAX_BATCH": "2", "BATCH_WAIT_MS": "0", "PULID_ENABLED": "0"})
    worker = Worker(settings, LoadedEngines(handler_module.WORKER.engine, None, "off"))
    danrisi = {**SMALL, "prompt": "a red car", "workflow": "z-image-danrisi", "num_images": 3, "seed": 40}
    simple = {**SMALL, "prompt": "a big dog", "workflow": "z-image-simple", "seed": 50}

    async def together():
        async def later(job_input):
            await asyncio.sleep(0.05)
            return await collect(worker.run_job, {"id": "simple", "input": job_input})
        return await asyncio.gather(collect(worker.run_job, {"id": "danrisi", "input": danrisi}), later(simple))

    try:
        mixed_danrisi, mixed_simple = asyncio.run(together())
        assert mixed_simple["model_calls"] == SMALL["steps"]  # nothing redone
        solo = [asyncio.run(collect(worker.run_job, {"id": f"solo{i}", "input": {**danrisi, "num_images": 1,
                                                                                   "seed": 40 + i}}))
                for i in range(3)]
        for shared, alone in zip(mixed_danrisi["images"], solo):
            assert_regenerates(pixels(shared), pixels(alone["images"][0]))
        alone_simple = asyncio.run(collect(worker.run_job, {"id": "solo-simple", "input": simple}))
        assert_regenerates(pixels(mixed_simple["images"][0]), pixels(alone_simple["images"][0]))
    finally:
        worker.engine_loop.stop()
