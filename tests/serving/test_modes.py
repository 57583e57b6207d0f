"""Which engine serves a request: workflow resolution, eta, and the consistent-mode fallback."""

from __future__ import annotations

import asyncio

import pytest

from serving.errors import JobError
from serving.modes import ConsistentMode, FastMode, Modes
from serving.schema import parse_job_input
from serving.settings import load_settings


@pytest.fixture(scope="module")
def modes(handler_module) -> Modes:
    settings = load_settings({"PULID_ENABLED": "0"})
    engine = handler_module.WORKER.engine
    return Modes(FastMode(engine, settings), ConsistentMode(None, "disabled by PULID_ENABLED=0", settings))


def choose(modes: Modes, **fields):
    return asyncio.run(modes.choose(parse_job_input({"prompt": "a cat", **fields})))


def test_fast_mode_resolves_the_workflow_and_danrisi_gets_its_eta(modes):
    choice, reason = choose(modes)
    assert (choice.name, choice.spec.workflow, choice.spec.eta, reason) == ("fast", "z-image-danrisi", 0.5, None)
    simple, _ = choose(modes, workflow="z-image-simple")
    assert (simple.spec.workflow, simple.spec.eta) == ("z-image-simple", None)


def test_consistent_mode_unavailable_fails_or_falls_back_as_asked(modes):
    consistent = {"mode": "consistent", "reference_image": "aGVsbG8="}
    with pytest.raises(JobError, match="^mode_unavailable: mode: consistent mode is unavailable: disabled by"):
        choose(modes, **consistent)
    choice, reason = choose(modes, **consistent, fallback="fast")
    assert choice.name == "fast" and reason.startswith("consistent mode is unavailable")


def test_a_disabled_danrisi_is_refused_by_name_and_auto_runs_simple(handler_module):
    fast = FastMode(handler_module.WORKER.engine, load_settings({"DANRISI_ENABLED": "0"}))
    assert fast.resolve_workflow("auto") == "z-image-simple"
    with pytest.raises(JobError, match="^workflow_unavailable: workflow: "):
        fast.resolve_workflow("z-image-danrisi")
