"""serving.reference_image: everything from outside is bounded and checked before it is used."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serving import reference_image as ref
from serving.errors import JobError
from serving.reference_image import check_public_address, decode_image, load_reference_image

INVALID = "invalid_reference: reference_image: "


def encoded(fmt: str, size: tuple[int, int] = (96, 80), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(rgb, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (truncated) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def refused(value: str, rule: str = "") -> str:
    with pytest.raises(JobError) as caught:
        load_reference_image(value)
    message = caught.value.message
    assert message.startswith(INVALID + rule), message
    return message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt):
    data = encoded(fmt)
    raw, rgb = load_reference_image(base64.b64encode(data).decode())
    assert raw == data and rgb.shape == (80, 96, 3) and rgb.dtype == np.uint8


def test_data_uri_and_rgba_are_accepted():
    data = encoded("PNG", mode="RGBA")
    raw, rgb = load_reference_image("data:image/png;base64," + base64.b64encode(data).decode())
    assert raw == data and rgb.shape == (80, 96, 3)


def test_data_uri_must_be_base64():
    refused("data:image/png," + "%89PNG", "data URIs must be base64-encoded")


@pytest.mark.parametrize("value", ["not base64!", "aGVsbG8", "ключ", "aGk=\n\x00"])
def test_bad_base64(value):
    refused(value, "is neither an https URL nor valid base64")


def test_non_image_bytes():
    refused(base64.b64encode(b"%PDF-1.7 definitely not an image").decode(), "is not a readable image")


def test_gif_is_refused():
    refused(base64.b64encode(encoded("GIF", mode="RGB")).decode(), "must be PNG, JPEG or WebP, got GIF")


def test_tiny_image_is_refused():
    refused(base64.b64encode(encoded("PNG", size=(10, 10))).decode(), "must be at least 64 pixels on each side")


@pytest.mark.parametrize("side", [50_000, 7_000])
def test_decompression_bomb_header_is_refused_without_decoding(side, monkeypatch):
    decoded = []
    monkeypatch.setattr(Image.Image, "convert", lambda *a, **k: decoded.append(1))
    refused(base64.b64encode(png_claiming(side, side)).decode())
    assert decoded == []  # refused from the header alone


def test_pixel_limit_names_the_size():
    with pytest.raises(JobError, match=r"has 7000x7000 pixels, more than 40000000"):
        decode_image(png_claiming(7000, 7000))


def test_oversized_payload_is_refused_before_decoding():
    refused("A" * (ref.MAX_BYTES * 4 // 3 + 8), "must be at most 10 MB")


@pytest.mark.parametrize(
    "url", ["http://example.com/a.png", "ftp://example.com/a.png", "file:///etc/passwd"])
def test_only_https_urls(url):
    refused(url, "URLs must use https")


@pytest.mark.parametrize("url", ["https://example.com:99999/a.png", "https://example.com:x/a.png", "https://[::1/a.png"])
def test_malformed_urls(url):
    refused(url, "is not a valid URL")


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.8.9.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
     "ff02::1"],
)
def test_non_public_addresses_are_refused(address):
    with pytest.raises(JobError, match="URL must point to a public address"):
        check_public_address(address)


@pytest.mark.parametrize(
    "address",  # IPv6 forms that reach a private IPv4 through a translator
    ["64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1", "2002:7f00:1::", "2002:a9fe:a9fe::1", "::127.0.0.1"],
)
def test_ipv6_wrapping_a_private_ipv4_is_refused(address):
    with pytest.raises(JobError, match="URL must point to a public address"):
        check_public_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::5db8:d822"])
def test_public_addresses_pass(address):
    check_public_address(address)


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1/a.png", "https://localhost/a.png", "https://10.0.0.1/a.png",
            "https://169.254.169.254/latest/meta-data/", "https://[::1]/a.png", "https://[::ffff:10.0.0.1]/a.png"])
def test_urls_to_private_targets_are_refused_before_connecting(url, monkeypatch):
    monkeypatch.setattr(ref, "_PinnedHTTPSConnection", lambda *a, **k: pytest.fail("connected"))
    refused(url, "URL must point to a public address")


# -- fetching, with DNS and the connection replaced ---------------------------------------------
class FakeResponse:
    def __init__(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.status, self._headers, self._body = status, headers or {}, body

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self._headers.get(name, default)

    def read1(self, limit: int) -> bytes:
        chunk, self._body = self._body[:limit], self._body[limit:]
        return chunk


@pytest.fixture
def web(monkeypatch):
    """Fake DNS (name -> addresses) and a fake server (host -> response); records connections."""
    state = {"dns": {}, "responses": {}, "connected": []}

    def getaddrinfo(host, port, type=0):  # noqa: A002 - socket's signature
        return [(2, 1, 6, "", (address, port)) for address in state["dns"][host]]

    class Connection:
        def __init__(self, host, address, port, deadline):
            self.host, self.address = host, address
            state["connected"].append((host, address))

        def request(self, method, path, headers):
            self.path = path

        def getresponse(self):
            return state["responses"][self.host]

        def close(self):
            pass

    monkeypatch.setattr(ref.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(ref, "_PinnedHTTPSConnection", Connection)
    return state


def test_fetch_connects_to_the_checked_address(web):
    data = encoded("PNG")
    web["dns"]["photos.example"] = ["93.184.216.34"]
    web["responses"]["photos.example"] = FakeResponse(200, {"Content-Length": str(len(data))}, data)
    raw, rgb = load_reference_image("https://photos.example/me.png")
    assert raw == data and rgb.shape == (80, 96, 3)
    assert web["connected"] == [("photos.example", "93.184.216.34")]


def test_a_name_with_any_private_address_is_refused(web):
    web["dns"]["rebind.example"] = ["93.184.216.34", "127.0.0.1"]
    refused("https://rebind.example/me.png", "URL must point to a public address")
    assert web["connected"] == []


def test_redirect_to_a_private_target_is_refused(web):
    web["dns"].update({"photos.example": ["93.184.216.34"], "internal.example": ["10.1.2.3"]})
    web["responses"]["photos.example"] = FakeResponse(302, {"Location": "https://internal.example/secret"})
    refused("https://photos.example/me.png", "URL must point to a public address")
    web["responses"]["photos.example"] = FakeResponse(302, {"Location": "http://93.184.216.34/me.png"})
    refused("https://photos.example/me.png", "URLs must use https")
    assert {host for host, _ in web["connected"]} == {"photos.example"}


def test_redirect_loops_are_bounded(web):
    web["dns"]["loop.example"] = ["93.184.216.34"]
    web["responses"]["loop.example"] = FakeResponse(301, {"Location": "/again"})
    refused("https://loop.example/start", "URL redirected more than 3 times")
    assert len(web["connected"]) == ref.MAX_REDIRECTS + 1


def test_fetch_size_status_and_content_are_checked(web):
    web["dns"]["photos.example"] = ["93.184.216.34"]
    web["responses"]["photos.example"] = FakeResponse(200, {"Content-Length": str(ref.MAX_BYTES + 1)})
    refused("https://photos.example/a", "must be at most 10 MB")
    web["responses"]["photos.example"] = FakeResponse(200, {}, b"x" * (ref.MAX_BYTES + 1))  # no length declared
    refused("https://photos.example/a", "must be at most 10 MB")
    web["responses"]["photos.example"] = FakeResponse(404)
    refused("https://photos.example/a", "URL answered HTTP 404")
    web["responses"]["photos.example"] = FakeResponse(200, {}, b"<html>not an image</html>")
    refused("https://photos.example/a", "is not a readable image")
    web["responses"]["photos.example"] = FakeResponse(200, {}, encoded("GIF"))
    refused("https://photos.example/a", "must be PNG, JPEG or WebP, got GIF")
