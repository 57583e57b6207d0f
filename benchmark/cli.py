"""Command line of scripts/benchmark_image_generation.py (see docs/BENCHMARK.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import datetime, UTC
from pathlib import Path

from benchmark.bench import Benchmark, BenchmarkError
from benchmark.client import RUNPOD_API_BASE, EndpointClient
from benchmark.config import BenchmarkConfig, load_config
from benchmark.report import format_table, plot, summarize, write_report

DEFAULT_CONFIG = Path("benchmarks/wizard.json")
DEFAULT_OUT_DIR = Path("tmp/benchmarks")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark image generation through the endpoint HTTP API.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="JSON config (default %(default)s)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="endpoint URL including its id, e.g. http://127.0.0.1:8000/v2/local")
    target.add_argument("--endpoint-id", help=f"a RunPod endpoint id ({RUNPOD_API_BASE}/<id>); needs RUNPOD_API_KEY")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--plot", action="store_true", help="also write the latency distributions as PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--repetitions", type=int, help="override the config's repetitions (1..100)")
    return parser.parse_args(argv)


async def _run(bench: Benchmark, client: EndpointClient) -> None:
    async with client:
        await bench.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    if args.repetitions is not None:  # validated again: the run count must stay within limits.max_runs
        config = BenchmarkConfig.model_validate({**config.model_dump(), "repetitions": args.repetitions})
    api_key = os.environ.get("RUNPOD_API_KEY") or None
    if args.endpoint_id and not api_key:
        print("RUNPOD_API_KEY is required with --endpoint-id", file=sys.stderr)
        return 2
    base_url = args.base_url or f"{RUNPOD_API_BASE}/{args.endpoint_id}"
    client = EndpointClient(base_url, api_key, config.limits.request_timeout_s, config.limits.max_retries)
    bench = Benchmark(config, client, show_progress=not args.no_progress)
    started = datetime.now(UTC)
    interrupted = False
    try:
        asyncio.run(_run(bench, client))
    except KeyboardInterrupt:
        interrupted = True  # write what we have
    except BenchmarkError as err:
        print(f"benchmark not started: {err}", file=sys.stderr)
        return 2
    summary = summarize(bench.records)
    report = {
        "config_name": config.name,
        "config": config.model_dump(mode="json"),
        "endpoint": base_url,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "interrupted": interrupted,
        "capabilities": bench.capabilities,
        "skipped": bench.skipped,
        "summary": summary,
        "runs": bench.records,
    }
    path = write_report(args.out_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json", report)
    print(format_table(summary, bench.skipped))
    print(f"report: {path}")
    if args.plot and bench.records:
        print(f"plot: {plot(bench.records, path.with_suffix('.png'))}")
    return 130 if interrupted else 0
