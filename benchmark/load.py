"""Load and fault run: many mixed jobs through the endpoint; every job must end as expected.

Good jobs must complete with all their images, bad inputs must fail with an `invalid_input`
error, cancelled jobs must end CANCELLED (or COMPLETED, whole, if they won the race), no job may
be lost (stuck or unknown) and no image delivered twice. Inputs use only the real worker's fields.
Against the local endpoint it also samples each worker's resident memory (/health `local`) as
the jobs finish, to show whether it stays flat.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from benchmark.client import EndpointClient
from benchmark.jobs import JobOutcome, follow, submit

GOOD, BAD, CANCEL = "good", "bad", "cancel"
BAD_INPUTS: list[dict[str, Any]] = [
    {"width": 100},  # not a multiple of 16
    {"num_images": 0},
    {"num_images": 17},
    {"prompt": ""},
]


@dataclass(frozen=True)
class LoadPlan:
    jobs: int = 50
    concurrency: int = 8
    bad_every: int = 7  # every n-th job has a bad input
    cancel_every: int = 9  # every n-th job is cancelled shortly after submission
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (128, 64), (64, 128))
    image_counts: tuple[int, ...] = (1, 2, 4)
    steps: int = 2
    cancel_after_s: float = 0.05
    job_timeout_s: float = 120.0
    poll_interval_s: float = 0.1
    seed: int = 0

    def kind(self, i: int) -> str:
        if i % self.bad_every == self.bad_every - 1:
            return BAD
        if i % self.cancel_every == self.cancel_every - 1:
            return CANCEL
        return GOOD

    def job_input(self, i: int, rng: random.Random) -> dict[str, Any]:
        width, height = rng.choice(self.sizes)
        job = {"action": "generate", "prompt": f"load test job {i}", "num_images": rng.choice(self.image_counts),
               "width": width, "height": height, "steps": self.steps, "seed": i, "output_format": "jpeg"}
        if self.kind(i) == BAD:
            job.update(BAD_INPUTS[(i // self.bad_every) % len(BAD_INPUTS)])
        return job


@dataclass
class LoadReport:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ["submitted", "good_completed", "bad_failed_cleanly", "cancelled", "cancel_lost_race", "problems"], 0))
    problems: list[str] = field(default_factory=list)
    health: dict[str, Any] | None = None
    seconds: float = 0.0
    worker_rss_mb: list[dict[str, Any]] = field(default_factory=list)  # samples: jobs ended so far, MB per worker

    @property
    def ok(self) -> bool:
        return not self.problems and self.counts["submitted"] > 0

    def problem(self, message: str) -> None:
        self.problems.append(message)
        self.counts["problems"] += 1

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts, "problems": self.problems, "health": self.health,
                "seconds": round(self.seconds, 2), "worker_rss_mb": self.worker_rss_mb}


def _complete(outcome: JobOutcome, job_input: dict[str, Any]) -> bool:
    return (outcome.status == "COMPLETED" and not outcome.failures
            and sorted(outcome.image_arrival_ms) == list(range(job_input["num_images"])))


def check(kind: str, outcome: JobOutcome, job_input: dict[str, Any], report: LoadReport) -> None:
    """Count the outcome, or record why it is not what this kind of job must end as."""
    label = f"job {outcome.id} ({kind})"
    if outcome.duplicate_images:
        report.problem(f"{label} delivered {outcome.duplicate_images} image(s) twice")
    if outcome.status is None:
        report.problem(f"{label} lost: {outcome.failures}")
    elif kind == GOOD and _complete(outcome, job_input):
        report.counts["good_completed"] += 1
    elif kind == BAD and outcome.status == "FAILED" and any(
        str(f["reason"]).startswith("invalid_input") for f in outcome.failures
    ):
        report.counts["bad_failed_cleanly"] += 1
    elif kind == CANCEL and outcome.status == "CANCELLED":
        report.counts["cancelled"] += 1
    elif kind == CANCEL and _complete(outcome, job_input):
        report.counts["cancel_lost_race"] += 1
    else:
        report.problem(f"{label} ended {outcome.status} with {len(outcome.image_arrival_ms)} images: "
                       f"{outcome.failures}")


async def run_load(client: EndpointClient, plan: LoadPlan) -> LoadReport:
    report = LoadReport()
    rng = random.Random(plan.seed)
    inputs = [plan.job_input(i, rng) for i in range(plan.jobs)]
    slots = asyncio.Semaphore(plan.concurrency)
    t0 = time.monotonic()
    health = await client.health()
    before = health.get("jobs", {})
    sample_every = max(1, plan.jobs // 4)
    ended = 0
    report.worker_rss_mb.append(_rss_sample(0, health))

    async def one(i: int) -> None:
        async with slots:
            kind = plan.kind(i)
            outcome = await submit(client, inputs[i], time.monotonic())
            if outcome.id is None:
                report.problem(f"job {i} not accepted: {outcome.failures}")
                return
            report.counts["submitted"] += 1
            if kind == CANCEL:
                await asyncio.sleep(plan.cancel_after_s)
                await client.cancel(outcome.id)
            await follow(client, outcome, time.monotonic(), plan.job_timeout_s, plan.poll_interval_s)
            check(kind, outcome, inputs[i], report)
        nonlocal ended
        ended += 1
        if ended % sample_every == 0 and ended < plan.jobs:
            report.worker_rss_mb.append(_rss_sample(ended, await client.health()))

    await asyncio.gather(*(one(i) for i in range(plan.jobs)))
    report.seconds = time.monotonic() - t0
    report.health = await client.health()
    report.worker_rss_mb.append(_rss_sample(plan.jobs, report.health))
    jobs = report.health.get("jobs", {})
    if jobs.get("inQueue") or jobs.get("inProgress"):
        report.problem(f"endpoint still busy after every job ended: {jobs}")
    # The server's own counters must agree (valid when nothing else uses the endpoint meanwhile).
    completed = report.counts["good_completed"] + report.counts["cancel_lost_race"]
    if jobs.get("completed", 0) - before.get("completed", 0) != completed:
        report.problem(f"endpoint counted {jobs.get('completed', 0) - before.get('completed', 0)} completed, "
                       f"clients saw {completed}")
    if jobs.get("failed", 0) - before.get("failed", 0) != report.counts["bad_failed_cleanly"]:
        report.problem(f"endpoint counted {jobs.get('failed', 0) - before.get('failed', 0)} failed, "
                       f"clients saw {report.counts['bad_failed_cleanly']}")
    return report


def _rss_sample(jobs_ended: int, health: dict[str, Any]) -> dict[str, Any]:
    """Each worker's resident memory, when the endpoint reports it (the local one does)."""
    workers = (health.get("local") or {}).get("workers") or []
    return {"jobs_ended": jobs_ended, "mb": {w.get("id"): w.get("rss_mb") for w in workers if isinstance(w, dict)}}
