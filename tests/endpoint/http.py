"""A few lines of raw HTTP against a BackgroundEndpoint (the API as any client sees it)."""

from __future__ import annotations

import time
from typing import Any

import requests

from endpoint.background import BackgroundEndpoint
from endpoint.jobs import FINAL_STATUSES
from tests.conftest import API_KEY

ENDPOINT_ID = "test-endpoint"


class Api:
    def __init__(self, server: BackgroundEndpoint, key: str | None = API_KEY) -> None:
        self.base = f"{server.base_url}/{ENDPOINT_ID}"
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, Any] | None = None,
             **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.base}/{path}", json=body, headers={**self.headers, **(headers or {})},
                                timeout=10, **kwargs)

    def submit(self, job_input: Any, **extra: Any) -> str:
        response = self.call("POST", "run", {"input": job_input, **extra})
        response.raise_for_status()
        return response.json()["id"]

    def status(self, job_id: str) -> dict[str, Any]:
        response = self.call("GET", f"status/{job_id}")
        response.raise_for_status()
        return response.json()

    def wait(self, job_id: str, timeout_s: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            body = self.status(job_id)
            if body["status"] in FINAL_STATUSES:
                return body
            assert time.monotonic() < deadline, f"job {job_id} still {body['status']}"
            time.sleep(0.02)

    def wait_for_status(self, job_id: str, status: str, timeout_s: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (body := self.status(job_id))["status"] != status:
            assert time.monotonic() < deadline, f"job {job_id} never {status}: {body['status']}"
            time.sleep(0.01)
        return body


def images_of(output: list[dict[str, Any]]) -> list[int]:
    """Image indices of a job's output chunks, in the order they were yielded (finished images
    stream in any order)."""
    return [chunk["image"]["index"] for chunk in output if "image" in chunk]


def exit_code(server: BackgroundEndpoint, worker_id: str, timeout_s: float = 30) -> int:
    """The exit status of a worker of the server's pool, once it has exited."""
    deadline = time.monotonic() + timeout_s
    while not (codes := [code for exited, code in list(server.pool.exits) if exited == worker_id]):
        assert time.monotonic() < deadline, f"worker {worker_id} did not exit"
        time.sleep(0.05)
    return codes[0]
