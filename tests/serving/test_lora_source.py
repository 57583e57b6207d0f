"""serving.lora_source: LORA_DIR names cannot escape, URLs are fetched over real TLS on loopback
within size, time and redirect bounds, and downloads are cached on disk by sha256 (LRU by bytes)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipelines.lora import LoraError
from serving.lora_source import DiskCache, LoraSource, LoraSourceConfig
from tests.serving.conftest import self_signed_certificate

PAYLOAD = os.urandom(4096)
MB = 2**20


def allow_loopback(address: str) -> None:
    """The tests' server is on 127.0.0.1, which the default (public-only) check refuses."""
    assert ipaddress.ip_address(address).is_loopback


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


class Server:
    """Routes: /lora (the payload), /big (declared too big), /undeclared-big (no length, too big),
    /slow (drips), /to-lora, /to-http, /loop (redirects), anything else 404."""

    def __init__(self, port: int) -> None:
        self.base = f"https://localhost:{port}"
        self.hits: list[str] = []


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {"Content-Length": str(len(body))}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            server.hits.append(self.path)
            if self.path == "/lora":
                self._send(200, PAYLOAD)
            elif self.path == "/big":
                self._send(200, b"", {"Content-Length": str(10 * MB)})
            elif self.path == "/undeclared-big":
                self.close_connection = True
                try:
                    self._send(200, os.urandom(2 * MB), {"Connection": "close"})
                except OSError:
                    pass
            elif self.path == "/slow":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(1000):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass
            elif self.path == "/to-lora":
                self._send(302, b"", {"Location": "/lora", "Content-Length": "0"})
            elif self.path == "/to-http":
                self._send(302, b"", {"Location": "http://localhost/lora", "Content-Length": "0"})
            elif self.path == "/loop":
                self._send(302, b"", {"Location": "/loop", "Content-Length": "0"})
            else:
                self._send(404, b"missing")

    return Handler


