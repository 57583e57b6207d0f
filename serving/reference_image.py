"""The consistent-mode reference photo: decoded from base64 / a data URI, or fetched over https.

Everything here comes from outside, so everything is bounded: encoded size, pixel count (a
decompression bomb is refused before decoding), image type, fetch time, and the fetch target —
only public addresses, checked after DNS resolution and again for every redirect, and the
connection goes to the address that was checked (no DNS rebinding in between).
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import ssl
import http.client
from urllib.parse import urljoin, urlsplit

import numpy as np
from PIL import Image

from serving.errors import JobError

FIELD = "reference_image"
MAX_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000
MIN_SIDE = 64
FETCH_TIMEOUT_S = 10.0
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
    except socket.gaierror:
        raise _invalid("URL host does not resolve") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:  # every address must be public, not just the first
        check_public_address(address)
    return addresses[0]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to an already-checked IP while verifying the certificate for the host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_https(url: str) -> bytes:
    """GET an https URL: public targets only, bounded redirects, size and time."""
    for _ in range(MAX_REDIRECTS + 1):
        try:
            parts = urlsplit(url)
            port = parts.port or 443
        except ValueError:  # a bad port or a broken IPv6 literal, in the request or a redirect
            raise _invalid("is not a valid URL") from None
        if parts.scheme != "https" or not parts.hostname:
            raise _invalid("URLs must use https")
        address = _resolve_public(parts.hostname, port)
        connection = _PinnedHTTPSConnection(parts.hostname, address, port, FETCH_TIMEOUT_S)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers={"User-Agent": "z-image-worker", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                url = urljoin(url, response.getheader("Location", ""))
                continue
            if response.status != 200:
                raise _invalid(f"URL answered HTTP {response.status}")
            declared = int(response.getheader("Content-Length") or 0)
            if declared > MAX_BYTES:
                raise _invalid(f"must be at most {MAX_BYTES // 2**20} MB")
            data = response.read(MAX_BYTES + 1)
            if len(data) > MAX_BYTES:
                raise _invalid(f"must be at most {MAX_BYTES // 2**20} MB")
            return data
        except (OSError, http.client.HTTPException):
            raise _invalid("URL could not be fetched") from None
        finally:
            connection.close()
    raise _invalid(f"URL redirected more than {MAX_REDIRECTS} times")
