"""A real S3 API on loopback (moto server mode), a fault-injecting HTTP proxy in front of it, and a
hung endpoint (accepts connections, never answers)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import contextlib
import http.client
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from serving.storage_config import StorageConfig

ACCESS_KEY = "AKIATESTSTORAGEKEY01"
SECRET_KEY = "sEcReT/storage+test+secret+do+not+log"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FaultProxy:
    """Forwards HTTP to an upstream S3 server, after first answering with scripted faults.

    `faults` is consumed one per request: an int is answered as that HTTP status with an S3
    error body, "drop" closes the connection without an answer. `delay_s` delays every
    forwarded request (to observe overlapping uploads).
    """

    upstream: tuple[str, int]
    faults: list[int | str] = field(default_factory=list)
    delay_s: float = 0.0
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, method: str) -> int:
        return sum(1 for r in self.requests if r.method == method)


_ERROR_CODES = {403: "AccessDenied", 429: "SlowDown", 500: "InternalError", 503: "SlowDown"}


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with proxy.lock:
                proxy.requests.append(Recorded(self.command, self.path, dict(self.headers)))
                fault = proxy.faults.pop(0) if proxy.faults else None
            if fault == "drop":
                self.close_connection = True
                return
            if isinstance(fault, int):
                code = _ERROR_CODES.get(fault, "Error")
                payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           f"<Message>injected</Message></Error>").encode()
                self.send_response(fault)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                return
            time.sleep(proxy.delay_s)
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=10)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("content-length", "transfer-encoding", "connection",
                                        "server", "date"):
                    self.send_header(name, value)
            if self.command == "HEAD":
                self.send_header("Content-Length", response.getheader("Content-Length") or "0")
            else:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            conn.close()

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

    return Handler


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint: str):
    """A plain client used by the tests to set up and inspect buckets independently of the
    module under test."""
    return boto3.session.Session().client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}))


def _new_bucket(s3) -> str:
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(s3) -> str:
    return _new_bucket(s3)


@pytest.fixture
def make_bucket(s3):
    return lambda: _new_bucket(s3)


@pytest.fixture
def config(moto_endpoint: str, bucket: str) -> StorageConfig:
    return StorageConfig(bucket=bucket, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                         endpoint_url=moto_endpoint, key_prefix="z-image", url_ttl_s=3600,
                         connect_timeout_s=2.0, read_timeout_s=5.0)


@contextlib.contextmanager
def running_fault_proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the moto server, on 127.0.0.1 at an ephemeral port."""
    host, port = moto_endpoint.removeprefix("http://").split(":")
    fp = FaultProxy(upstream=(host, int(port)))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(fp))
    server.daemon_threads = True
    fp.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fp
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    with running_fault_proxy(moto_endpoint) as fp:
        yield fp


@dataclass
class HungServer:
    """A storage endpoint that hangs: `url`, and the connections it has accepted (and holds)."""

    url: str
    held: list[socket.socket] = field(default_factory=list)


@contextlib.contextmanager
def running_hung_server() -> Iterator[HungServer]:
    """A TCP server on loopback that accepts every connection and never answers; connections
    are closed when it stops."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = HungServer(f"http://127.0.0.1:{listener.getsockname()[1]}")
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                server.held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join()
        for conn in server.held:
            conn.close()
        listener.close()


@pytest.fixture
def hung_endpoint() -> Iterator[str]:
    with running_hung_server() as server:
        yield server.url


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 (and its key), for the tests' TLS servers on
    loopback; a test's client context trusts it as its CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
