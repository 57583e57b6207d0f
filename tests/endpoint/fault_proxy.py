"""A fault-injecting HTTP proxy between workers and the job server, for tests: it forwards every
request, except that an armed fault answers one route with an error status (before or after
forwarding) or answers late. A real aiohttp server on 127.0.0.1 (tests/endpoint/loopback_server.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from tests.endpoint.loopback_server import LoopbackServer

LONG_POLL_S = 120


@dataclass
class Fault:
    route: str  # the start of the worker route's name: "job-take" (and -batch), "job-done", ...
    status: int = 500
    forward_first: bool = False  # the server gets the request; the worker sees `status` anyway
    delay_s: float = 0.0  # answer this late (after forwarding), with the server's own answer
    final_results_only: bool = True  # for job-done: skip progress posts
    times: int = 1


@dataclass
class Seen:
    route: str
    worker_id: str
    job_id: str
    status: int  # what the worker got
    at: float
    progress: bool = False


class FaultProxy(LoopbackServer):
    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self._target = ""
        self._target_set = asyncio.Event()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session: aiohttp.ClientSession | None = None
        super().__init__(app, "fault-proxy")

    @property
    def url(self) -> str:
        return self.base_url

    def set_target(self, base: str) -> None:
        """The job server (http://host:port); requests wait until it is known."""
        def set_it() -> None:
            self._target = base.rstrip("/")
            self._target_set.set()
        self._loop.call_soon_threadsafe(set_it)

    def arm(self, fault: Fault) -> None:
        self._loop.call_soon_threadsafe(self.faults.append, fault)

    def results_of(self, job_id: str, count: int, timeout_s: float = 30) -> list[Seen]:
        """The job's final result posts, once `count` of them have come."""
        deadline = time.monotonic() + timeout_s
        while len(posts := [s for s in list(self.seen) if s.job_id == job_id and s.route == "job-done"
                            and not s.progress]) < count:
            assert time.monotonic() < deadline, f"{len(posts)} result posts for {job_id}, expected {count}"
            time.sleep(0.05)
        return posts

    def _fault_for(self, route: str, progress: bool) -> Fault | None:
        for fault in self.faults:
            if route.startswith(fault.route) and fault.times > 0 and not (progress and fault.final_results_only):
                fault.times -= 1
                return fault
        return None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        await self._target_set.wait()
        parts = request.path.split("/") + ["", ""]  # /v2/{endpoint}/{route}/{worker}[/{job}]
        route, worker_id, job_id = parts[3], parts[4], parts[5]
        body = await request.read()
        progress = route == "job-done" and b'"IN_PROGRESS"' in body
        fault = self._fault_for(route, progress)
        status, payload, content_type = 0, b"", None
        if fault is None or fault.forward_first or fault.delay_s:
            assert self._session is not None
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
            async with self._session.request(request.method, f"{self._target}{request.path_qs}", data=body,
                                             headers=headers) as response:
                status, payload, content_type = response.status, await response.read(), response.content_type
        if fault is not None and fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        elif fault is not None:
            status, payload, content_type = fault.status, b'{"error": "injected"}', "application/json"
        self.seen.append(Seen(route, worker_id, job_id, status, time.monotonic(), progress))
        return web.Response(status=status, body=payload or None, content_type=content_type if payload else None)

    async def started(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=LONG_POLL_S))

    async def stopped(self) -> None:
        assert self._session is not None
        await self._session.close()
