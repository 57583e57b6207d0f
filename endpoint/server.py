"""The local endpoint as one object (HTTP server + platform + worker processes), and the
foreground server behind `scripts/serve_local.py` and `python handler.py --rp_serve_api`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal

from aiohttp import web
from aiohttp.web_log import AccessLogger

from endpoint.app import ServerSettings, ServerState, create_app, status_body
from endpoint.jobs import JobRecord, JobStore
from endpoint.platform import Platform
from endpoint.pool import PoolSettings, WorkerPool, worker_command
from endpoint.webhook import WebhookPolicy, WebhookSender
from endpoint.worker_api import is_worker_route

API_KEY_ENV = "LOCAL_ENDPOINT_API_KEY"
REACHED_AS_LOOPBACK = frozenset({"", "0.0.0.0", "::", "localhost"})  # binds a local worker calls at 127.0.0.1

log = logging.getLogger(__name__)


class ClientAccessLogger(AccessLogger):
    """aiohttp's access log for client requests only: the workers' polls and pings (several a
    second) would bury them."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if is_worker_route(request):
            return
        super().log(request, response, time)


class LocalEndpoint:
    """The client API and the worker API on one HTTP server, and the worker processes that call
    back to it (`pool=None`: no workers, for tests that speak the worker protocol themselves).
    `start` and `stop` on one event loop."""

    def __init__(self, settings: ServerSettings, pool: PoolSettings | None = None) -> None:
        self.settings = settings
        self.pool_settings = pool
        self.port = 0
        self.host = "127.0.0.1"
        self.state: ServerState | None = None
        self._runner: web.AppRunner | None = None

    @property
    def platform(self) -> Platform:
        assert self.state is not None, "LocalEndpoint.start was not awaited"
        return self.state.platform

    @property
    def pool(self) -> WorkerPool | None:
        return self.state.pool if self.state is not None else None

    @property
    def callback_base(self) -> str:
        """Where this machine's workers reach the server."""
        host = "127.0.0.1" if self.host in REACHED_AS_LOOPBACK else self.host
        return f"http://{host}:{self.port}"

    async def start(self, host: str, port: int) -> None:
        webhooks = WebhookSender(self.settings.webhook)
        await webhooks.start()

        def on_final(record: JobRecord) -> None:
            if record.webhook is not None:
                webhooks.send(record.id, record.webhook, status_body(record))

        def on_stop_pod(worker_id: str) -> None:  # RunPod stops a worker whose result says stopPod
            if self.pool is not None:
                self.pool.terminate(worker_id)

        platform = Platform(JobStore(self.settings.retention_s), on_final, on_stop_pod)
        pool = WorkerPool(self.pool_settings, platform, self.settings.worker_key) if self.pool_settings else None
        self.state = ServerState(self.settings, platform, webhooks, pool)
        self._runner = web.AppRunner(create_app(self.state), handler_cancellation=True,
                                     access_log_class=ClientAccessLogger)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.host, self.port = host, self._runner.addresses[0][1]
        if pool is not None:
            await pool.start(self.pool_settings.callback_base or self.callback_base)

    async def stop(self) -> None:
        """Workers first (they finish their jobs and post them here), then every long-poll, then
        the server and pending webhooks."""
        if self.state is None or self._runner is None:
            return
        if self.state.pool is not None:
            await self.state.pool.stop()
        self.state.platform.close()
        await self._runner.cleanup()
        await self.state.webhooks.close()


def dev_settings(api_key: str | None = None, **overrides: object) -> ServerSettings:
    """A developer's server: webhooks may call this machine (a receiver on loopback), which
    RunPod never does; pass `webhook=WebhookPolicy()` for public targets only."""
    settings = ServerSettings(api_key=api_key, webhook=WebhookPolicy(allow_private=True))
    return dataclasses.replace(settings, **overrides)


def serve(settings: ServerSettings, pool: PoolSettings, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then stop the workers (they finish what they hold)."""
    asyncio.run(_serve(settings, pool, host, port))


async def _serve(settings: ServerSettings, pool: PoolSettings, host: str, port: int) -> None:
    endpoint = LocalEndpoint(settings, pool)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await endpoint.start(host, port)
    log.info("serving at http://%s:%d/v2/<endpoint_id>/ with %d worker(s) running %s (auth %s, private webhooks %s)",
             host, endpoint.port, pool.workers, " ".join(pool.command), "on" if settings.api_key else "off",
             "allowed" if settings.webhook.allow_private else "refused")
    try:
        await stop.wait()
    finally:
        log.info("stopping: the workers finish the jobs they hold")
        await endpoint.stop()


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def serve_handler_api(host: str, port: int, workers: int) -> None:
    """`python handler.py --rp_serve_api`: `workers` x `python handler.py`, the dev settings, and
    `$LOCAL_ENDPOINT_API_KEY` as the key if set."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(dev_settings(api_key_from_env()), PoolSettings(command=worker_command(), workers=workers), host, port)
