"""The local endpoint on its own event loop in a thread: for tests and the load test script."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from endpoint.app import ServerSettings
from endpoint.platform import Platform
from endpoint.pool import PoolSettings, WorkerPool
from endpoint.server import LocalEndpoint

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 120  # the workers finish the jobs they hold first

T = TypeVar("T")


class BackgroundEndpoint:
    """`with BackgroundEndpoint(settings, pool) as ep:` serves on 127.0.0.1 at an ephemeral port,
    with `pool.workers` worker processes (none when `pool` is None)."""

    def __init__(self, settings: ServerSettings | None = None, pool: PoolSettings | None = None) -> None:
        self.endpoint = LocalEndpoint(settings or ServerSettings(), pool)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="local-endpoint", daemon=True)

    @property
    def base_url(self) -> str:
        """What RUNPOD_ENDPOINT_BASE_URL should be (the endpoint id follows it)."""
        return f"http://{LOOPBACK}:{self.endpoint.port}/v2"

    @property
    def platform(self) -> Platform:
        return self.endpoint.platform

    @property
    def pool(self) -> WorkerPool:
        assert self.endpoint.pool is not None, "this endpoint has no workers"
        return self.endpoint.pool

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = START_TIMEOUT_S) -> T:
        """Run a coroutine on the endpoint's loop (its objects live there) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout_s)

    def on_loop(self, function: Callable[[], T]) -> T:
        """Call a plain function on the endpoint's loop (e.g. `pool.kill`), and wait for it."""
        async def call() -> T:
            return function()
        return self.call(call())

    def wait_for_workers(self, count: int, timeout_s: float = 180.0) -> None:
        """Until `count` workers have asked for jobs (a real handler's worker loads its model first)."""
        deadline = time.monotonic() + timeout_s

        def ready() -> int:
            return sum(seat.polled and not seat.gone for seat in self.platform.workers.values())

        while self.on_loop(ready) < count:
            if time.monotonic() > deadline:
                details = self.on_loop(self.pool.details)
                raise TimeoutError(f"{count} worker(s) not ready after {timeout_s:.0f} s: {details}")
            time.sleep(0.1)

    def __enter__(self) -> BackgroundEndpoint:
        self._thread.start()
        self.call(self.endpoint.start(LOOPBACK, 0))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.call(self.endpoint.stop(), timeout_s=STOP_TIMEOUT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
