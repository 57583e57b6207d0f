"""A real aiohttp server on 127.0.0.1 (a free port), its event loop on a thread of its own: what the
tests' stand-ins for outside services (a webhook receiver, a fault-injecting proxy) are served by."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Self

from aiohttp import web


class LoopbackServer:
    """`with` it to serve `app`; `base_url` is then http://127.0.0.1:PORT. `started` and `stopped`
    run on the server's loop, after it listens and after it closed."""

    def __init__(self, app: web.Application, thread_name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=thread_name, daemon=True)
        self._runner = web.AppRunner(app)
        self.base_url = ""

    async def started(self) -> None:
        """What a server needs before its first request (a client session, say)."""

    async def stopped(self) -> None:
        """What it closes after the server has."""

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        await self.started()

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self.stopped()

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
