#!/usr/bin/env python
"""Load and fault test through the local endpoint API (see docs/BENCHMARK.md#load-test)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from contextlib import ExitStack


from benchmark.client import EndpointClient
from benchmark.load import LoadPlan, LoadReport, run_load
from endpoint.background import BackgroundEndpoint
from endpoint.loader import DEFAULT_HANDLER, load_handler


async def _run(base_url: str, api_key: str | None, plan: LoadPlan) -> LoadReport:
    async with EndpointClient(base_url, api_key, request_timeout_s=30, max_retries=3) as client:
        return await run_load(client, plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--handler", default=DEFAULT_HANDLER,
                       help="serve this module:attr in-process on 127.0.0.1 (default %(default)s)")
    where.add_argument("--base-url", help="a running endpoint, including its id (then RUNPOD_API_KEY if needed)")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--bad-every", type=int, default=LoadPlan.bad_every, help="every n-th job has a bad input")
    parser.add_argument("--cancel-every", type=int, default=LoadPlan.cancel_every,
                        help="every n-th job is cancelled after submission")
    args = parser.parse_args(argv)
    if not 1 <= args.jobs <= 10_000 or not 1 <= args.concurrency <= 256:
        parser.error("--jobs must be 1..10000 and --concurrency 1..256")
    if args.bad_every < 1 or args.cancel_every < 1:
        parser.error("--bad-every and --cancel-every must be at least 1")
    plan = LoadPlan(jobs=args.jobs, concurrency=args.concurrency, bad_every=args.bad_every,
                    cancel_every=args.cancel_every)
    with ExitStack() as stack:
        if args.base_url:
            base_url, api_key = args.base_url, os.environ.get("RUNPOD_API_KEY")
        else:
            server = stack.enter_context(BackgroundEndpoint(load_handler(args.handler)))
            base_url, api_key = f"{server.base_url}/local", None
        report = asyncio.run(_run(base_url, api_key, plan))
    print(json.dumps(report.to_json(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
