"""Benchmark the scheduler in-process: latency of jobs that meet other jobs on one worker.

    .venv/bin/python -m scripts.bench_scheduling                     # the issue's scenarios (~2-4 min on 2 cores)
    .venv/bin/python -m scripts.bench_scheduling --only preempt --repeats 3
    .venv/bin/python -m scripts.bench_scheduling --baseline tmp/benchmarks/scheduling-<before>.json

Jobs go through `handler.handler(job)` (the async generator RunPod calls), several at once on one
event loop, as the SDK runs them with concurrency_modifier > 1; only the public job input is used,
so the same file runs against an older worker (how docs/BENCHMARKS.md measured "before"). Each
scenario's figures are ratios within one run, against solo runs of the same jobs measured in the
same run (medians over --repeats, after one unrecorded pass per size):

1. `preempt`: a 1-image job submitted 0.3 of the way into an 8-image job of the same size:
   its latency / its solo latency (goal <= 1.5), and the 8-image job's total / (its solo time +
   the 1-image solo time) (goal <= 1.3).
2. `wizard`: two 8-image jobs rendering, then a third person's 3 concurrent 1-image jobs: the time
   until all 3 are delivered / the same 3 jobs on an idle worker (goal <= 2).
3. `stream`: an 8-image job under a steady stream of 1-image jobs (one every 2 solo 1-image
   latencies: half the worker's capacity): its total / the bound the scheduler states, goal <= 1.
   The bound: its solo time, plus the solo time of each job arriving within WORK_WEIGHT × its
   work W after it (W in lone-row calls, 8 solo 1-image times, is at least the scheduler's
   estimate), plus one call running.
5. `poisson`: a seeded Poisson arrival of 1- and 8-image jobs at --poisson-size (256², where batching
   pays on a CPU): images/s over the whole run and p50/p95 latency per job size. --rate fixes the
   arrival rate (jobs/s) so that two runs (before/after) see the same arrivals; by default it is
   --load times the capacity measured by a solo 8-image job.

Prints a table and writes JSON to tmp/benchmarks/scheduling-<timestamp>.json; with --baseline, also
the ratios of this run's figures to that run's. Not a test: figures depend on the machine.
`scripts/gpu_check.py` runs `preempt` at 1024² and `poisson` on a GPU with these same functions.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RUNPOD_LOG_LEVEL", "ERROR")

PROMPT = "a lighthouse on a cliff at dusk"
SCENARIOS = ("preempt", "wizard", "stream", "poisson")
RunJob = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]
_job_ids = itertools.count()


def job_input(images: int, size: int, steps: int, seed: int) -> dict[str, Any]:
    """The users' fast mode at `size`: the simple workflow, a small JPEG (encoding stays cheap)."""
    return {"prompt": PROMPT, "num_images": images, "width": size, "height": size, "steps": steps,
            "workflow": "z-image-simple", "seed": seed, "output_format": "jpeg", "output_quality": 75}


async def timed_job(run: RunJob, images: int, size: int, steps: int, delay_s: float = 0.0) -> dict[str, Any]:
    """One job through the handler, submitted `delay_s` from now: its latency (submit to summary)."""
    await asyncio.sleep(delay_s)
    started = time.perf_counter()
    delivered = 0
    summary: dict[str, Any] = {}
    async for chunk in run({"id": f"sched-{next(_job_ids)}", "input": job_input(images, size, steps, 1000)}):
        if "error" in chunk or "image_error" in chunk:
            raise RuntimeError(f"benchmark job failed: {chunk}")
        delivered += "image" in chunk
        summary = chunk.get("summary", summary)
    if delivered != images:
        raise RuntimeError(f"{delivered} of {images} images delivered")
    return {"images": images, "submitted_s": started, "latency_s": time.perf_counter() - started,
            "batch_sizes": summary.get("batch_sizes")}


async def median_of(repeats: int, scenario: Callable[[], Awaitable[dict[str, float]]]) -> dict[str, float]:
    """Each figure's median over `repeats` runs of the scenario (one after another)."""
    runs = [await scenario() for _ in range(repeats)]
    return {key: round(statistics.median(run[key] for run in runs), 4) for key in runs[0]}


async def solo(run: RunJob, images: int, size: int, steps: int, repeats: int) -> float:
    return (await median_of(repeats, lambda: _latency(run, images, size, steps)))["latency_s"]


async def _latency(run: RunJob, images: int, size: int, steps: int) -> dict[str, float]:
    return {"latency_s": (await timed_job(run, images, size, steps))["latency_s"]}


