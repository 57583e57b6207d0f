"""Start-up phases: timed in order, failures marked, and what a started worker reports."""

from __future__ import annotations

import logging
import os

import pytest

from serving.startup_timing import StartupTimer


class Clock:
    """A clock the test moves: phase times are exact, not sleeps."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_are_recorded_in_order_in_ms_with_a_total(caplog) -> None:
    clock = Clock()
    timer = StartupTimer(clock)
    caplog.set_level(logging.INFO, logger="serving.startup_timing")
    timer.record("imports", 2500.0)
    with timer.phase("load z-image"):
        clock.now += 1.25
    with timer.phase("warm-up"):
        clock.now += 0.0004
    assert list(timer.as_dict().items()) == [("imports", 2500.0), ("load z-image", 1250.0), ("warm-up", 0.4),
                                             ("total", 3750.4)]
    assert "startup: load z-image took 1250 ms" in caplog.text
    assert timer.summary() == "imports 2.50 s, load z-image 1.25 s, warm-up 0.00 s, total 3.75 s"


def test_a_failing_phase_is_recorded_as_failed_and_the_error_goes_on() -> None:
    clock = Clock()
    timer = StartupTimer(clock)
    with pytest.raises(OSError), timer.phase("load pulid-flux"):
        clock.now += 3.0
        raise OSError("disk")
    assert timer.as_dict() == {"load pulid-flux (failed)": 3000.0, "total": 3000.0}


def test_a_started_worker_reports_its_phases_in_capabilities() -> None:
    from serving.settings import load_settings
    from serving.worker import Worker

    timer = StartupTimer()
    timer.record("imports", 10.0)
    env = {"PULID_ENABLED": "0", "DEVICE": "cpu"} | {k: v for k, v in os.environ.items() if k == "DEMO_MODEL_DIR"}
    worker = Worker.start(load_settings(env), timer)
    startup = worker.capabilities()["startup_ms"]
    # PuLID first (disabled here: a short phase), then Z-Image's own start-up phases
    assert list(startup) == ["imports", "pulid-flux start", "z-image load", "z-image acceleration", "total"]
    assert startup["z-image load"] > 0 and startup["total"] == pytest.approx(sum(list(startup.values())[:-1]), abs=0.2)


def test_the_handler_reports_its_imports_first_and_every_model_load(handler_module) -> None:
    """Here the handler was imported after whatever earlier tests loaded: its imports may have cost
    nothing, and then it says so (0 ms). That they are seconds when the handler runs first in its
    interpreter, as on RunPod, is tests/test_handler.py's fresh-process test."""
    from tests.conftest import run_job

    startup = run_job(handler_module, {"action": "capabilities"})["startup_ms"]
    assert list(startup)[:3] == ["imports", "pulid-flux start", "z-image load"] and list(startup)[-1] == "total"
    assert startup["imports"] >= 0
