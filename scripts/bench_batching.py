"""Benchmark the batching engine in-process, on this machine, with the loaded model.

    .venv/bin/python -m scripts.bench_batching                  # 512x512, 8 steps, 9 repetitions (~1 min on 2 cores)
    .venv/bin/python -m scripts.bench_batching --size 256 --steps 4 --repeats 3

Jobs run through `handler.handler(job)` (the async generator RunPod calls), several at once with
asyncio.gather on one event loop, as the SDK does with concurrency_modifier > 1. Measured, as the
median (p50) over --repeats after one unrecorded warm-up pass:

1. 8 images as one job vs 8 one-image jobs in a row (images/s);
2. 4 concurrent jobs of 2 images vs the same 4 jobs in a row (images/s, batch sizes seen);
3. the streaming 8-image job of (1): time to its first `image` chunk vs to its `summary` chunk.

Prints a table and writes JSON to tmp/benchmarks/batching-<timestamp>.json. Not a test: figures
depend on the machine (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from datetime import datetime, UTC
from pathlib import Path
from typing import Any
from collections.abc import Callable

import psutil

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RUNPOD_LOG_LEVEL", "WARNING")

PROMPT = "a lighthouse on a cliff at dusk"
_job_ids = itertools.count()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image width and height (multiple of 16)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps")
    parser.add_argument("--repeats", type=int, default=9, help="recorded repetitions after one warm-up")
    parser.add_argument("--workflow", default="z-image-simple", choices=["z-image-simple", "z-image-danrisi"])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "tmp" / "benchmarks", help="where the JSON goes")
    return parser.parse_args(argv)


async def run_job(handler, args: argparse.Namespace, num_images: int) -> dict[str, Any]:
    """One job through the handler: seconds to the first image chunk and to the summary chunk."""
    job_input = {"prompt": PROMPT, "num_images": num_images, "width": args.size, "height": args.size,
                 "steps": args.steps, "workflow": args.workflow, "seed": 1000, "output_format": "png"}
    started = time.perf_counter()
    first = total = None
    images = 0
    summary: dict[str, Any] = {}
    async for chunk in handler.handler({"id": f"bench-{next(_job_ids)}", "input": job_input}):
        now = time.perf_counter() - started
        if "error" in chunk or "image_error" in chunk:
            raise RuntimeError(f"benchmark job failed: {chunk}")
        if "image" in chunk:
            images += 1
            first = now if first is None else first
        if "summary" in chunk:
            total, summary = now, chunk["summary"]
    return {"images": images, "first_image_s": first, "total_s": total, "batch_sizes": summary.get("batch_sizes", [])}


async def timed(jobs, concurrent: bool = False) -> tuple[float, list[dict[str, Any]]]:
    """Wall seconds for coroutine factories, run one after another or all at once."""
    started = time.perf_counter()
    if concurrent:
        results = list(await asyncio.gather(*(make() for make in jobs)))
    else:
        results = [await make() for make in jobs]
    return time.perf_counter() - started, results


async def one_pass(handler, args: argparse.Namespace) -> dict[str, tuple[float, list[dict[str, Any]]]]:
    job = lambda n: (lambda: run_job(handler, args, n))  # noqa: E731
    return {
        "one_job_8_images": await timed([job(8)]),
        "8_jobs_1_image_in_a_row": await timed([job(1)] * 8),
        "4_jobs_2_images_concurrent": await timed([job(2)] * 4, concurrent=True),
        "4_jobs_2_images_in_a_row": await timed([job(2)] * 4),
    }


def summarize(passes: list[dict[str, tuple[float, list[dict[str, Any]]]]]) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    for name in passes[0]:
        walls = [p[name][0] for p in passes]
        jobs = passes[0][name][1]
        images = sum(j["images"] for j in jobs)
        p50 = statistics.median(walls)
        scenarios[name] = {
            "jobs": len(jobs), "images": images, "wall_s_p50": round(p50, 3),
            "images_per_s": round(images / p50, 3), "wall_s_min": round(min(walls), 3),
            "wall_s_runs": [round(w, 3) for w in walls],
            "batch_sizes_per_job": [j["batch_sizes"] for j in jobs],
        }
    streaming = [p["one_job_8_images"][1][0] for p in passes]
    first = statistics.median(s["first_image_s"] for s in streaming)
    whole = statistics.median(s["total_s"] for s in streaming)
    rate = lambda a, b: round(scenarios[a]["images_per_s"] / scenarios[b]["images_per_s"], 3)  # noqa: E731
    return {
        "scenarios": scenarios,
        "comparisons": {
            "one_job_vs_in_a_row_speedup": rate("one_job_8_images", "8_jobs_1_image_in_a_row"),
            "concurrent_vs_in_a_row_speedup": rate("4_jobs_2_images_concurrent", "4_jobs_2_images_in_a_row"),
        },
        "streaming_8_images": {
            "images": streaming[0]["images"], "first_image_s_p50": round(first, 3), "whole_job_s_p50": round(whole, 3),
            "first_image_fraction": round(first / whole, 3),
            "first_image_s_runs": [round(s["first_image_s"], 3) for s in streaming],
            "whole_job_s_runs": [round(s["total_s"], 3) for s in streaming],
        },
    }


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds this process used) so far.
    Their growth apart = other processes competing."""
    machine = psutil.cpu_times()
    idle = machine.idle + getattr(machine, "iowait", 0.0)  # iowait exists on Linux only
    own = psutil.Process().cpu_times()
    return sum(machine) - idle, own.user + own.system


