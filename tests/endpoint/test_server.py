"""`python handler.py --rp_serve_api`: RunPod's documented way to try a handler over HTTP serves
the local endpoint, as a real process on the demo model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterator

import pytest
import requests

from endpoint.server import API_KEY_ENV

ROOT = Path(__file__).resolve().parents[2]
KEY = "serve-api-key"
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, API_KEY_ENV: KEY}
    log = tmp_path_factory.mktemp("serve_api") / "handler.log"  # a file: a full pipe would block the server
    process = subprocess.Popen(
        [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(port)],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    base = f"http://localhost:{port}/v2/local"  # the default host is localhost
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            assert process.poll() is None, f"handler.py exited {process.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "handler.py --rp_serve_api did not start serving"
            try:
                requests.get(f"{base}/health", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_rp_serve_api_serves_runsync_on_the_given_port(served: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    job = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "seed": 3}
    body = requests.post(f"{served}/runsync", json={"input": job}, headers=auth, timeout=120).json()
    assert body["status"] == "COMPLETED", body
    assert [chunk["image"]["index"] for chunk in body["output"] if "image" in chunk] == [0]
    assert body["output"][-1]["summary"]["images_completed"] == 1
    assert requests.get(f"{served}/health", timeout=5).status_code == 401  # the key from the environment

