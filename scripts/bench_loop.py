#!/usr/bin/env python
"""The production loop's cost: time to all 3 wizard base images through the local endpoint (a job
server and a `python handler.py` worker under the runpod SDK's loop) against the same 3 jobs
given to the handler in this process, rounds alternating so both see the same machine load.

Prints per setting the median time to all 3 images, the ratio loop / in process (of the medians,
and the median of each round's ratio to the in-process round after it), and where the loop's time
goes (medians over jobs): the take (submit → a worker took it), the handler's own time (its
summary's `total`), the rest of the execution (the SDK's run-loop tick, planning, stream posts),
and the result post (last stream chunk → result at the server). `--loop-concurrency 4`
adds a loop phase at CONCURRENCY=4, the setting that took the 3 jobs as 2 + 1. The three jobs
start `--spread-ms` apart (default 5: an app's three requests never leave at the same instant;
requests sent from one asyncio loop at once reach the server within a fraction of a millisecond,
and the SDK's first take then holds all three whatever the concurrency).

    python -m scripts.bench_loop --width 512 --height 512 --steps 8 --rounds 5 --loop-concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from endpoint.app import ServerSettings
from endpoint.background import BackgroundEndpoint
from endpoint.pool import PoolSettings, worker_command

PROMPT = "candid portrait photo of a smiling woman in her thirties at a sunny cafe terrace, natural light, 35mm"
JOBS = 3


def job_inputs(args: argparse.Namespace, round_: int) -> list[dict[str, Any]]:
    """The wizard's base step (benchmarks/wizard.json): 3 jobs of 1 image, submitted together."""
    return [{"prompt": PROMPT, "num_images": 1, "width": args.width, "height": args.height, "steps": args.steps,
             "workflow": "auto", "mode": "fast", "seed": 1000 * (round_ + 1) + i, "output_format": "jpeg",
             "output_quality": 90} for i in range(JOBS)]


class LoopPhase:
    """One local endpoint with one worker at a CONCURRENCY, for the whole run."""

    def __init__(self, concurrency: int, log_dir: Path) -> None:
        pool = PoolSettings(command=worker_command(), env={"CONCURRENCY": str(concurrency)}, log_dir=log_dir)
        self.concurrency = concurrency
        self.server = BackgroundEndpoint(ServerSettings(), pool)
        self.rounds: list[dict[str, Any]] = []

    def __enter__(self) -> LoopPhase:
        self.server.__enter__()
        self.server.wait_for_workers(1, timeout_s=600)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(None, None, None)

    async def round(self, inputs: list[dict[str, Any]], spread_s: float) -> dict[str, Any]:
        url = f"{self.server.base_url}/bench/runsync?wait=300000"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            async def runsync(i: int, job_input: dict[str, Any]) -> dict[str, Any]:
                await asyncio.sleep(i * spread_s)
                async with session.post(url, json={"input": job_input}) as response:
                    return await response.json()

            began = time.perf_counter()
            bodies = await asyncio.gather(*(runsync(i, job_input) for i, job_input in enumerate(inputs)))
            wall = time.perf_counter() - began
        jobs = []
        for body in bodies:
            assert body["status"] == "COMPLETED", body.get("error") or body["status"]
            record = self.server.platform.store.get(body["id"])
            summary = body["output"][-1]["summary"]
            jobs.append({"take_ms": body["delayTime"], "execution_ms": body["executionTime"],
                         "handler_ms": summary["timings_ms"]["total"], "batch_sizes": summary["batch_sizes"],
                         "result_post_ms": round((record.finished_at - record.last_chunk_at) * 1000, 1)})
        return {"wall_s": wall, "jobs": jobs}


async def in_process_round(handler_module: Any, inputs: list[dict[str, Any]], round_: int,
                           spread_s: float) -> dict[str, Any]:
    async def run(i: int, job_input: dict[str, Any]) -> list[dict[str, Any]]:
        await asyncio.sleep(i * spread_s)
        return [chunk async for chunk in handler_module.handler({"id": f"inproc-{round_}-{i}", "input": job_input})]

    began = time.perf_counter()
    outputs = await asyncio.gather(*(run(i, job_input) for i, job_input in enumerate(inputs)))
    wall = time.perf_counter() - began
    return {"wall_s": wall, "batch_sizes": [output[-1]["summary"]["batch_sizes"] for output in outputs]}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def summarize(label: str, loop: list[dict[str, Any]], inproc: list[dict[str, Any]]) -> dict[str, Any]:
    jobs = [job for round_ in loop for job in round_["jobs"]]
    loop_wall, inproc_wall = median([r["wall_s"] for r in loop]), median([r["wall_s"] for r in inproc])
    return {
        "setting": label,
        "rounds": len(loop),
        "loop_all_3_s": loop_wall,
        "in_process_all_3_s": inproc_wall,
        "ratio": round(loop_wall / inproc_wall, 3),
        # each loop round against the in-process round right after it: steadier on a shared machine
        "paired_ratio_median": median([a["wall_s"] / b["wall_s"] for a, b in zip(loop, inproc)]),
        "loop_wall_s": [round(r["wall_s"], 3) for r in loop],
        "in_process_wall_s": [round(r["wall_s"], 3) for r in inproc],
        "one_model_call_rounds": sum(all(j["batch_sizes"] == [JOBS] for j in r["jobs"]) for r in loop),
        "median_ms": {key: median([job[key] for job in jobs])
                      for key in ("take_ms", "execution_ms", "handler_ms", "result_post_ms")},
        "median_execution_minus_handler_ms": median([job["execution_ms"] - job["handler_ms"] for job in jobs]),
        "max_take_ms": max(job["take_ms"] for job in jobs),  # the third job of a 2 + 1 take waited ~1000
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spread-ms", type=float, default=5.0, help="between the 3 submissions (default 5)")
    parser.add_argument("--concurrency", type=int, default=8, help="the workers' CONCURRENCY (default 8)")
    parser.add_argument("--loop-concurrency", type=int, action="append", default=[],
                        help="also measure the loop at this CONCURRENCY (repeatable)")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 100 or not 0 <= args.spread_ms <= 1000:
        parser.error("--rounds must be 1..100 and --spread-ms 0..1000")
    spread_s = args.spread_ms / 1000
    import handler  # the in-process side: this process loads the model too

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as logs:
        for concurrency in [args.concurrency, *args.loop_concurrency]:
            loop_rounds, inproc_rounds = [], []
            with LoopPhase(concurrency, Path(logs) / f"c{concurrency}") as phase:
                asyncio.run(phase.round(job_inputs(args, -1), spread_s))  # warm-up, not counted
                asyncio.run(in_process_round(handler, job_inputs(args, -1), -1, spread_s))
                for round_ in range(args.rounds):
                    time.sleep(0.2 + 0.1 * (round_ % 3) / 3)  # rounds start at varied points of the SDK's tick
                    loop_rounds.append(asyncio.run(phase.round(job_inputs(args, round_), spread_s)))
                    inproc_rounds.append(asyncio.run(in_process_round(handler, job_inputs(args, round_), round_,
                                                                      spread_s)))
            results.append(summarize(f"CONCURRENCY={concurrency}, {args.width}x{args.height}, {args.steps} steps, "
                                     f"{args.spread_ms:g} ms apart", loop_rounds, inproc_rounds))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
