"""The worker protocol's HTTP routes, as the runpod SDK 1.12 speaks it (read from its source:
`rp_job.get_job` / `get_stop_signals`, `rp_http.send_result` / `stream_result`,
`rp_progress.progress_update`, `rp_ping.Heartbeat`), over the Platform.

    GET  job-take/{worker}?...&job_in_progress=0|1            one job object, or 204
    GET  job-take-batch/{worker}?...&batch_size=N&job_in_progress=...   a list of jobs, or 204
    POST job-done/{worker}/{job}?...&isStream=false|true      the result, or {"status": "IN_PROGRESS", "output": p}
    POST job-stream/{worker}/{job}?...&isStream=false         {"output": chunk}
    GET  job-stop/{worker}?...                                {"jobsToStop": [ids]}, or 204
    GET  ping/{worker}?job_id=a,b&runpod_version=...          200

The SDK sends its key as the bare `Authorization` header and posts JSON text with a form content
type; take and stop are long-polls. Paths sit under /v2/{endpoint_id}/ like the client API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from endpoint.platform import Platform

MAX_TAKE_BATCH = 64
MAX_PING_JOBS = 1024


ROUTE_PREFIX = "worker-"  # every worker route's name starts so: the server knows them by it


def is_worker_route(request: web.BaseRequest) -> bool:
    """A worker's poll, ping or result (the workers' key, no access log), not a client's request."""
    match = getattr(request, "match_info", None)
    return match is not None and (match.route.name or "").startswith(ROUTE_PREFIX)


@dataclass(frozen=True)
class WorkerApiSettings:
    hold_s: float = 20.0  # how long job-take and job-stop hold a request with nothing to give
    max_post_bytes: int = 32_000_000  # one result (the whole aggregate of a job) or one stream chunk


class WorkerApi:
    """The routes, bound to one platform."""

    def __init__(self, platform: Platform, settings: WorkerApiSettings) -> None:
        self.platform = platform
        self.settings = settings

    def add_routes(self, app: web.Application, prefix: str) -> None:
        """Route names start with ROUTE_PREFIX: the server checks the workers' key on them."""
        app.router.add_get(f"{prefix}/job-take/{{worker_id}}", self.take_one, name=f"{ROUTE_PREFIX}take")
        app.router.add_get(f"{prefix}/job-take-batch/{{worker_id}}", self.take_batch, name=f"{ROUTE_PREFIX}take-batch")
        app.router.add_post(f"{prefix}/job-done/{{worker_id}}/{{job_id}}", self.done, name=f"{ROUTE_PREFIX}done")
        app.router.add_post(f"{prefix}/job-stream/{{worker_id}}/{{job_id}}", self.stream, name=f"{ROUTE_PREFIX}stream")
        app.router.add_get(f"{prefix}/job-stop/{{worker_id}}", self.stop, name=f"{ROUTE_PREFIX}stop")
        app.router.add_get(f"{prefix}/ping/{{worker_id}}", self.ping, name=f"{ROUTE_PREFIX}ping")

    async def take_one(self, request: web.Request) -> web.Response:
        jobs = await self.platform.take(request.match_info["worker_id"], 1, self.settings.hold_s)
        return web.json_response(jobs[0].job_for_worker()) if jobs else web.Response(status=204)

    async def take_batch(self, request: web.Request) -> web.Response:
        try:
            size = int(request.query.get("batch_size", "1"))
        except ValueError:
            return web.json_response({"error": "batch_size must be an integer"}, status=400)
        if not 1 <= size <= MAX_TAKE_BATCH:
            return web.json_response({"error": f"batch_size must be 1..{MAX_TAKE_BATCH}"}, status=400)
        jobs = await self.platform.take(request.match_info["worker_id"], size, self.settings.hold_s)
        return web.json_response([job.job_for_worker() for job in jobs]) if jobs else web.Response(status=204)

    async def done(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        self.platform.report(request.match_info["worker_id"], request.match_info["job_id"], body)
        return web.json_response({})

    async def stream(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        self.platform.stream(request.match_info["worker_id"], request.match_info["job_id"], body.get("output"))
        return web.json_response({})

    async def stop(self, request: web.Request) -> web.Response:
        job_ids = await self.platform.stop_signals(request.match_info["worker_id"], self.settings.hold_s)
        return web.json_response({"jobsToStop": job_ids}) if job_ids else web.Response(status=204)

    async def ping(self, request: web.Request) -> web.Response:
        """`job_id` lists the jobs the worker holds, comma-separated (absent when none)."""
        held = [job_id for job_id in request.query.get("job_id", "").split(",") if job_id][:MAX_PING_JOBS]
        self.platform.ping(request.match_info["worker_id"], held)
        return web.json_response({})

    async def _json_object(self, request: web.Request) -> dict[str, Any]:
        """The SDK posts `json.dumps(data)` as the body whatever the content type says."""
        raw = await request.read()  # the app's client_max_size bounds it first
        if len(raw) > self.settings.max_post_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.settings.max_post_bytes, actual_size=len(raw))
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise web.HTTPBadRequest(text='{"error": "body is not JSON"}', content_type="application/json") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text='{"error": "body must be a JSON object"}', content_type="application/json")
        return body
