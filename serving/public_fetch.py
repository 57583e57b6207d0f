"""GET from the public internet, bounded, for what clients point the worker at (reference photos,
LoRA files) — and the address rule storage and webhooks apply too.

- https only; every address the host resolves to must be public (no loopback, private,
  link-local, reserved, multicast, nor an IPv6 form that reaches one through a translator), checked
  after DNS and again at every redirect; the connection goes to the address that was checked, with
  the certificate verified for the host name (no DNS rebinding in between);
- one deadline for the whole transfer (connect, TLS, redirects, headers, body): every socket read
  gets only the time left, so a host that drips a byte at a time is cut off;
- a size limit on the declared length and on the bytes read; a malformed Content-Length is the
  host's fault, said as such.

Errors are `FetchError(rule)`: the caller names its field (`invalid_reference: reference_image:
…`, `invalid_lora: loras[i]: …`).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

CHUNK_BYTES = 64 * 1024
NOT_PUBLIC = "URL must point to a public address"
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class FetchError(ValueError):
    """The URL cannot give its bytes; `rule` is the client-facing reason."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout_s: float  # for the whole fetch, redirects included
    max_redirects: int = 3
    accept: str = "*/*"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches through a translator (mapped, 6to4, Teredo, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _NAT64) or ip in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def check_public_address(address: str) -> None:
    """Raise FetchError unless `address` (an IP literal) is a public unicast address."""
    ip = ipaddress.ip_address(address)
    if not ip.is_global or ip.is_multicast:
        raise FetchError(NOT_PUBLIC)
    inner = _embedded_ipv4(ip) if ip.version == 6 else None
    if inner is not None and (not inner.is_global or inner.is_multicast):
        raise FetchError(NOT_PUBLIC)


def resolve_checked(host: str, port: int, check: Callable[[str], None]) -> str:
    """The host's first address, once every address it resolves to passed `check`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):  # UnicodeError: a name IDNA cannot encode ("a..b", a 64-char label)
        raise FetchError("URL host does not resolve") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:  # every address must pass, not just the first
        check(address)
    return addresses[0]


class _DeadlineSSLSocket(ssl.SSLSocket):
    """An SSL socket whose every read gets only the time left before `deadline` (monotonic)."""

    deadline = float("inf")

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self.settimeout(_remaining(self.deadline))
        return super().recv_into(buffer, nbytes, flags)


def _tls_context() -> ssl.SSLContext:
    """The system's trust store, certificate and host name checked."""
    return ssl.create_default_context()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to an already-checked IP while verifying the certificate for the host name; no read
    (TLS handshake, headers, body) outlives `deadline`."""

    def __init__(self, host: str, address: str, port: int, deadline: float, context: ssl.SSLContext) -> None:
        context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(host, port, timeout=_remaining(deadline), context=context)
        self._address = address
        self._deadline = deadline

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), _remaining(self._deadline))
        try:  # the handshake is bounded by the socket's timeout as a whole
            tls = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        tls.deadline = self._deadline
        self.sock = tls


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("fetch deadline passed")
    return remaining


def _too_big(max_bytes: int) -> FetchError:
    return FetchError(f"must be at most {max_bytes / 2**20:g} MB")


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """At most `max_bytes`, a chunk at a time (each read bounded by the connection's deadline)."""
    declared = response.getheader("Content-Length")
    if declared is not None:
        if not declared.strip().isdigit():  # "abc", "-1", "1, 2": the host is broken, not us
            raise FetchError("URL sent a malformed Content-Length")
        if int(declared) > max_bytes:
            raise _too_big(max_bytes)
    data = bytearray()
    while chunk := response.read1(CHUNK_BYTES):
        data += chunk
        if len(data) > max_bytes:
            raise _too_big(max_bytes)
    return bytes(data)


def fetch_https(url: str, limits: FetchLimits, *, check_address: Callable[[str], None] | None = None,
                context: ssl.SSLContext | None = None) -> bytes:
    """GET an https URL within `limits`; raises FetchError with the reason. `check_address`
    defaults to the public-address rule (read at call time)."""
    deadline = time.monotonic() + limits.timeout_s
    check_address = check_address or check_public_address
    for _ in range(limits.max_redirects + 1):
        if not (url.isascii() and url.isprintable()) or " " in url:  # http.client would raise on these
            raise FetchError("is not a valid URL")
        try:
            parts = urlsplit(url)
            port = parts.port or 443
        except ValueError:  # a bad port or a broken IPv6 literal, in the request or a redirect
            raise FetchError("is not a valid URL") from None
        if parts.scheme != "https" or not parts.hostname:
            raise FetchError("URLs must use https")
        address = resolve_checked(parts.hostname, port, check_address)
        connection = None
        try:
            connection = _PinnedHTTPSConnection(parts.hostname, address, port, deadline, context or _tls_context())
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers={"User-Agent": "z-image-worker", "Accept": limits.accept})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                url = urljoin(url, response.getheader("Location", ""))
                continue
            if response.status != 200:
                raise FetchError(f"URL answered HTTP {response.status}")
            return _read_body(response, limits.max_bytes)
        except TimeoutError:
            raise FetchError(f"URL took more than {limits.timeout_s:g} s to fetch") from None
        except (OSError, http.client.HTTPException):
            raise FetchError("URL could not be fetched") from None
        finally:
            if connection is not None:
                connection.close()
    raise FetchError(f"URL redirected more than {limits.max_redirects} times")