async def preempt(run: RunJob, size: int, steps: int, repeats: int) -> dict[str, float]:
    """Point 1: a 1-image job 0.3 of the way into an 8-image job."""
    one, eight = await solo(run, 1, size, steps, repeats), await solo(run, 8, size, steps, repeats)

    async def mixed() -> dict[str, float]:
        big, small = await asyncio.gather(timed_job(run, 8, size, steps), timed_job(run, 1, size, steps, 0.3 * eight))
        return {"one_image_s": small["latency_s"], "eight_images_s": big["latency_s"]}

    together = await median_of(repeats, mixed)
    return {"solo_one_image_s": round(one, 4), "solo_eight_images_s": round(eight, 4), **together,
            "one_image_ratio": round(together["one_image_s"] / one, 3),
            "eight_images_ratio": round(together["eight_images_s"] / (eight + one), 3)}


async def wizard(run: RunJob, size: int, steps: int, repeats: int) -> dict[str, float]:
    """Point 2: two 8-image profile sets rendering, then one person's 3 concurrent base images."""
    eight = await solo(run, 8, size, steps, 1)

    async def three(delay_s: float) -> float:
        await asyncio.sleep(delay_s)
        started = time.perf_counter()
        await asyncio.gather(*(timed_job(run, 1, size, steps) for _ in range(3)))
        return time.perf_counter() - started

    async def alone() -> dict[str, float]:
        return {"all_three_s": await three(0.0)}

    async def loaded() -> dict[str, float]:
        *_, all_three = await asyncio.gather(timed_job(run, 8, size, steps), timed_job(run, 8, size, steps),
                                             three(0.3 * eight))
        return {"all_three_s": all_three}

    idle, busy = await median_of(repeats, alone), await median_of(repeats, loaded)
    return {"solo_eight_images_s": round(eight, 4), "three_alone_s": idle["all_three_s"],
            "three_under_load_s": busy["all_three_s"], "ratio": round(busy["all_three_s"] / idle["all_three_s"], 3)}


async def stream(run: RunJob, size: int, steps: int, repeats: int, work_weight: float) -> dict[str, float]:
    """Point 3: an 8-image job under 1-image jobs arriving every 2 solo 1-image latencies, until it
    is done, against the bound (module docstring; one solo 1-image time bounds the running call)."""
    one, eight = await solo(run, 1, size, steps, repeats), await solo(run, 8, size, steps, repeats)
    interval = 2 * one

    async def under_stream() -> dict[str, float]:
        big = asyncio.ensure_future(timed_job(run, 8, size, steps))
        small: list[asyncio.Future] = []
        started = time.perf_counter()
        while not big.done():
            small.append(asyncio.ensure_future(timed_job(run, 1, size, steps)))
            await asyncio.wait([big], timeout=interval)
        done, smalls = await big, await asyncio.gather(*small)
        in_window = sum(1 for job in smalls if job["submitted_s"] - started < work_weight * 8 * one)
        bound = eight + in_window * one + one
        return {"eight_images_s": done["latency_s"], "bound_s": bound, "stream_jobs": len(smalls),
                "stream_p50_s": statistics.median(job["latency_s"] for job in smalls)}

    figures = await median_of(repeats, under_stream)
    return {"solo_one_image_s": round(one, 4), "solo_eight_images_s": round(eight, 4),
            "interval_s": round(interval, 4), **figures,
            "ratio_to_bound": round(figures["eight_images_s"] / figures["bound_s"], 3)}


def poisson_arrivals(jobs: int, rate: float, share_of_eights: float, seed: int) -> list[tuple[float, int]]:
    """(arrival second, images) for `jobs` jobs: exponential gaps at `rate` jobs/s, 8 images with
    probability `share_of_eights`, else 1. The same seed gives the same arrivals on any worker."""
    generator = random.Random(seed)
    clock, arrivals = 0.0, []
    for _ in range(jobs):
        arrivals.append((round(clock, 4), 8 if generator.random() < share_of_eights else 1))
        clock += generator.expovariate(rate)
    return arrivals


