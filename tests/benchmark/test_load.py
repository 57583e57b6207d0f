"""The load and fault run at a small scale: every job ends as its kind must, nothing is lost."""

from __future__ import annotations

import asyncio

from benchmark.client import EndpointClient
from benchmark.load import BAD, CANCEL, GOOD, LoadPlan, run_load
from endpoint.background import BackgroundEndpoint
from tests.conftest import API_KEY


def test_load_run_loses_nothing(endpoint: BackgroundEndpoint) -> None:
    plan = LoadPlan(jobs=24, concurrency=6, bad_every=5, cancel_every=4, image_counts=(1, 3))

    async def go():  # type: ignore[no-untyped-def]
        async with EndpointClient(f"{endpoint.base_url}/local", API_KEY) as client:
            return await run_load(client, plan)

    report = asyncio.run(go())
    kinds = [plan.kind(i) for i in range(plan.jobs)]
    assert report.ok, report.problems
    counts = report.counts
    assert counts["submitted"] == plan.jobs
    assert counts["good_completed"] == kinds.count(GOOD)
    assert counts["bad_failed_cleanly"] == kinds.count(BAD)
    assert counts["cancelled"] + counts["cancel_lost_race"] == kinds.count(CANCEL)
    assert counts["cancelled"] >= 1
    assert report.health["jobs"]["inQueue"] == report.health["jobs"]["inProgress"] == 0
