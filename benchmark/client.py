"""A polite async client for the RunPod endpoint HTTP API: timeouts, bounded retries, backoff."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp

RUNPOD_API_BASE = "https://api.runpod.ai/v2"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_ERROR_CHARS = 300  # error bodies may echo input; keep reports short


class EndpointError(Exception):
    """A request that failed for good (non-retryable status, or retries exhausted)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EndpointClient:
    """One endpoint (`base_url` ends with the endpoint id); use as `async with`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        request_timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EndpointClient:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), self._max_backoff_s)
            except ValueError:
                pass
        return min(self._backoff_s * 2**attempt, self._max_backoff_s) * random.uniform(0.5, 1.0)

    async def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """JSON in, JSON out; retries 429/5xx and transport errors with exponential backoff."""
        assert self._session is not None, "use EndpointClient as an async context manager"
        url = f"{self.base_url}/{path}"
        for attempt in range(self._max_retries + 1):
            last = attempt == self._max_retries
            try:
                async with self._session.request(method, url, json=body) as response:
                    if response.status in RETRY_STATUSES and not last:
                        await asyncio.sleep(self._delay(attempt, response.headers.get("Retry-After")))
                        continue
                    if response.status >= 400:
                        text = (await response.text())[:MAX_ERROR_CHARS]
                        raise EndpointError(f"{method} {path.split('/')[0]}: HTTP {response.status}: {text}", response.status)
                    return await response.json()
            except (aiohttp.ClientError, TimeoutError) as err:
                if last:
                    raise EndpointError(f"{method} {path.split('/')[0]}: {type(err).__name__}: {err}") from err
                await asyncio.sleep(self._delay(attempt, None))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def run(self, job_input: dict[str, Any]) -> str:
        return (await self.request("POST", "run", {"input": job_input}))["id"]

    async def runsync(self, job_input: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", "runsync", {"input": job_input})

    async def status(self, job_id: str) -> dict[str, Any]:
        return await self.request("GET", f"status/{job_id}")

    async def stream(self, job_id: str) -> dict[str, Any]:
        return await self.request("GET", f"stream/{job_id}")

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self.request("POST", f"cancel/{job_id}")

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "health")


def elapsed_ms(since: float) -> float:
    """Milliseconds since a time.monotonic() reading, to 0.1 ms."""
    return round((time.monotonic() - since) * 1000, 1)
