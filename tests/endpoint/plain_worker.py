"""TEST FIXTURE: a plain (non-generator) async handler, run by the local endpoint under the runpod
SDK's loop like any handler: what the platform gets from the SDK for returned values, a returned
`error`, an exception, and `refresh_worker`."""

from __future__ import annotations

from typing import Any



async def handler(job: dict[str, Any]) -> Any:
    inp = job["input"]
    action = inp.get("action")
    if action == "error":
        return {"echo": inp.get("value"), "error": "nope"}
    if action == "raise":
        raise ValueError("boom")
    if action == "refresh":
        return {"echo": inp.get("value"), "refresh_worker": True}
    return inp.get("value")
