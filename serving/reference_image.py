"""The consistent-mode reference photo: decoded from base64 / a data URI, or fetched over https.

Everything here comes from outside, so everything is bounded: encoded size, pixel count (a
decompression bomb is refused before decoding), image type, fetch time, and the fetch target —
only public addresses, checked after DNS resolution and again for every redirect, and the
connection goes to the address that was checked (no DNS rebinding in between). The fetch time
is one total deadline across connect, TLS, redirects, headers and body: every socket read is
given only the time left, so a host that drips a byte at a time is cut off, not waited for.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import numpy as np
from PIL import Image

from serving.errors import JobError

FIELD = "reference_image"
MAX_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000
MIN_SIDE = 64
FETCH_TIMEOUT_S = 10.0  # in total, for one reference (all redirects included)
FETCH_CHUNK = 64 * 1024
MAX_REDIRECTS = 3
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


def _invalid(rule: str) -> JobError:
    return JobError("invalid_reference", rule, field=FIELD)


def load_reference_image(value: str) -> tuple[bytes, np.ndarray]:
    """The photo's bytes and its RGB uint8 pixels, from base64, a data URI or an https URL."""
    if value.startswith("https://"):
        data = fetch_https(value)
    elif value.startswith(("http://", "ftp://", "file:")):
        raise _invalid("URLs must use https")
    else:
        data = _decode_base64(value)
    return data, decode_image(data)


def _decode_base64(value: str) -> bytes:
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise _invalid("data URIs must be base64-encoded")
    if len(value) > MAX_BYTES * 4 // 3 + 4:
        raise _invalid(f"must be at most {MAX_BYTES // 2**20} MB")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("is neither an https URL nor valid base64") from None


def decode_image(data: bytes) -> np.ndarray:
    """Check type and size from the header first; decode only what passes."""
    if len(data) > MAX_BYTES:
        raise _invalid(f"must be at most {MAX_BYTES // 2**20} MB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ALLOWED_FORMATS:
                raise _invalid(f"must be PNG, JPEG or WebP, got {image.format}")
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise _invalid(f"has {width}x{height} pixels, more than {MAX_PIXELS}")
            if min(width, height) < MIN_SIDE:
                raise _invalid(f"must be at least {MIN_SIDE} pixels on each side")
            return np.asarray(image.convert("RGB"))
    except JobError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise _invalid("is not a readable image") from None


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


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
    ip = ipaddress.ip_address(address)
    if not ip.is_global or ip.is_multicast:
        raise _invalid("URL must point to a public address")
    inner = _embedded_ipv4(ip) if ip.version == 6 else None
    if inner is not None and (not inner.is_global or inner.is_multicast):
        raise _invalid("URL must point to a public address")


def _resolve_public(host: str, port: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):  # UnicodeError: a name IDNA cannot encode ("a..b", a 64-char label)
        raise _invalid("URL host does not resolve") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:  # every address must be public, not just the first
        check_public_address(address)
    return addresses[0]


class _DeadlineSSLSocket(ssl.SSLSocket):
    """An SSL socket whose every read gets only the time left before `deadline` (monotonic)."""

    deadline = float("inf")

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("fetch deadline passed")
        self.settimeout(remaining)
        return super().recv_into(buffer, nbytes, flags)


def _tls_context() -> ssl.SSLContext:
    """The system's trust store, certificate and host name checked (tests trust their own CA here)."""
    return ssl.create_default_context()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to an already-checked IP while verifying the certificate for the host name; no read
    (TLS handshake, headers, body) outlives `deadline`."""

    def __init__(self, host: str, address: str, port: int, deadline: float) -> None:
        context = _tls_context()
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


def _declared_length(response: http.client.HTTPResponse) -> int | None:
    declared = response.getheader("Content-Length")
    if declared is None:
        return None
    if not declared.strip().isdigit():  # "abc", "-1", "1, 2": the host is broken, not us
        raise _invalid("URL sent a malformed Content-Length")
    return int(declared)


def _read_body(response: http.client.HTTPResponse) -> bytes:
    """At most MAX_BYTES, a chunk at a time (each read bounded by the connection's deadline)."""
    declared = _declared_length(response)
    if declared is not None and declared > MAX_BYTES:
        raise _invalid(f"must be at most {MAX_BYTES // 2**20} MB")
    data = bytearray()
    while chunk := response.read1(FETCH_CHUNK):
        data += chunk
        if len(data) > MAX_BYTES:
            raise _invalid(f"must be at most {MAX_BYTES // 2**20} MB")
    return bytes(data)


def fetch_https(url: str) -> bytes:
    """GET an https URL: public targets only, bounded redirects, size and total time."""
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    for _ in range(MAX_REDIRECTS + 1):
        if not (url.isascii() and url.isprintable()) or " " in url:  # http.client would raise on these
            raise _invalid("is not a valid URL")
        try:
            parts = urlsplit(url)
            port = parts.port or 443
        except ValueError:  # a bad port or a broken IPv6 literal, in the request or a redirect
            raise _invalid("is not a valid URL") from None
        if parts.scheme != "https" or not parts.hostname:
            raise _invalid("URLs must use https")
        address = _resolve_public(parts.hostname, port)
        connection = None
        try:
            connection = _PinnedHTTPSConnection(parts.hostname, address, port, deadline)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers={"User-Agent": "z-image-worker", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                url = urljoin(url, response.getheader("Location", ""))
                continue
            if response.status != 200:
                raise _invalid(f"URL answered HTTP {response.status}")
            return _read_body(response)
        except TimeoutError:
            raise _invalid(f"URL took more than {FETCH_TIMEOUT_S:g} s to fetch") from None
        except (OSError, http.client.HTTPException):
            raise _invalid("URL could not be fetched") from None
        finally:
            if connection is not None:
                connection.close()
    raise _invalid(f"URL redirected more than {MAX_REDIRECTS} times")
