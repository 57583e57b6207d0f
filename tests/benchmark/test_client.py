"""The benchmark client's politeness: retries with backoff on 429/5xx only, bounded."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from aiohttp import web

from benchmark.client import EndpointClient, EndpointError


async def _with_server(statuses: list[int], call: Any) -> tuple[Any, int]:
    """Serve `statuses` in order (then 200) on 127.0.0.1, run `call(client)`; return its result and hits."""
    hits = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        status = statuses[hits - 1] if hits <= len(statuses) else 200
        return web.json_response({"ok": status == 200}, status=status, headers={"Retry-After": "0"})

    app = web.Application()
    app.router.add_route("*", "/v2/e/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        async with EndpointClient(f"http://127.0.0.1:{port}/v2/e", "k", max_retries=2, backoff_s=0.01) as client:
            try:
                return await call(client), hits
            except EndpointError as err:
                return err, hits
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("statuses, hits", [([503, 429], 3), ([502], 2)])
def test_retries_transient_statuses(statuses: list[int], hits: int) -> None:
    result, seen = asyncio.run(_with_server(statuses, lambda c: c.health()))
    assert result == {"ok": True} and seen == hits


def test_gives_up_after_max_retries() -> None:
    result, seen = asyncio.run(_with_server([500, 500, 500, 500], lambda c: c.health()))
    assert isinstance(result, EndpointError) and result.status == 500 and seen == 3


def test_client_errors_are_not_retried() -> None:
    result, seen = asyncio.run(_with_server([400], lambda c: c.run({"prompt": "p"})))
    assert isinstance(result, EndpointError) and result.status == 400 and seen == 1


def test_transport_errors_are_retried_then_reported() -> None:
    async def call() -> tuple[EndpointError, float]:
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        started = time.monotonic()
        async with EndpointClient(f"http://127.0.0.1:{port}/v2/e", "k", max_retries=2, backoff_s=0.1) as client:
            with pytest.raises(EndpointError) as raised:
                await client.health()
        return raised.value, time.monotonic() - started

    error, took = asyncio.run(call())
    assert error.status is None and "ClientConnectorError" in str(error)
    assert took >= 0.1 + 0.2  # two waits, doubling: the attempts were made
