"""What the engine loop and a job's runner share: the job's ticket, what its images used on the
GPU (for the summary), and each image's outcome as it leaves the GPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.engine import Engine, ImageItem
from serving.scheduler import Job

STAGES = ("text_encoding", "denoising", "decoding")


@dataclass
class ImageOutcome:
    """One image's result as it leaves the GPU: pixels, or an error code and message."""

    index: int
    seed: int
    pixels: np.ndarray | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass
class JobUsage:
    """What a job's images took on the GPU: each stage's ms summed over the calls they took part in
    (a call may serve other jobs too), the number of those model calls, and `batch_sizes`: the rows
    of each run of calls over one set of rows (a group of 4 that a newcomer joined: [4, 5]; rows
    run two by two: [2, 2]; a group preempted by another job's call and resumed: [4, 4])."""

    timings_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    model_calls: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    last_rows: frozenset[int] = frozenset()

    def add_stages(self, timings_ms: dict[str, float]) -> None:
        """Stage times of a start (`text_encoding`, and `vae_encoding` for image to image)."""
        for stage, ms in timings_ms.items():
            self.timings_ms[stage] = self.timings_ms.get(stage, 0.0) + ms

    def add_call(self, rows: frozenset[int], ms: float) -> None:
        self.timings_ms["denoising"] += ms
        self.model_calls += 1
        if rows != self.last_rows:
            self.batch_sizes.append(len(rows))
            self.last_rows = rows


@dataclass(eq=False)
class JobTicket:
    """A job's place in the loop; `on_outcome` is called from the GPU thread per image."""

    job_id: str
    engine: Engine
    spec: Any
    items: dict[int, ImageItem]
    on_outcome: Callable[[ImageOutcome], None]
    job: Job
    usage: JobUsage = field(default_factory=JobUsage)
    cancelled: bool = False
