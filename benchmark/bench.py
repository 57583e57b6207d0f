"""Runs a benchmark config against an endpoint: capabilities first, then each permutation's runs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, UTC
from typing import Any

from tqdm import tqdm

from benchmark.client import EndpointClient, EndpointError
from benchmark.config import WIZARD_PROFILE_FROM_BASE, BenchmarkConfig, Permutation, base_step, job_inputs, permutations
from benchmark.jobs import JobOutcome, follow, submit


class BenchmarkError(Exception):
    """The benchmark cannot start (e.g. the endpoint does not answer capabilities)."""


def parse_capabilities(output: Any) -> dict[str, Any]:
    """The capabilities dict, whether the handler returned it or yielded it (aggregate list)."""
    candidates = output if isinstance(output, list) else [output]
    for item in candidates:
        if isinstance(item, dict) and isinstance(item.get("workflows"), list) and isinstance(item.get("modes"), list):
            return item
    raise BenchmarkError("capabilities output has no 'workflows' and 'modes' lists")


def skip_reason(perm: Permutation, capabilities: dict[str, Any]) -> str | None:
    """Why the endpoint cannot serve `perm`, or None."""
    for kind, name in (("workflows", perm.workflow), ("modes", perm.mode)):
        offered = {entry.get("name"): entry for entry in capabilities[kind] if isinstance(entry, dict)}
        entry = offered.get(name)
        if entry is None:
            return f"{kind[:-1]} {name!r} not offered by the endpoint"
        if not entry.get("available"):
            return f"{kind[:-1]} {name!r} unavailable: {entry.get('reason') or 'no reason given'}"
    if perm.strength is not None and not isinstance(capabilities.get("image_to_image"), dict):
        return "image to image not offered by the endpoint"
    limits = capabilities.get("limits") or {}
    for name, limit, value in (("num_images", "num_images", perm.num_images), ("width", "side", perm.width),
                               ("height", "side", perm.height), ("steps", "steps", perm.steps)):
        low, high = _range(limits.get(limit))
        if low is not None and value < low:
            return f"{name} {value} < endpoint limit {low}"
        if high is not None and value > high:
            return f"{name} {value} > endpoint limit {high}"
    max_pixels = limits.get("max_pixels")
    if _is_int(max_pixels) and perm.width * perm.height > max_pixels:
        return f"width x height {perm.width * perm.height} > endpoint limit max_pixels {max_pixels}"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _range(value: Any) -> tuple[int | None, int | None]:
    """A capabilities limit `[low, high]` (the worker's shape); anything else limits nothing."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
        return value[0], value[1]
    return None, None


def run_record(perm: Permutation, repetition: int, outcomes: list[Any], started: str) -> dict[str, Any]:
    """One run: the slowest job decides submit/delay/execution; images count across all jobs."""
    arrivals = sorted(ms for o in outcomes for ms in o.image_arrival_ms.values())
    failures = [f for o in outcomes for f in o.failures]
    expected = perm.jobs * perm.num_images

    def slowest(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return max(known) if len(known) == len(values) and known else None

    return {
        "permutation": perm.key,
        **perm.settings(),
        "repetition": repetition,
        "started_at": started,
        "submit_ms": slowest([o.submit_ms for o in outcomes]),
        "delay_ms": slowest([o.delay_ms for o in outcomes]),
        "execution_ms": slowest([o.execution_ms for o in outcomes]),
        "first_image_ms": arrivals[0] if arrivals else None,
        "all_images_ms": arrivals[-1] if len(arrivals) == expected else None,
        "image_arrival_ms": arrivals,
        "images": len(arrivals),
        "expected_images": expected,
        "failures": failures,
        "ok": not failures and len(arrivals) == expected,
        "jobs_detail": [o.to_json() for o in outcomes],
    }


@dataclass
class Benchmark:
    """State that survives an interruption: whatever ran is in `records`."""

    config: BenchmarkConfig
    client: EndpointClient
    show_progress: bool = True
    capabilities: dict[str, Any] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    async def fetch_capabilities(self) -> dict[str, Any]:
        try:
            body = await self.client.runsync({"action": "capabilities"})
        except EndpointError as err:
            raise BenchmarkError(f"capabilities request failed: {err}") from err
        if body.get("status") != "COMPLETED":
            raise BenchmarkError(f"capabilities job ended {body.get('status')}: {body.get('error', '')}"[:300])
        return parse_capabilities(body.get("output"))

    async def run_jobs(self, inputs: list[dict[str, Any]]) -> list[JobOutcome]:
        """Submit the jobs at once and follow each to its end; times from the first submission."""
        limits = self.config.limits
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(submit(self.client, i, t0) for i in inputs))
        await asyncio.gather(
            *(follow(self.client, o, t0, limits.job_timeout_s, limits.poll_interval_s) for o in outcomes)
        )
        return list(outcomes)

    async def run_once(self, perm: Permutation, repetition: int) -> dict[str, Any]:
        started = datetime.now(UTC).isoformat()
        if perm.scenario == WIZARD_PROFILE_FROM_BASE:
            return await self.run_profile_from_base(perm, repetition, started)
        outcomes = await self.run_jobs(job_inputs(self.config, perm, repetition))
        return run_record(perm, repetition, outcomes, started)

    async def run_profile_from_base(self, perm: Permutation, repetition: int, started: str) -> dict[str, Any]:
        """The base jobs, then the profile set from the first one's image; the record times the
        profile job from its own submission (what the user waits for after choosing) and keeps the
        base step's record under `base`."""
        base_perm = base_step(self.config, perm)
        base_outcomes = await self.run_jobs(job_inputs(self.config, base_perm, repetition))
        base = run_record(base_perm, repetition, base_outcomes, started)
        chosen = base_outcomes[0].first_image
        if chosen is None:
            missing = JobOutcome()
            missing.fail("base_image", f"base job {base_outcomes[0].id} delivered no image 0 to start from")
            record = run_record(perm, repetition, [missing], started)
        else:
            profile = await self.run_jobs(job_inputs(self.config, perm, repetition, init_image=chosen))
            record = run_record(perm, repetition, profile, datetime.now(UTC).isoformat())
        return {**record, "base": base}

    async def run(self) -> None:
        self.capabilities = await self.fetch_capabilities()
        planned: list[Permutation] = []
        for perm in permutations(self.config):
            reason = skip_reason(perm, self.capabilities)
            if reason is None:
                planned.append(perm)
            else:
                self.skipped.append({"permutation": perm.key, "reason": reason})
        # Repetition-major order: a slow drift of the endpoint spreads over every permutation.
        # Runs go one at a time so they do not distort each other's latency.
        with tqdm(total=len(planned) * self.config.repetitions, unit="run", disable=not self.show_progress) as bar:
            for repetition in range(self.config.repetitions):
                for perm in planned:
                    bar.set_postfix_str(perm.key, refresh=False)
                    self.records.append(await self.run_once(perm, repetition))
                    bar.update()
