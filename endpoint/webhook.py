"""Delivers a job's final /status body to the request's `webhook`, as RunPod does.

RunPod POSTs the body when a job ends; a 200 acknowledges it, anything else (or no answer) is
tried up to 2 more times, 10 s apart. Here each attempt is also bounded in time, redirects are
not followed, and deliveries run as their own tasks: a slow receiver never holds the job loop.
RunPod calls only public addresses; a local server may allow private and loopback ones
(`allow_private`, on for the dev server) so a receiver on this machine can be tried.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from serving.public_fetch import FetchError, check_public_address

log = logging.getLogger(__name__)

MAX_URL_CHARS = 2048


@dataclass(frozen=True)
class WebhookPolicy:
    attempts: int = 3  # the first call and RunPod's 2 retries
    retry_delay_s: float = 10.0
    attempt_timeout_s: float = 10.0
    allow_private: bool = False


class RefusedAddress(OSError):
    """The webhook resolves to a private, loopback, link-local or reserved address."""


def check_webhook_url(value: Any) -> str | None:
    """The request's `webhook` if it is absent or an http(s) URL with a host, else ValueError."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS:
        raise ValueError(f"webhook must be a URL string of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(value)
        valid = parts.port != 0  # .port raises ValueError when out of range
    except ValueError:
        valid = False
    if not valid:
        raise ValueError("webhook is not a valid URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook must be an http or https URL with a host")
    return value


def _check_public(address: str) -> None:
    try:
        check_public_address(address)
    except FetchError:
        raise RefusedAddress("webhook must point to a public address") from None


class _PublicResolver(AbstractResolver):
    """Resolves as aiohttp does, then refuses non-public answers; the connection goes to the
    addresses checked here, so a name cannot switch to a private one in between."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            _check_public(result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


class WebhookSender:
    """Background deliveries for one server; `start` and `close` on the server's loop."""

    def __init__(self, policy: WebhookPolicy) -> None:
        self.policy = policy
        self.delivered = 0
        self.abandoned = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        resolver = None if self.policy.allow_private else _PublicResolver()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=resolver),
            timeout=aiohttp.ClientTimeout(total=self.policy.attempt_timeout_s),
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def send(self, job_id: str, url: str, body: dict[str, Any]) -> None:
        """Deliver `body` in the background; returns at once."""
        task = asyncio.create_task(self._deliver(job_id, url, body), name=f"webhook-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, job_id: str, url: str, body: dict[str, Any]) -> None:
        assert self._session is not None, "WebhookSender.start was not awaited"
        host = urlsplit(url).hostname or ""  # the URL may carry a token: log only its host
        for attempt in range(self.policy.attempts):
            if attempt:
                await asyncio.sleep(self.policy.retry_delay_s)
            try:
                self._check_literal_host(host)
                async with self._session.post(url, json=body, allow_redirects=False) as response:
                    if response.status == 200:
                        self.delivered += 1
                        return
                    outcome = f"HTTP {response.status}"
            except RefusedAddress as err:
                log.warning("job %s: webhook to %s refused: %s", job_id, host, err)
                break
            except aiohttp.ClientConnectorError as err:
                if isinstance(err.os_error, RefusedAddress):
                    log.warning("job %s: webhook to %s refused: %s", job_id, host, err.os_error)
                    break
                outcome = type(err).__name__
            except (aiohttp.ClientError, TimeoutError) as err:
                outcome = type(err).__name__
            log.warning("job %s: webhook to %s attempt %d/%d failed: %s",
                        job_id, host, attempt + 1, self.policy.attempts, outcome)
        self.abandoned += 1

    def _check_literal_host(self, host: str) -> None:
        """An IP literal skips the resolver, so it is checked here."""
        if self.policy.allow_private:
            return
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return  # a name: the resolver checks what it resolves to
        _check_public(host)
