"""The aiohttp application: the RunPod endpoint API for clients (/run, /runsync, /status, /stream,
/cancel, /retry, /purge-queue, /health) and the worker protocol (endpoint/worker_api.py) under
/v2/{endpoint_id}/, both over one Platform."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Awaitable, Callable

from aiohttp import web

from endpoint.jobs import IN_PROGRESS, IN_QUEUE, JobRecord
from endpoint.platform import NotRetryable, Platform
from endpoint.pool import WorkerPool
from endpoint.webhook import WebhookPolicy, WebhookSender, check_webhook_url
from endpoint.worker_api import WorkerApi, WorkerApiSettings, is_worker_route

MB = 1_000_000


@dataclass(frozen=True)
class ServerSettings:
    """Every bound of the server, with RunPod's values as defaults."""

    api_key: str | None = None
    run_max_bytes: int = 10 * MB
    runsync_max_bytes: int = 20 * MB
    retention_s: float = 30 * 60  # RunPod keeps /run results 30 minutes
    execution_timeout_s: float = 600.0  # endpoint default; policy.executionTimeout overrides
    max_execution_timeout_s: float = 24 * 3600.0
    max_queued: int = 1000
    runsync_wait_ms: int = 90_000
    runsync_wait_bounds_ms: tuple[int, int] = (1_000, 300_000)
    webhook: WebhookPolicy = field(default_factory=WebhookPolicy)  # RunPod's retries; public targets only
    worker_api: WorkerApiSettings = field(default_factory=WorkerApiSettings)
    worker_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)  # workers' Authorization


@dataclass
class ServerState:
    settings: ServerSettings
    platform: Platform
    webhooks: WebhookSender
    pool: WorkerPool | None = None


STATE = web.AppKey("state", ServerState)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class ApiError(Exception):
    """An error answered as RunPod does: an HTTP status and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _auth_middleware(api_key: str | None, worker_key: str) -> Callable[[web.Request, Handler],
                                                                         Awaitable[web.StreamResponse]]:
    """Clients need the API key (if one is set); the worker routes always need the workers' key,
    sent bare as the SDK sends RUNPOD_AI_API_KEY, so a client cannot take or finish jobs."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        key = worker_key if is_worker_route(request) else api_key
        if key is not None and not _authorized(request, key.encode()):
            return _error(401, "Unauthorized")
        try:
            return await handler(request)
        except ApiError as err:
            return _error(err.status, str(err))

    return middleware


