"""Non-generator handlers and the progress hook, with the SDK worker's semantics."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from endpoint.loader import LoadedHandler, load_handler
from tests.conftest import EndpointFactory
from tests.endpoint.http import Api


def sync_handler(job: dict[str, Any]) -> dict[str, Any]:
    inp = job["input"]
    return {"echo": inp["value"], "error": inp.get("error"), "refresh_worker": True}


async def async_handler(job: dict[str, Any]) -> Any:
    await asyncio.sleep(0.01)
    if job["input"].get("boom"):
        raise ValueError("boom")
    return job["input"]["value"]


@pytest.mark.parametrize("handler", [sync_handler, async_handler])
def test_plain_handler_output(start_endpoint: EndpointFactory, handler: Any) -> None:
    api = Api(start_endpoint(LoadedHandler(handler, None, "test")))
    body = api.call("POST", "runsync", {"input": {"value": [1, 2]}}).json()
    assert body["status"] == "COMPLETED"
    # the SDK pops error and refresh_worker from a dict output
    assert body["output"] == ({"echo": [1, 2]} if handler is sync_handler else [1, 2])


def test_plain_handler_error_key_fails_the_job(start_endpoint: EndpointFactory) -> None:
    api = Api(start_endpoint(LoadedHandler(sync_handler, None, "test")))
    body = api.call("POST", "runsync", {"input": {"value": 1, "error": "nope"}}).json()
    assert (body["status"], body["error"], body["output"]) == ("FAILED", "nope", {"echo": 1})


def test_plain_handler_exception_fails_with_sdk_error_info(start_endpoint: EndpointFactory) -> None:
    api = Api(start_endpoint(LoadedHandler(async_handler, None, "test")))
    body = api.call("POST", "runsync", {"input": {"boom": True}}).json()
    assert body["status"] == "FAILED"
    assert '"error_message": "boom"' in body["error"]


def test_progress_reaches_status_through_the_injected_sink(
    start_endpoint: EndpointFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "progress_worker.py").write_text(textwrap.dedent("""
        import asyncio, threading

        sink = None

        def set_progress_sink(new_sink):
            global sink
            sink = new_sink

        async def handler(job):
            # from a thread, as a GPU worker thread would
            threading.Thread(target=sink, args=(job, {"step": 3})).start()
            await asyncio.sleep(1.0)
            return "done"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "progress_worker", raising=False)
    api = Api(start_endpoint(load_handler("progress_worker:handler")))
    job_id = api.submit({})
    api.wait_for_status(job_id, "IN_PROGRESS")
    deadline = time.monotonic() + 0.8
    while api.status(job_id).get("output") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.status(job_id)["output"] == {"step": 3}
    assert api.wait(job_id)["output"] == "done"


def test_handler_spec_must_be_module_attr() -> None:
    with pytest.raises(ValueError):
        load_handler("handler")
