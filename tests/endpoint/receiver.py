"""A webhook receiver for tests: a real aiohttp server on 127.0.0.1 (tests/endpoint/loopback_server.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from tests.endpoint.loopback_server import LoopbackServer


class WebhookReceiver(LoopbackServer):
    """Answers each POST with the next of `statuses` (then 200), after `delay_s`; keeps what came."""

    def __init__(self, statuses: tuple[int, ...] = (), delay_s: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay_s = delay_s
        self.calls: list[tuple[float, Any]] = []  # (time.monotonic(), JSON body)
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        super().__init__(app, "webhook-receiver")

    @property
    def url(self) -> str:
        return f"{self.base_url}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        self.calls.append((time.monotonic(), await request.json()))
        await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({}, status=status)

    def wait_for_calls(self, count: int, timeout_s: float = 10) -> list[tuple[float, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(self.calls) < count:
            assert time.monotonic() < deadline, f"{len(self.calls)} webhook calls, expected {count}"
            time.sleep(0.01)
        return self.calls
