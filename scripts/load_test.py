#!/usr/bin/env python
"""Load and fault test through the local endpoint API (see docs/BENCHMARK.md#load-test): by default
a local endpoint with `--workers` worker processes running the handler under the runpod SDK's loop."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from benchmark.client import EndpointClient
from benchmark.load import LoadPlan, LoadReport, run_load
from endpoint.app import ServerSettings
from endpoint.background import BackgroundEndpoint
from endpoint.pool import DEFAULT_HANDLER, PoolSettings, worker_command


async def _run(base_url: str, api_key: str | None, plan: LoadPlan) -> LoadReport:
    async with EndpointClient(base_url, api_key, request_timeout_s=30, max_retries=3) as client:
        return await run_load(client, plan)


def _environment(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            parser.error(f"--worker-env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--handler", default=DEFAULT_HANDLER,
                       help="serve this module:attr on 127.0.0.1 with local workers (default %(default)s)")
    where.add_argument("--base-url", help="a running endpoint, including its id (then RUNPOD_API_KEY if needed)")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes (default %(default)s)")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the local workers, e.g. CONCURRENCY=4 (repeatable)")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8, help="jobs the client keeps in flight")
    parser.add_argument("--bad-every", type=int, default=LoadPlan.bad_every, help="every n-th job has a bad input")
    parser.add_argument("--cancel-every", type=int, default=LoadPlan.cancel_every,
                        help="every n-th job is cancelled after submission")
    args = parser.parse_args(argv)
    if not 1 <= args.jobs <= 10_000 or not 1 <= args.concurrency <= 256 or not 1 <= args.workers <= 16:
        parser.error("--jobs must be 1..10000, --concurrency 1..256 and --workers 1..16")
    if args.bad_every < 1 or args.cancel_every < 1:
        parser.error("--bad-every and --cancel-every must be at least 1")
    plan = LoadPlan(jobs=args.jobs, concurrency=args.concurrency, bad_every=args.bad_every,
                    cancel_every=args.cancel_every)
    with ExitStack() as stack:
        if args.base_url:
            base_url, api_key = args.base_url, os.environ.get("RUNPOD_API_KEY")
        else:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="load-test-workers-")))
            pool = PoolSettings(command=worker_command(args.handler), workers=args.workers, log_dir=logs,
                                env=_environment(args.worker_env, parser))
            server = stack.enter_context(BackgroundEndpoint(ServerSettings(), pool))
            server.wait_for_workers(args.workers)
            base_url, api_key = f"{server.base_url}/local", None
        report = asyncio.run(_run(base_url, api_key, plan))
    print(json.dumps(report.to_json(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
