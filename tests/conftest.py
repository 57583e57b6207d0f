"""Shared fixtures: the local endpoint over the fake worker, on 127.0.0.1 at an ephemeral port."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from endpoint.app import ServerSettings
from endpoint.background import BackgroundEndpoint
from endpoint.loader import LoadedHandler, load_handler

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