def _authorized(request: web.Request, key: bytes) -> bool:
    """`Authorization: Bearer <key>` (or the bare key, as RunPod's curl examples send it), compared
    as bytes in constant time; a header that is not text (undecodable bytes) is simply wrong."""
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    try:
        raw = given.encode("utf-8", "surrogateescape")  # aiohttp keeps undecodable bytes as surrogates
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(raw, key)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """`1e999` parses to infinity in Python; RunPod's parser refuses a number out of range."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _state(request: web.Request) -> ServerState:
    return request.app[STATE]


def _record(request: web.Request) -> JobRecord:
    record = _state(request).platform.store.lookup(request.match_info["job_id"])
    if record is None:
        raise ApiError(404, "request does not exist")
    return record


async def _read_request(request: web.Request, max_bytes: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, f"payload too large: {request.content_length} bytes, limit {max_bytes}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"payload too large: limit {max_bytes} bytes") from None
    if len(raw) > max_bytes:
        raise ApiError(413, f"payload too large: {len(raw)} bytes, limit {max_bytes}")
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ValueError:
        raise ApiError(400, "request body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict) or "input" not in body:
        raise ApiError(400, "request body must be a JSON object with an 'input' field")
    return body


def _s3_config(body: dict[str, Any]) -> dict[str, Any] | None:
    """RunPod passes `s3Config` to the worker as it came; it only has to be an object (the worker
    checks its fields)."""
    value = body.get("s3Config")
    if value is not None and not isinstance(value, dict):
        raise ApiError(400, "s3Config must be an object")
    return value


def _webhook(body: dict[str, Any]) -> str | None:
    try:
        return check_webhook_url(body.get("webhook"))
    except ValueError as err:
        raise ApiError(400, str(err)) from None


def _execution_timeout_s(body: dict[str, Any], settings: ServerSettings) -> float:
    policy = body.get("policy") or {}
    if not isinstance(policy, dict):
        raise ApiError(400, "policy must be an object")
    timeout_ms = policy.get("executionTimeout")
    if timeout_ms is None:
        return settings.execution_timeout_s
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
        raise ApiError(400, "policy.executionTimeout must be a positive integer (ms)")
    return min(timeout_ms, int(settings.max_execution_timeout_s * 1000)) / 1000  # huge ints overflow a float


async def _submit(request: web.Request, max_bytes: int) -> JobRecord:
    state = _state(request)
    body = await _read_request(request, max_bytes)
    if state.platform.queued >= state.settings.max_queued:
        raise ApiError(429, f"queue full ({state.settings.max_queued} jobs)")
    record = JobRecord(
        input=body["input"],
        execution_timeout_s=_execution_timeout_s(body, state.settings),
        s3_config=_s3_config(body),
        webhook=_webhook(body),
    )
    state.platform.submit(record)
    return record


def status_body(record: JobRecord) -> dict[str, Any]:
    """The /status (and finished /runsync) response."""
    body: dict[str, Any] = {"id": record.id, "status": record.status, **record.timings()}
    if record.worker_id is not None:
        body["workerId"] = record.worker_id
    if record.status == IN_PROGRESS and record.progress is not None:
        body["output"] = record.progress
    elif record.is_final and record.output is not None:
        body["output"] = record.output
    if record.error is not None:
        body["error"] = record.error
    return body


async def run(request: web.Request) -> web.Response:
    record = await _submit(request, _state(request).settings.run_max_bytes)
    return web.json_response({"id": record.id, "status": IN_QUEUE})


async def runsync(request: web.Request) -> web.Response:
    settings = _state(request).settings
    low, high = settings.runsync_wait_bounds_ms
    try:
        wait_ms = int(request.query.get("wait", settings.runsync_wait_ms))
    except ValueError:
        raise ApiError(400, "wait must be an integer (ms)") from None
    record = await _submit(request, settings.runsync_max_bytes)
    try:
        await asyncio.wait_for(record.done.wait(), timeout=min(max(wait_ms, low), high) / 1000)
    except TimeoutError:
        return web.json_response({"id": record.id, "status": record.status})
    return web.json_response(status_body(record))


async def status(request: web.Request) -> web.Response:
    return web.json_response(status_body(_record(request)))


async def stream(request: web.Request) -> web.Response:
    record = _record(request)
    chunks = record.take_stream()
    return web.json_response({"status": record.status, "stream": [{"output": c} for c in chunks]})


async def cancel(request: web.Request) -> web.Response:
    """RunPod answers at once: a queued job never starts, a running one is CANCELLED now and its
    worker gets a stop signal for it."""
    record = _record(request)
    _state(request).platform.cancel(record)
    return web.json_response({"id": record.id, "status": record.status})


async def retry(request: web.Request) -> web.Response:
    state = _state(request)
    record = _record(request)
    if state.platform.queued >= state.settings.max_queued:
        raise ApiError(429, f"queue full ({state.settings.max_queued} jobs)")
    try:
        state.platform.retry(record)
    except NotRetryable as err:
        raise ApiError(400, str(err)) from None
    return web.json_response({"id": record.id, "status": record.status})


async def purge_queue(request: web.Request) -> web.Response:
    return web.json_response({"removed": _state(request).platform.purge(), "status": "completed"})


async def health(request: web.Request) -> web.Response:
    """RunPod's shape (`jobs`, `workers: {idle, running}`), plus `local`: each live worker's id,
    pid, state, jobs and memory, and how many workers ended."""
    state = _state(request)
    platform = state.platform
    platform.store.prune()
    counters = platform.counters
    states = Counter(seat.state for seat in platform.workers.values())
    local: dict[str, Any] = {"workers": state.pool.details() if state.pool else [],
                             "exited": len(state.pool.exits) if state.pool else 0,
                             "duplicateResults": counters["duplicateResults"]}
    return web.json_response(
        {
            "jobs": {
                "completed": counters["completed"],
                "failed": counters["failed"] + counters["timedOut"],
                "inProgress": platform.in_progress,
                "inQueue": platform.queued,
                "retried": counters["retried"],
            },
            "workers": {"idle": states["idle"], "running": states["running"] + states["draining"]},
            "local": local,
        }
    )


def create_app(state: ServerState) -> web.Application:
    """Client and worker routes over `state`; starting workers and stopping everything is
    endpoint.server.LocalEndpoint's job."""
    settings = state.settings
    largest_post = max(settings.run_max_bytes, settings.runsync_max_bytes, settings.worker_api.max_post_bytes)
    app = web.Application(middlewares=[_auth_middleware(settings.api_key, settings.worker_key)],
                          client_max_size=largest_post + 1)
    app[STATE] = state
    prefix = "/v2/{endpoint_id}"
    app.router.add_post(f"{prefix}/run", run)
    app.router.add_post(f"{prefix}/runsync", runsync)
    for method in ("GET", "POST"):
        app.router.add_route(method, f"{prefix}/status/{{job_id}}", status)
        app.router.add_route(method, f"{prefix}/stream/{{job_id}}", stream)
    app.router.add_post(f"{prefix}/cancel/{{job_id}}", cancel)
    app.router.add_post(f"{prefix}/retry/{{job_id}}", retry)
    app.router.add_post(f"{prefix}/purge-queue", purge_queue)
    app.router.add_get(f"{prefix}/health", health)
    WorkerApi(state.platform, settings.worker_api).add_routes(app, prefix)
    return app
