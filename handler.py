"""RunPod serverless entry point: load the model once, then serve jobs from it.

    python handler.py                       # on RunPod: the worker loop
    python handler.py --test_input '{"input": {"prompt": "..."}}'   # one local job
    python handler.py                       # locally, with test_input.json in the folder
    python handler.py --rp_serve_api [--rp_api_port 8000] [--rp_api_host localhost] [--workers 1]
                                            # the local RunPod endpoint: a job server, with
                                            # `python handler.py` workers on it (docs/ENDPOINT.md)

Everything but the wiring lives in `serving/` (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import os

# Before any Hugging Face or RunPod import: weights come from local folders only, and the SDK's
# DEBUG default would log whole outputs (base64 images).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

import time  # noqa: E402

# "imports" is what this start paid to import the worker: everything when the handler runs first in its
# interpreter (python handler.py, as on RunPod); next to nothing, truthfully, when its host process had
# already imported torch, diffusers and the rest (the tests, a host that preloads them).
IMPORTS_STARTED = time.perf_counter()

import argparse  # noqa: E402
import sys  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test_input", help="a job as JSON, e.g. '{\"input\": {\"prompt\": \"...\"}}'")
    parser.add_argument("--output_dir", default="outputs", help="where a local run saves its images")
    parser.add_argument("--rp_serve_api", action="store_true", help="serve the local RunPod endpoint")
    parser.add_argument("--rp_api_port", type=int, default=8000, help="its port (default %(default)s)")
    parser.add_argument("--rp_api_host", default="localhost", help="its host (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="its worker processes (default %(default)s)")
    args, _ = parser.parse_known_args(argv)
    return args


if __name__ == "__main__" and (_serve_args := parse_args(sys.argv[1:])).rp_serve_api:
    # The local endpoint's own process loads no model: its workers are `python handler.py`.
    from endpoint.server import serve_handler_api

    serve_handler_api(_serve_args.rp_api_host, _serve_args.rp_api_port, _serve_args.workers)
    sys.exit(0)

import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import runpod.serverless  # noqa: E402

from serving.local_run import run_local_job  # noqa: E402
from serving.sdk_intake import SdkIntake  # noqa: E402
from serving.settings import load_settings  # noqa: E402
from serving.startup_timing import StartupTimer  # noqa: E402
from serving.worker import Worker  # noqa: E402

STARTUP = StartupTimer()
STARTUP.record("imports", (time.perf_counter() - IMPORTS_STARTED) * 1000)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

CONFIG: dict[str, Any] = {}
INTAKE = SdkIntake()  # jobs the SDK took but has not started: an idle GPU's first call waits for them


def request_fresh_worker() -> None:
    """The GPU is broken for good (a CUDA error): the SDK stops this pod after the job and RunPod
    starts a fresh one."""
    CONFIG["refresh_worker"] = True


WORKER = Worker.start(load_settings(), STARTUP, on_fatal=request_fresh_worker, incoming=INTAKE.incoming())


async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The RunPod handler: an async generator streaming one chunk per image, then a summary."""
    INTAKE.started(str(job.get("id")))
    async for chunk in WORKER.run_job(job):
        yield chunk


def report_progress(job: dict[str, Any], payload: dict[str, Any]) -> None:
    """`completed/total` for /status while a job runs: the SDK posts it to the platform (RunPod,
    or the local endpoint). Elsewhere (a local --test_input run, tests calling the handler) there
    is no platform to post to."""
    if _on_runpod():
        runpod.serverless.progress_update(job, payload)


WORKER.progress_sink = report_progress


def concurrency_modifier(current: int) -> int:
    """Jobs one worker holds at once (CONCURRENCY); the engine loop runs their images on the one GPU.
    A constant: the SDK resizes its queue only when no job is in flight (docs/ENDPOINT.md)."""
    return WORKER.settings.concurrency


def _on_runpod() -> bool:
    return bool(os.environ.get("RUNPOD_WEBHOOK_GET_JOB"))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.test_input is None and (_on_runpod() or not Path("test_input.json").is_file()):
        CONFIG.update(handler=handler, concurrency_modifier=concurrency_modifier, return_aggregate_stream=True)
        runpod.serverless.start(CONFIG)
        return 0
    # Local run: the SDK would not iterate a generator handler here, so we run the job ourselves.
    job = json.loads(args.test_input) if args.test_input else json.loads(Path("test_input.json").read_text())
    return asyncio.run(run_local_job(handler, job, Path(args.output_dir)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
