"""Routes progress reports of locally run jobs to the job store that owns them.

On RunPod a handler reports progress with the SDK's `progress_update`, which posts
`{"status": "IN_PROGRESS", "output": payload}` and /status shows the payload while the job runs.
Locally there is nowhere to post, so the server hands its own sink to the handler module instead:
a module that defines `set_progress_sink(sink)` gets `route` from `endpoint.loader`, and calls
`sink(job, payload)` where it would call `progress_update` (handler.py does). Nothing of the SDK
is patched. `route` may be called from any thread (GPU worker threads do); each running server
claims its own job ids, other ids are dropped.
"""

from __future__ import annotations

import asyncio
from typing import Any
from collections.abc import Callable

from endpoint.jobs import JobRecord

Lookup = Callable[[str], "JobRecord | None"]
ProgressSink = Callable[[dict[str, Any], Any], None]

_servers: dict[str, tuple[asyncio.AbstractEventLoop, Lookup]] = {}


def route(job: dict[str, Any], payload: Any) -> None:
    """The sink handed to handler modules: same signature as the SDK's `progress_update`."""
    for loop, lookup in list(_servers.values()):
        record = lookup(job["id"])
        if record is not None:
            loop.call_soon_threadsafe(record.set_progress, payload)
            return


def register(name: str, loop: asyncio.AbstractEventLoop, lookup: Lookup) -> None:
    """Let one running server claim its jobs; `name` is unique per server instance."""
    _servers[name] = (loop, lookup)


def unregister(name: str) -> None:
    _servers.pop(name, None)