@pytest.fixture(scope="module")
def https(certificate) -> Iterator[Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), None)  # handler set below, once the port is known
    httpd.daemon_threads = True
    server = Server(httpd.server_address[1])
    httpd.RequestHandlerClass = _handler(server)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def client_context(certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


def config(tmp_path: Path, **changes) -> LoraSourceConfig:
    values = {"lora_dir": tmp_path / "loras", "allow_urls": True, "max_bytes": 1 * MB, "fetch_timeout_s": 5.0,
              "cache_dir": tmp_path / "cache", "cache_max_bytes": 64 * MB}
    values.update(changes)
    (tmp_path / "loras").mkdir(exist_ok=True)
    return LoraSourceConfig(**values)


@pytest.fixture
def source(tmp_path, client_context) -> LoraSource:
    return LoraSource(config(tmp_path), check_address=allow_loopback, context=client_context)


def refused(source: LoraSource, path: str, rule: str) -> None:
    with pytest.raises(LoraError) as caught:
        source.resolve(path)
    assert caught.value.rule.startswith(rule), caught.value.rule


# -- https ---------------------------------------------------------------------------------------
def test_url_download_then_disk_cache_hit(source, https):
    first = source.resolve(f"{https.base}/lora")
    assert first.sha256 == hashlib.sha256(PAYLOAD).hexdigest() and first.read() == PAYLOAD
    assert first.cache_hit is False
    requests = len(https.hits)
    again = LoraSource(source.config, check_address=allow_loopback).resolve(f"{https.base}/lora")  # a new worker
    assert again.cache_hit is True and again.read() == PAYLOAD and again.sha256 == first.sha256
    assert len(https.hits) == requests  # no second download


def test_default_check_refuses_loopback_before_connecting(tmp_path, https, client_context):
    default = LoraSource(config(tmp_path), context=client_context)
    requests = len(https.hits)
    refused(default, f"{https.base}/lora", "URL must point to a public address")
    refused(default, f"https://127.0.0.1:{https.base.rsplit(':', 1)[1]}/lora", "URL must point to a public address")
    assert len(https.hits) == requests


def test_certificate_is_verified(tmp_path, https):
    untrusting = LoraSource(config(tmp_path), check_address=allow_loopback)  # the system CAs only
    refused(untrusting, f"{https.base}/lora", "URL could not be fetched")


@pytest.mark.parametrize("route", ["/big", "/undeclared-big"])
def test_size_limit(source, https, route):
    refused(source, f"{https.base}{route}", "must be at most 1 MB")


def test_time_limit_covers_the_whole_download(tmp_path, https, client_context):
    slow = LoraSource(config(tmp_path, fetch_timeout_s=0.5), check_address=allow_loopback, context=client_context)
    started = time.monotonic()
    refused(slow, f"{https.base}/slow", "URL took more than 0.5 s to fetch")
    assert time.monotonic() - started < 2.0  # a byte every 50 ms never resets the clock


def test_redirects_are_followed_checked_and_bounded(source, https):
    assert source.resolve(f"{https.base}/to-lora").read() == PAYLOAD
    refused(source, f"{https.base}/to-http", "URLs must use https")
    refused(source, f"{https.base}/loop", "URL redirected more than 3 times")
    refused(source, f"{https.base}/nothing-here", "URL answered HTTP 404")


@pytest.mark.parametrize(("url", "rule"), [
    ("http://example.com/a.safetensors", "URLs must use https"),
    ("ftp://example.com/a.safetensors", "URLs must use https"),
    ("https://example.com:99999/a", "is not a valid URL"),
    ("https://no-such-host.invalid/a", "URL host does not resolve"),
])
def test_bad_urls(source, url, rule):
    refused(source, url, rule)


def test_urls_can_be_disabled(tmp_path, https, client_context):
    closed = LoraSource(config(tmp_path, allow_urls=False), check_address=allow_loopback, context=client_context)
    refused(closed, f"{https.base}/lora", "URLs are disabled on this endpoint")


def test_without_a_cache_dir_downloads_stay_in_memory(tmp_path, https, client_context):
    uncached = LoraSource(config(tmp_path, cache_dir=None), check_address=allow_loopback, context=client_context)
    file = uncached.resolve(f"{https.base}/lora")
    assert file.read() == PAYLOAD and file.location is None and file.cache_hit is False


# -- LORA_DIR ------------------------------------------------------------------------------------
def test_names_inside_lora_dir_resolve_and_hash(source, tmp_path):
    (tmp_path / "loras" / "people").mkdir()
    (tmp_path / "loras" / "people" / "anna.safetensors").write_bytes(b"anna")
    file = source.resolve("people/anna.safetensors")
    assert file.sha256 == hashlib.sha256(b"anna").hexdigest() and file.read() == b"anna"
    (tmp_path / "loras" / "people" / "anna.safetensors").write_bytes(b"anna v2")  # changed: hashed again
    assert source.resolve("people/anna.safetensors").sha256 == hashlib.sha256(b"anna v2").hexdigest()


@pytest.mark.parametrize(("name", "rule"), [
    ("../secret.safetensors", "must be a file name inside LORA_DIR"),
    ("people/../../secret.safetensors", "must be a file name inside LORA_DIR"),
    ("/etc/passwd.safetensors", "must be a file name inside LORA_DIR"),
    ("~/x.safetensors", "must be a file name inside LORA_DIR"),
    ("..\\secret.safetensors", "must be a file name inside LORA_DIR"),
    ("./a.safetensors", "must be a file name inside LORA_DIR"),
    ("", "must be a file name inside LORA_DIR"),
    ("model.ckpt", "must be a .safetensors file"),
    ("absent.safetensors", "no such file in LORA_DIR"),
])
def test_names_that_leave_or_miss_lora_dir_are_refused(source, tmp_path, name, rule):
    (tmp_path / "secret.safetensors").write_bytes(b"outside")
    refused(source, name, rule)


def test_symlinks_may_not_escape_lora_dir(source, tmp_path):
    (tmp_path / "secret.safetensors").write_bytes(b"outside")
    (tmp_path / "loras" / "inside.safetensors").write_bytes(b"inside")
    (tmp_path / "loras" / "escape.safetensors").symlink_to(tmp_path / "secret.safetensors")
    (tmp_path / "loras" / "alias.safetensors").symlink_to(tmp_path / "loras" / "inside.safetensors")
    refused(source, "escape.safetensors", "must be a file name inside LORA_DIR")
    assert source.resolve("alias.safetensors").read() == b"inside"


def test_lora_dir_files_have_the_size_limit(tmp_path, client_context):
    small = LoraSource(config(tmp_path, max_bytes=10), check_address=allow_loopback)
    (tmp_path / "loras" / "big.safetensors").write_bytes(b"x" * 11)
    refused(small, "big.safetensors", "must be at most")


def test_names_need_lora_dir(tmp_path):
    refused(LoraSource(config(tmp_path, lora_dir=None)), "a.safetensors", "LORA_DIR is not set on this endpoint")


# -- the disk cache ------------------------------------------------------------------------------
def test_disk_cache_evicts_least_recently_used_down_to_its_bytes(tmp_path):
    cache = DiskCache(tmp_path / "cache", max_bytes=250)
    for index, url in enumerate(["u0", "u1"]):
        cache.store(url, bytes([index]) * 100)
        time.sleep(0.01)  # distinct mtimes
    assert cache.lookup("u0").cache_hit  # u0 used again: u1 is now the oldest
    time.sleep(0.01)
    cache.store("u2", b"\x02" * 100)
    assert cache.lookup("u1") is None
    assert cache.lookup("u0").read() == b"\x00" * 100 and cache.lookup("u2").read() == b"\x02" * 100
    assert cache.total_bytes() == 200


def test_same_content_under_two_urls_is_stored_once(tmp_path):
    cache = DiskCache(tmp_path / "cache", max_bytes=1000)
    first, second = cache.store("a", b"same"), cache.store("b", b"same")
    assert first.sha256 == second.sha256 and cache.total_bytes() == 4
    assert cache.lookup("b").location == first.location
