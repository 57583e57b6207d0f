"""The worker side of the protocol over raw HTTP, as the runpod SDK speaks it (bare key, JSON text
with a form content type), for tests of the job server that need no worker process."""

from __future__ import annotations

import json
from typing import Any

import requests

from endpoint.background import BackgroundEndpoint


class ProtocolWorker:
    def __init__(self, server: BackgroundEndpoint, worker_id: str = "w-test", key: str | None = None) -> None:
        self.base = f"{server.base_url}/local"
        self.worker_id = worker_id
        self.headers = {"Authorization": server.endpoint.settings.worker_key if key is None else key}

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(f"{self.base}/{path}", params=params, headers=self.headers, timeout=30)

    def post(self, path: str, body: Any) -> requests.Response:
        headers = {**self.headers, "Content-Type": "application/x-www-form-urlencoded"}
        return requests.post(f"{self.base}/{path}?gpu=test&isStream=false", data=json.dumps(body), headers=headers,
                             timeout=30)

    def take(self, batch_size: int = 1) -> list[dict[str, Any]]:
        """Jobs handed out, [] on 204 (after the server's hold)."""
        if batch_size == 1:
            response = self.get(f"job-take/{self.worker_id}", gpu="test", job_in_progress=0)
        else:
            response = self.get(f"job-take-batch/{self.worker_id}", gpu="test", batch_size=batch_size,
                                job_in_progress=0)
        response.raise_for_status()
        if response.status_code == 204:
            return []
        body = response.json()
        return body if isinstance(body, list) else [body]

    def done(self, job_id: str, result: dict[str, Any]) -> requests.Response:
        return self.post(f"job-done/{self.worker_id}/{job_id}", result)

    def stream(self, job_id: str, chunk: Any) -> requests.Response:
        return self.post(f"job-stream/{self.worker_id}/{job_id}", {"output": chunk})

    def stops(self) -> list[str]:
        response = self.get(f"job-stop/{self.worker_id}", gpu="test")
        response.raise_for_status()
        return [] if response.status_code == 204 else response.json()["jobsToStop"]
