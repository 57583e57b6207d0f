"""serving.input_image: everything from outside is bounded and checked before it is used (shown
here for the reference photo; init and mask images take the same path, tests/serving/test_init_image.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving import public_fetch
from serving import input_image as ref
from serving.errors import JobError
from serving.public_fetch import FetchError, check_public_address
from serving.input_image import REFERENCE, decode_image, load_image
from tests.serving.conftest import self_signed_certificate

INVALID = "invalid_reference: reference_image: "


def load_reference_image(value: str) -> tuple[bytes, np.ndarray]:
    return load_image(value, REFERENCE)


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
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


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
    with pytest.raises(FetchError, match="URL must point to a public address"):
        check_public_address(address)


@pytest.mark.parametrize(
    "address",  # IPv6 forms that reach a private IPv4 through a translator
    ["64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1", "2002:7f00:1::", "2002:a9fe:a9fe::1", "::127.0.0.1"],
)
def test_ipv6_wrapping_a_private_ipv4_is_refused(address):
    with pytest.raises(FetchError, match="URL must point to a public address"):
        check_public_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::5db8:d822"])
def test_public_addresses_pass(address):
    check_public_address(address)


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1/a.png", "https://localhost/a.png", "https://10.0.0.1/a.png",
            "https://169.254.169.254/latest/meta-data/", "https://[::1]/a.png", "https://[::ffff:10.0.0.1]/a.png"])
def test_urls_to_private_targets_are_refused_before_connecting(url, monkeypatch):
    monkeypatch.setattr(public_fetch, "_PinnedHTTPSConnection", lambda *a, **k: pytest.fail("connected"))
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
        def __init__(self, host, address, port, deadline, context=None):
            self.host, self.address = host, address
            state["connected"].append((host, address))

        def request(self, method, path, headers):
            self.path = path

        def getresponse(self):
            return state["responses"][self.host]

        def close(self):
            pass

    monkeypatch.setattr(public_fetch.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(public_fetch, "_PinnedHTTPSConnection", Connection)
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


# -- fetching from real HTTPS servers on loopback -------------------------------------------------
@dataclass
class Host:
    """An HTTPS server on 127.0.0.1. Paths: /photo.png answers at once; /drip-body and /drip-headers
    send one byte per `drip_s` until `release` is set; /length/<value> declares that Content-Length."""

    url: str
    photo: bytes
    drip_s: float = 0.2
    release: threading.Event = field(default_factory=threading.Event)
    dripping: threading.Event = field(default_factory=threading.Event)  # a drip has started

    def drip(self, wfile: Any, data: bytes) -> None:
        self.dripping.set()
        for byte in data:
            if self.release.wait(self.drip_s):
                return
            wfile.write(bytes([byte]))
            wfile.flush()


def _host_handler(host: Host) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(host.photo)}\r\n\r\n".encode()
            with contextlib.suppress(OSError):
                if self.path == "/photo.png":
                    self.wfile.write(head + host.photo)
                elif self.path == "/drip-body":
                    self.wfile.write(head)
                    host.drip(self.wfile, host.photo)
                elif self.path == "/drip-headers":
                    host.drip(self.wfile, head + host.photo)
                elif self.path.startswith("/length/"):
                    self.wfile.write(
                        f"HTTP/1.1 200 OK\r\nContent-Length: {self.path[8:]}\r\n\r\n".encode() + host.photo
                    )
                self.close_connection = True

    return Handler


@pytest.fixture
def https_host(tmp_path: Path, monkeypatch) -> Iterator[Host]:
    """A real TLS server on loopback, with loopback (only) allowed and its certificate trusted."""
    cert_path, key_path = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)  # type: ignore[arg-type]
    host = Host(f"https://127.0.0.1:{server.server_address[1]}", photo_png())
    server.RequestHandlerClass = _host_handler(host)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    public = public_fetch.check_public_address
    monkeypatch.setattr(
        public_fetch, "check_public_address", lambda address: None if address == "127.0.0.1" else public(address)
    )
    monkeypatch.setattr(public_fetch, "_tls_context", lambda: ssl.create_default_context(cafile=str(cert_path)))
    try:
        yield host
    finally:
        host.release.set()
        server.shutdown()
        server.server_close()


def photo_png() -> bytes:
    """Noise the demo face detector reads as one face (as in tests/test_consistent_mode.py)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(60, 200, (96, 128, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_real_https_host_is_fetched(https_host):
    raw, rgb = load_reference_image(f"{https_host.url}/photo.png")
    assert raw == https_host.photo and rgb.shape == (96, 128, 3)


@pytest.mark.parametrize("path", ["/drip-body", "/drip-headers"])
def test_a_dripping_host_is_cut_off_at_the_total_deadline(https_host, monkeypatch, path):
    """One byte per 0.2 s never trips a per-read timeout; the total deadline (1 s here) stops it."""
    monkeypatch.setattr(ref, "FETCH_TIMEOUT_S", 1.0)
    started = time.monotonic()
    refused(f"{https_host.url}{path}", "URL took more than 1 s to fetch")
    # the deadline plus a drip, not the photo's 100+ s
    assert time.monotonic() - started < 1.0 + 2 * https_host.drip_s + 1.0


@pytest.mark.parametrize(("length", "rule"), [
    ("abc", "URL sent a malformed Content-Length"), ("-5", "URL sent a malformed Content-Length"),
    ("1,2", "URL sent a malformed Content-Length"), (str(10**30), "must be at most 10 MB"),
])
def test_a_malformed_content_length_is_an_invalid_reference(https_host, length, rule):
    refused(f"{https_host.url}/length/{length}", rule)


@pytest.mark.parametrize("url", ["https://exämple.com/a.png", "https://example.com/ä.png", "https://example.com/a b",
                                 "https://example.com/a\r\nX-Injected: 1", "https://a..b/a.png",
                                 f"https://{'a' * 64}.com/"])
def test_urls_that_cannot_be_sent_are_invalid_not_internal(url):
    with pytest.raises(JobError) as caught:
        load_reference_image(url)
    assert caught.value.code == "invalid_reference"


def beside_a_dripping_job(worker: Any, host: Host, slow_input: dict[str, Any],
                          fast_input: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Start the job of `slow_input` (it fetches the host's dripping path), run the job of
    `fast_input` to its end once the drip has begun, then let the host go: both results, and
    whether the slow job was still fetching when the fast one finished."""
    from serving.local_run import collect

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], bool]:
        slow = asyncio.create_task(collect(worker.run_job, {"id": "slow", "input": slow_input}))
        while not host.dripping.is_set():
            await asyncio.sleep(0.02)
        fast = await asyncio.wait_for(collect(worker.run_job, {"id": "fast", "input": fast_input}), 300)
        slow_still_fetching = not slow.done()
        host.release.set()
        return await slow, fast, slow_still_fetching

    return asyncio.run(scenario())


def test_a_dripping_reference_host_does_not_hold_another_consistent_job(handler_module, https_host, monkeypatch):
    """Job A's reference host drips; job B (another host, here the same server's fast path) runs
    to its images while A is still fetching. Then the host lets go and A fails cleanly."""
    monkeypatch.setattr(ref, "FETCH_TIMEOUT_S", 120.0)  # A ends when the test releases the host, not on time
    small = {"prompt": "a portrait", "mode": "consistent", "width": 64, "height": 64, "steps": 2, "seed": 1}
    slow, fast, slow_still_fetching = beside_a_dripping_job(
        handler_module.WORKER, https_host, {**small, "reference_image": f"{https_host.url}/drip-body"},
        {**small, "reference_image": f"{https_host.url}/photo.png"})
    assert fast.get("errors") == [] and len(fast["images"]) == 1, fast
    assert slow_still_fetching
    assert slow["error"].startswith("invalid_reference: reference_image: "), slow