async def poisson(run: RunJob, size: int, steps: int, jobs: int, share_of_eights: float, load: float,
                  rate: float | None, seed: int) -> dict[str, Any]:
    """Point 5: throughput and latency per job size under a Poisson mix."""
    if rate is None:  # `load` times the worker's capacity, as one solo 8-image job measures it
        capacity = 8 / await solo(run, 8, size, steps, 1)
        rate = load * capacity / (1 + 7 * share_of_eights)
    arrivals = poisson_arrivals(jobs, rate, share_of_eights, seed)
    started = time.perf_counter()
    results = await asyncio.gather(*(timed_job(run, images, size, steps, at) for at, images in arrivals))
    wall = time.perf_counter() - started
    figures: dict[str, Any] = {"rate_jobs_per_s": round(rate, 4), "jobs": jobs, "wall_s": round(wall, 3),
                               "images": sum(images for _, images in arrivals)}
    figures["images_per_s"] = round(figures["images"] / wall, 3)
    for images in (1, 8):
        latencies = sorted(job["latency_s"] for job in results if job["images"] == images)
        if latencies:
            figures[f"{images}_image_jobs"] = len(latencies)
            figures[f"{images}_image_p50_s"] = round(statistics.median(latencies), 3)
            figures[f"{images}_image_p95_s"] = round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3)
    return figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="side of scenarios 1-3 (the issue's 512)")
    parser.add_argument("--poisson-size", type=int, default=256, help="side of the Poisson mix")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per scenario (medians)")
    parser.add_argument("--only", type=lambda text: text.split(","), default=list(SCENARIOS),
                        help=f"comma-separated scenarios of {', '.join(SCENARIOS)}")
    parser.add_argument("--jobs", type=int, default=40, help="jobs of the Poisson mix")
    parser.add_argument("--eights", type=float, default=0.25, help="share of 8-image jobs in the Poisson mix")
    parser.add_argument("--load", type=float, default=1.0, help="Poisson arrival rate as a share of capacity")
    parser.add_argument("--rate", type=float, help="Poisson arrival rate in jobs/s (overrides --load)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the Poisson arrivals")
    parser.add_argument("--torch-threads", type=int,
                        help="torch's CPU threads (default: torch's own); 1 keeps ratios stable on a shared machine, "
                             "where busy-waiting OpenMP threads stall whenever another process takes a core")
    parser.add_argument("--baseline", type=Path, help="an earlier run's JSON: print this run's figures against it")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "tmp" / "benchmarks", help="where the JSON goes")
    return parser.parse_args(argv)


async def warm_up(run: RunJob, sizes: set[int], steps: int) -> None:
    """A 1- and an 8-image job per size, untimed: first-call costs (text encoding, kernel setup,
    a compile) stay out of the figures, and the scheduler has timed calls of both row counts."""
    for size in sorted(sizes):
        await timed_job(run, 1, size, steps)
        await timed_job(run, 8, size, steps)


async def run_scenarios(run: RunJob, args: argparse.Namespace) -> dict[str, Any]:
    await warm_up(run, {args.size, args.poisson_size}, args.steps)
    results: dict[str, Any] = {}
    if "preempt" in args.only:
        results["preempt"] = await preempt(run, args.size, args.steps, args.repeats)
    if "wizard" in args.only:
        results["wizard"] = await wizard(run, args.size, args.steps, args.repeats)
    if "stream" in args.only:
        results["stream"] = await stream(run, args.size, args.steps, args.repeats, args.work_weight)
    if "poisson" in args.only:
        results["poisson"] = await poisson(run, args.poisson_size, args.steps, args.jobs, args.eights, args.load,
                                           args.rate, args.seed)
    return results


def print_table(report: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    print(f"\nscheduling benchmark: {report['settings']['size']}² (Poisson {report['settings']['poisson_size']}²), "
          f"{report['settings']['steps']} steps, medians of {report['settings']['repeats']}, device "
          f"{report['machine']['device']}")
    for scenario, figures in report["results"].items():
        print(f"{scenario}:")
        for key, value in figures.items():
            before = (baseline or {}).get("results", {}).get(scenario, {}).get(key)
            against = f"   before {before}  after/before x{value / before:.3f}" if isinstance(before, float) and \
                before else ""
            print(f"  {key:<22} {value}{against}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the scenarios; print the table, write the JSON, return the report (with `path`)."""
    args = parse_args(argv)
    import handler
    from scripts.bench_batching import busy_cpu_s, machine_info, save_report

    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    settings = handler.WORKER.settings
    args.work_weight = getattr(settings, "work_weight", 1.0)  # the stream's bound; a worker before it: 1
    started, (busy_before, own_before) = time.perf_counter(), busy_cpu_s()
    results = asyncio.run(run_scenarios(handler.handler, args))
    busy_after, own_after = busy_cpu_s()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "benchmark": "scheduling", "created": stamp,
        "command": " ".join([".venv/bin/python -m scripts.bench_scheduling", *(argv or sys.argv[1:])]),
        "machine": machine_info(handler),
        "settings": {"size": args.size, "poisson_size": args.poisson_size, "steps": args.steps,
                     "repeats": args.repeats, "scenarios": args.only, "jobs": args.jobs, "eights": args.eights,
                     "load": args.load, "rate": args.rate, "seed": args.seed, "torch_threads": args.torch_threads,
                     "work_weight": args.work_weight,
                     "max_batch_env": settings.max_batch,
                     "batch_wait_ms": settings.batch_wait_ms, "concurrency": settings.concurrency},
        "results": results,
        "duration_s": round(time.perf_counter() - started, 1),
        "cpu_s_this_process": round(own_after - own_before, 1),
        "cpu_s_other_processes": round(max(0.0, (busy_after - busy_before) - (own_after - own_before)), 1),
    }
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    return save_report(report, args.out_dir / f"scheduling-{stamp}.json", lambda: print_table(report, baseline))


if __name__ == "__main__":
    main()
