"""Routes `runpod.serverless.progress_update` of locally run jobs to the local job store.

On RunPod, progress_update posts `{"status": "IN_PROGRESS", "output": payload}` for the job and
clients see the payload as /status output while it runs. Locally the SDK's post goes nowhere, so
the server swaps the public name for a router: jobs this server owns update their record (from
any thread, via the loop), every other job id goes to the SDK's original function unchanged
where the SDK has an API to post to (RUNPOD_WEBHOOK_POST_OUTPUT set), else it is dropped (the SDK
would only log a failed post).
The swap must happen before the handler module is imported, in case it binds the name with
`from runpod.serverless import progress_update`; `endpoint.loader` does that.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable

import runpod.serverless
from runpod.serverless.modules import rp_progress

from endpoint.jobs import JobRecord

Sink = Callable[[str], "JobRecord | None"]

SDK_PROGRESS_UPDATE = rp_progress.progress_update
_sinks: dict[str, tuple[asyncio.AbstractEventLoop, Sink]] = {}


def progress_update(job: dict[str, Any], progress: Any) -> None:
    """Drop-in for the SDK function (same signature)."""
    for loop, lookup in list(_sinks.values()):
        record = lookup(job["id"])
        if record is not None:
            loop.call_soon_threadsafe(record.set_progress, progress)
            return
    if os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):  # the SDK has somewhere to post it
        SDK_PROGRESS_UPDATE(job, progress)


def install() -> None:
    """Point the public names at the router (idempotent)."""
    runpod.serverless.progress_update = progress_update
    rp_progress.progress_update = progress_update


def register(name: str, loop: asyncio.AbstractEventLoop, lookup: Sink) -> None:
    """Let one running server claim its jobs; `name` is unique per server instance."""
    install()
    _sinks[name] = (loop, lookup)


def unregister(name: str) -> None:
    _sinks.pop(name, None)


def is_bound_to_sdk(namespace: dict[str, Any]) -> bool:
    """True when a module bound the SDK's original function before install (progress is lost)."""
    return any(value is SDK_PROGRESS_UPDATE for value in namespace.values())
