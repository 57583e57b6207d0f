"""Shared fixtures: the real handler on the embedded demo model, driven in-process, and the local
endpoint (over the fake worker or the real handler) on 127.0.0.1 at an ephemeral port."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from endpoint.app import ServerSettings
from endpoint.background import BackgroundEndpoint
from endpoint.loader import LoadedHandler, load_handler

ROOT = Path(__file__).resolve().parent.parent

SMALL = {"width": 64, "height": 64, "steps": 2, "output_format": "png"}  # lossless: tests compare pixels


@pytest.fixture(scope="session")
def handler_module():
    import handler

    return handler


def run_job(handler_module, job_input: dict[str, Any], job_id: str = "test") -> dict[str, Any]:
    """What /runsync returns, merged into one result dict (or {"error": ...})."""
    from serving.local_run import collect

    return asyncio.run(collect(handler_module.handler, {"id": job_id, "input": job_input}))


def pixels(image_entry: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_entry["base64"]))).convert("RGB"))


def force_parsing_label(parser, label: int) -> None:
    """Make a BiSeNet face parser vote for ``label`` everywhere: its classifier's features are
    >= 1 after the ReLU and only that class's weights are non-zero."""
    import torch

    head = parser.conv_out
    with torch.no_grad():
        head.conv.bn.bias.fill_(1.0)
        head.conv_out.weight.zero_()
        head.conv_out.weight[label] = 1.0


def assert_regenerates(batched: np.ndarray, alone: np.ndarray) -> None:
    """The same image computed twice (again, alone instead of batched, by diffusers' own pipeline)
    is equal up to float rounding, which differs between CPUs and batch shapes: at most one level
    on under 1 % of values. Never compare float-derived pixels bitwise."""
    difference = np.abs(batched.astype(int) - alone.astype(int))
    assert difference.max() <= 1, difference.max()
    assert (difference > 0).mean() < 0.01


def assert_differs(a: np.ndarray, b: np.ndarray) -> None:
    """Two really different images (another seed, workflow or identity), not a rounding difference:
    more than one level apart on average."""
    assert np.abs(a.astype(float) - b.astype(float)).mean() > 1.0


# -- the local endpoint ------------------------------------------------------------------------

FAKE_WORKER = "tests.endpoint.fake_worker:handler"
API_KEY = "test-key"
EndpointFactory = Callable[..., BackgroundEndpoint]


@pytest.fixture
def start_endpoint() -> Iterator[EndpointFactory]:
    """Start endpoints (fake worker unless told otherwise); all are stopped after the test."""
    started: list[BackgroundEndpoint] = []

    def start(loaded: LoadedHandler | None = None, **settings: object) -> BackgroundEndpoint:
        settings.setdefault("api_key", API_KEY)
        server = BackgroundEndpoint(loaded or load_handler(FAKE_WORKER), ServerSettings(**settings))  # type: ignore[arg-type]
        started.append(server.__enter__())
        return server

    yield start
    for server in reversed(started):
        server.__exit__(None, None, None)


@pytest.fixture
def endpoint(start_endpoint: EndpointFactory) -> BackgroundEndpoint:
    return start_endpoint()
