"""A webhook receiver for tests: a real aiohttp server on 127.0.0.1 in its own thread."""

from __future__ import annotations

import asyncio
import threading
import time
from types import TracebackType
from typing import Any

from aiohttp import web


class WebhookReceiver:
    """Answers each POST with the next of `statuses` (then 200), after `delay_s`; keeps what came."""

    def __init__(self, statuses: tuple[int, ...] = (), delay_s: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay_s = delay_s
        self.calls: list[tuple[float, Any]] = []  # (time.monotonic(), JSON body)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhook-receiver", daemon=True)
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.calls.append((time.monotonic(), await request.json()))
        await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({}, status=status)

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    def wait_for_calls(self, count: int, timeout_s: float = 10) -> list[tuple[float, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(self.calls) < count:
            assert time.monotonic() < deadline, f"{len(self.calls)} webhook calls, expected {count}"
            time.sleep(0.01)
        return self.calls

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
