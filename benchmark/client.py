"""A polite async client for the RunPod endpoint HTTP API: timeouts, bounded retries, backoff.

Retries are aiohttp-retry's: 429 and 5xx gateway statuses and transport errors, with exponential
backoff; anything else (a 400, a 404) is an answer, not a reason to try again.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
from aiohttp_retry import ExponentialRetry, RetryClient

RUNPOD_API_BASE = "https://api.runpod.ai/v2"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_ERROR_CHARS = 300  # error bodies may echo input; keep reports short


class EndpointError(Exception):
    """A request that failed for good (non-retryable status, or retries exhausted)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EndpointClient:
    """One endpoint (`base_url` ends with the endpoint id); use as `async with`.

    Each attempt has `request_timeout_s`; waits between attempts are `backoff_s`, doubling, at
    most `max_backoff_s`."""

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
        self._retry = ExponentialRetry(
            attempts=max_retries + 1,
            start_timeout=backoff_s / 2,  # the library waits start * 2**attempt, from attempt 1
            max_timeout=max_backoff_s,
            statuses=set(RETRY_STATUSES),
            exceptions={aiohttp.ClientError, TimeoutError},
            retry_all_server_errors=False,
        )
        self._client: RetryClient | None = None

    async def __aenter__(self) -> EndpointClient:
        session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        self._client = RetryClient(client_session=session, retry_options=self._retry)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()

    async def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """JSON in, JSON out; an EndpointError once retries are spent or the answer is an error."""
        assert self._client is not None, "use EndpointClient as an async context manager"
        route = path.split("/")[0]
        try:
            async with self._client.request(method, f"{self.base_url}/{path}", json=body) as response:
                if response.status >= 400:
                    text = (await response.text())[:MAX_ERROR_CHARS]
                    raise EndpointError(f"{method} {route}: HTTP {response.status}: {text}", response.status)
                return await response.json()
        except (aiohttp.ClientError, TimeoutError) as err:
            raise EndpointError(f"{method} {route}: {type(err).__name__}: {err}") from err

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
