"""The local endpoint on its own event loop in a thread: for tests and the load test script."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from aiohttp import web

from endpoint.app import ServerSettings, create_app
from endpoint.loader import LoadedHandler

LOOPBACK = "127.0.0.1"


class BackgroundEndpoint:
    """`with BackgroundEndpoint(loaded) as ep:` serves on 127.0.0.1 at an ephemeral port."""

    def __init__(self, loaded: LoadedHandler, settings: ServerSettings | None = None) -> None:
        self._app = create_app(loaded, settings)
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self._app)
        self._thread = threading.Thread(target=self._loop.run_forever, name="local-endpoint", daemon=True)
        self.port = 0

    @property
    def base_url(self) -> str:
        """What RUNPOD_ENDPOINT_BASE_URL should be (the endpoint id follows it)."""
        return f"http://{LOOPBACK}:{self.port}/v2"

    def __enter__(self) -> BackgroundEndpoint:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