def machine_info(handler) -> dict[str, Any]:
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu_model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                     platform.processor())
    worker = handler.WORKER
    return {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_model": cpu_model, "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(worker.engine.device),
        "gpu": torch.cuda.get_device_name(0) if worker.engine.device.type == "cuda" else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "model": worker.engine.identity.id, "demo_model": worker.engine.identity.demo,
    }


def print_table(report: dict[str, Any]) -> None:
    r, s = report["results"], report["settings"]
    print(f"\nbatching benchmark: {s['size']}x{s['size']}, {s['steps']} steps, {s['workflow']}, max batch "
          f"{s['max_batch']}, p50 of {s['repeats']} (device {report['machine']['device']}, "
          f"{report['machine']['torch_threads']} torch threads)")
    print(f"{'scenario':<28} {'jobs':>4} {'images':>6} {'p50 s':>7} {'min s':>7} {'images/s':>9}"
          "  batch sizes seen by each job")
    for name, row in r["scenarios"].items():
        print(f"{name:<28} {row['jobs']:>4} {row['images']:>6} {row['wall_s_p50']:>7.2f} {row['wall_s_min']:>7.2f}"
              f" {row['images_per_s']:>9.2f}"
              f"  {' | '.join(','.join(map(str, b)) for b in row['batch_sizes_per_job'])}")
    c, st = r["comparisons"], r["streaming_8_images"]
    print(f"one job vs in a row: x{c['one_job_vs_in_a_row_speedup']:.2f}   "
          f"concurrent vs in a row: x{c['concurrent_vs_in_a_row_speedup']:.2f}")
    print(f"streaming 8 images: first image {st['first_image_s_p50']:.2f} s, whole job {st['whole_job_s_p50']:.2f} s "
          f"({st['first_image_fraction']:.0%})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table, write the JSON, return the report (with `path`)."""
    args = parse_args(argv)
    import handler
    from pipelines.z_image import BatchSpec

    logging.getLogger("serving").setLevel(logging.WARNING)  # no per-job log line in the table

    machine = machine_info(handler)
    settings = handler.WORKER.settings
    spec = BatchSpec(args.size, args.size, args.steps, 0.0, args.workflow)

    async def run_all() -> list[dict[str, Any]]:
        await one_pass(handler, args)  # warm-up: first-call costs (text encoding, kernel setup) stay out
        return [await one_pass(handler, args) for _ in range(max(1, args.repeats))]

    started, (busy_before, own_before) = time.perf_counter(), busy_cpu_s()
    passes = asyncio.run(run_all())
    busy_after, own_after = busy_cpu_s()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "benchmark": "batching", "created": stamp,
        "command": " ".join([".venv/bin/python", "scripts/bench_batching.py", *(argv or sys.argv[1:])]),
        "machine": machine,
        "settings": {
            "size": args.size, "steps": args.steps, "workflow": args.workflow, "repeats": max(1, args.repeats),
            "warmup_passes": 1, "prompt": PROMPT,
            "max_batch": handler.WORKER.max_batch_for(handler.WORKER.engine, spec),
            "max_batch_env": settings.max_batch, "batch_wait_ms": settings.batch_wait_ms,
            "concurrency": settings.concurrency, "encode_threads": settings.encode_threads,
        },
        "results": summarize(passes),
        "duration_s": round(time.perf_counter() - started, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpu_s_this_process": round(own_after - own_before, 1),
        "cpu_s_other_processes": round(max(0.0, (busy_after - busy_before) - (own_after - own_before)), 1)
        if busy_after else None,
    }
    return save_report(report, args.out_dir / f"batching-{stamp}.json", lambda: print_table(report))


def save_report(report: dict[str, Any], path: Path, print_table: Callable[[], None]) -> dict[str, Any]:
    """Write the JSON, print the table and a warning when other processes shared the machine
    noticeably; the report with its `path` (scripts/bench_scheduling.py reports the same way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_table()
    if (report["cpu_s_other_processes"] or 0) > 0.05 * report["cpu_s_this_process"]:
        print(f"other processes used {report['cpu_s_other_processes']} CPU s during the "
              f"{report['duration_s']} s run (this one {report['cpu_s_this_process']}): compare with care")
    print(f"wrote {path}")
    return {**report, "path": str(path)}


if __name__ == "__main__":
    main()
