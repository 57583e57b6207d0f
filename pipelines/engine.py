"""The one interface every pipeline serves through, and the data that crosses it.

The unit of work is one **model call** over a set of **rows** (images in flight). A row holds
everything needed to resume its image: its sampler (a generator paused at the point where it
needs the model's output), its conditioning (text embeddings, identity tokens) and its adapters.
Rows of one engine whose `batch_key`s are equal may share any model call whatever their step,
workflow or LoRAs, so a scheduler (serving/scheduler.py) can choose before every call which
rows run: rows left out keep their state (preempted) and newcomers join a running group.

An engine knows only rows: `start` makes them, `step` runs one model call over them, `finish`
decodes finished ones. `generate` (warm-up, benchmarks, tests) is the same three in lock-step.
Each engine defines its own spec type (what one request's images share) next to its code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from pipelines.img2img import InitImage

StopCheck = Callable[[], bool]
# A sampler for one row: yields the point where it needs the model's output, (x, sigma) with x of
# batch size 1 and sigma a 0-d tensor, receives that output (1, ...), and returns the final latents.
RowSampler = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SamplingStopped(Exception):
    """Raised between model calls when every image of a lock-step generation was cancelled."""


@dataclass(frozen=True)
class ImageItem:
    """One image to make: its own prompt, negative prompt, seed, and adapters (LoRA, scale) that
    apply to it alone (images with different adapters share a call: pipelines/lora.py); for
    image-to-image, the image (and mask) it starts from (pipelines/img2img.py)."""

    prompt: str
    negative_prompt: str
    seed: int
    loras: tuple[tuple[Any, float], ...] = ()
    init: InitImage | None = field(default=None, compare=False)


@dataclass(eq=False)
class Row:
    """One image in flight. `query` is the (x, sigma) its sampler waits for the model's output at
    (None once done); `advance` feeds that output and runs the sampler to its next model call.
    `conditioning` is the engine's own per-row model input; `tag` is the caller's (serving keeps
    the job and image index there) and engines never read it."""

    sampler: RowSampler
    calls_left: int
    item: ImageItem | None = None
    spec: Any = None
    conditioning: Any = None
    tag: Any = None
    latents: torch.Tensor | None = None
    error: BaseException | None = None
    query: tuple[torch.Tensor, torch.Tensor] | None = field(init=False)

    def __post_init__(self) -> None:
        self.query = next(self.sampler)

    @property
    def done(self) -> bool:
        return self.query is None

    def advance(self, output: torch.Tensor) -> None:
        """Feed the model's output at `query`; an error of this row's own update stays in `error`
        (the row is then done) so the other rows of the call go on."""
        self.calls_left -= 1
        try:
            self.query = self.sampler.send(output)
        except StopIteration as finished:
            self.query, self.latents = None, finished.value
        except Exception as err:  # noqa: BLE001 - one row's failure, reported for that row alone
            self.query, self.error = None, err


def call_model(rows: list[Row], velocity: Velocity) -> None:
    """One model call over `rows`, each at its own sigma: their x stacked, one sigma per row. If the
    call raises, no row has changed (a retry or a split replays it exactly)."""
    x = torch.cat([row.query[0] for row in rows])
    sigma = torch.stack([row.query[1].reshape(()) for row in rows])
    output = velocity(x, sigma)
    for row, row_output in zip(rows, output.split(1)):
        row.advance(row_output)


def run_lockstep(rows: list[Row], step: Callable[[list[Row]], None], should_stop: StopCheck) -> None:
    """`step` (one model call) over the rows not yet done until all are. Raises `SamplingStopped`
    before a call when `should_stop()`, and a row's own error."""
    while not all(row.done for row in rows):
        if should_stop():
            raise SamplingStopped
        step([row for row in rows if not row.done])
        for row in rows:
            if row.error is not None:
                raise row.error


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA runs asynchronously), so a time taken next is that
    work's own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Milliseconds per stage of engine work: `lap(stage)` adds the time since the last lap to
    `stage`. On CUDA it synchronizes first, so a stage is charged the kernels it queued, not the
    next stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings_ms: dict[str, float] = {}
        self._since = time.perf_counter()

    def lap(self, stage: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.timings_ms[stage] = self.timings_ms.get(stage, 0.0) + (now - self._since) * 1000
        self._since = now


@dataclass
class BatchResult:
    """A lock-step generation's uint8 images (B, H, W, 3) and the ms each stage took."""

    images: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelIdentity:
    """What is serving: a hub id and revision, or a demo model with random weights."""

    id: str
    revision: str
    demo: bool


class Engine(Protocol):
    """A warm pipeline. Its methods run on the scheduler's one GPU thread, nothing else does."""

    name: str
    device: torch.device
    identity: ModelIdentity

    def batch_key(self, spec: Any, item: ImageItem) -> Hashable:
        """Rows with equal keys may share a model call, each coming out as it would alone."""

    def activation_bytes(self, spec: Any) -> float:
        """Peak GPU memory one row of `spec` adds to a call (the scheduler also weighs a row's work
        by it: compute grows with pixels and CFG as memory does)."""

    def model_calls(self, spec: Any) -> int:
        """Model calls one image of `spec` takes from start to finish."""

    def start(self, items: list[ImageItem], spec: Any, clock: StageClock | None = None) -> list[Row]:
        """Rows for new images (text encoded in one batch, initial noise or, for image to image, the
        encoded init images), not yet stepped. Stages other than text encoding (`vae_encoding`) are
        lapped on `clock`; the caller charges the rest of the start to `text_encoding`."""

    def step(self, rows: list[Row]) -> None:
        """Exactly one model call over `rows` (equal batch keys, any mix of steps and specs)."""

    def finish(self, rows: list[Row]) -> np.ndarray:
        """Done rows' pixels, uint8 (len(rows), H, W, 3), in one decode."""

    def generate(self, items: list[ImageItem], spec: Any, should_stop: StopCheck) -> BatchResult:
        """`start`, `step` until done, `finish`: the rows in lock-step (`generate_lockstep`)."""

    def numerics(self) -> dict[str, Any]:
        """What changes pixels besides the request (dtype, FP8): part of the result-cache key."""


def generate_lockstep(engine: Engine, items: list[ImageItem], spec: Any, should_stop: StopCheck) -> BatchResult:
    """The engine's rows for `items` from start to pixels together, each stage timed: what the
    warm-up, the benchmarks and the tests run, on the same row code the scheduler drives."""
    clock = StageClock(engine.device)
    rows = engine.start(items, spec, clock)
    clock.lap("text_encoding")
    run_lockstep(rows, engine.step, should_stop)
    clock.lap("denoising")
    images = engine.finish(rows)
    clock.lap("decoding")
    return BatchResult(images=images, timings_ms={stage: round(ms, 2) for stage, ms in clock.timings_ms.items()})
