"""The scheduling policy: before every model call, which rows (images in flight) run together.

A pure state machine (no threads, no torch, no clock of its own): serving/engine_loop.py tells it
what arrived, what ran and how long it took, and asks it for the next call. The unit of scheduling
is the model call, as vLLM's is the token: a row not chosen keeps its state (preempted, nothing
redone) and a new row may join a running group at any call.

Policy, per call:

1. **Rank jobs** by `arrival + work_weight × remaining work + priority offset` (seconds; lowest
   first). Remaining work is each row's model calls left and its decode, weighed by its cost (the
   engine's activation bytes: compute grows with pixels and CFG as memory does), in seconds at the
   rates measured on this worker (`CallCosts`; before the first timed call jobs rank by arrival).
   So the job with the least work left goes first (small interactive jobs by default), and every
   job ages: its key only falls while it waits or runs, and a newcomer's key is at least its
   arrival time. `work_weight` says how long a small job keeps overtaking a larger one (1: only
   while the larger one has waited less than the difference of their work). `priority`:
   "interactive" subtracts `priority_offset_s`, "background" adds it.
2. **The top job's group runs**: rows of other jobs may share a call only with equal batch keys
   (size, CFG, caption layout, engine). The top job's rows come first (least calls left first), up
   to the group's row limit (GPU memory, halved after an out-of-memory call).
3. **Others join only where batching is nearly free**: rows of lower-ranked jobs of the group fill
   the call while one more row costs at most `join_cost` of a lone row's call (fitted per group from
   the timed calls; until two row counts of a group are timed, they join, as plain batching would).
   Where the device is compute-bound (a 1024² transformer call on a GPU: a batch costs about its
   size in single images) the top job runs alone and the others wait; where it is not (small images)
   the call fills up.

The bound on a row's wait: a job's key is at most `arrival + work_weight × W + offset` (W its
estimated solo work) and never rises, while a job arriving at t has a key of at least
`t - priority_offset_s`. So a job is overtaken only by jobs that arrive within
`work_weight × W + offset + priority_offset_s` of its own arrival (`work_weight × W` between jobs
of the default priority): it finishes at the latest after the work queued before it, its own work,
and the work of the jobs arriving in that window.

Decoding is work of its job too: finished rows of one group are decoded in chunks, the best-ranked
job's first, when that job ranks no lower than the next call's, and at most one chunk between two
model calls (`next`). A chunk holds at most a fixed number of pixels (`Job.decode_rows`: one
512² image, four 256² ones by default), so a group finishing together holds up a newcomer for
about one such decode at most, while small images still decode several at once (a chunk with room
waits for the next call when that call finishes rows of its group).
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

Priority = Literal["interactive", "background"]
SlotState = Literal["waiting", "started", "finished"]
_OFFSET_SIGN = {"interactive": -1.0, None: 0.0, "background": 1.0}
SAMPLES_KEPT = 5  # timed calls kept per (group, row count): the median drops a compile or a hiccup


@dataclass(eq=False)
class Slot:
    """One image's place: `calls_left` model calls to go, each weighing `weight` (GiB of activations
    per call, the cost proxy). `row` is the engine's row once started; never read here."""

    job: Job
    index: int
    calls_left: int
    weight: float
    state: SlotState = "waiting"
    row: Any = None


@dataclass(eq=False)
class Job:
    """One job's rows, all of one group (a job's images share a spec and prompt). `owner` is the
    engine loop's ticket; never read here."""

    name: str
    group: Hashable
    arrival_s: float
    limit: int
    priority: Priority | None = None
    decode_rows: int = 1  # most of its rows (with others of its group) one decode takes
    slots: list[Slot] = field(default_factory=list)
    owner: Any = None
    removed: bool = False
    seq: int = 0

    def add_slot(self, index: int, calls: int, weight: float) -> Slot:
        slot = Slot(self, index, calls, weight)
        self.slots.append(slot)
        return slot

    def remaining_calls(self) -> float:
        """Its rows' model calls still to run, each weighed."""
        return sum(slot.calls_left * slot.weight for slot in self.slots if slot.state != "finished")

    def remaining_decodes(self) -> float:
        """Its rows still to decode (every slot: a delivered one has left), weighed."""
        return sum(slot.weight for slot in self.slots)


@dataclass
class Call:
    """The next model call: `slots` of one `group`, the first ones the `top` job's."""

    group: Hashable
    slots: list[Slot]
    limit: int
    top: Job


class CallCosts:
    """Measured model-call seconds per group and row count (median of the last few), the line
    `a + b·rows` through them, and the global seconds per unit of work of a model call and of a
    decode, which turn remaining work into seconds for the ranking."""

    def __init__(self) -> None:
        self._seconds: dict[Hashable, dict[int, deque[float]]] = {}
        self._per_work: deque[float] = deque(maxlen=2 * SAMPLES_KEPT - 1)
        self._decode_per_work: deque[float] = deque(maxlen=2 * SAMPLES_KEPT - 1)

    def record(self, group: Hashable, rows: int, work: float, seconds: float) -> None:
        """A model call of `rows` rows of `group`, weighing `work` in all, took `seconds`."""
        self._seconds.setdefault(group, {}).setdefault(rows, deque(maxlen=SAMPLES_KEPT)).append(seconds)
        if work > 0:
            self._per_work.append(seconds / work)

    def record_decode(self, work: float, seconds: float) -> None:
        """A decode of rows weighing `work` in all took `seconds`."""
        if work > 0:
            self._decode_per_work.append(seconds / work)

    @property
    def seconds_per_work(self) -> float:
        """Of one row's model call per unit of its weight; 0 until a call was timed (the ranking is
        then by arrival and priority alone)."""
        return statistics.median(self._per_work) if self._per_work else 0.0

    @property
    def decode_seconds_per_work(self) -> float:
        return statistics.median(self._decode_per_work) if self._decode_per_work else 0.0

    def line(self, group: Hashable) -> tuple[float, float] | None:
        """(a, b) of seconds = a + b·rows, least squares over the row counts timed; None under two."""
        points = {rows: statistics.median(samples) for rows, samples in self._seconds.get(group, {}).items()}
        if len(points) < 2:
            return None
        mean_n = statistics.fmean(points)
        mean_s = statistics.fmean(points.values())
        slope = (sum((n - mean_n) * (s - mean_s) for n, s in points.items())
                 / sum((n - mean_n) ** 2 for n in points))
        return mean_s - slope * mean_n, slope

    def join_is_cheap(self, group: Hashable, join_cost: float) -> bool:
        """One more row adds at most `join_cost` of a lone row's call (True while unmeasured, and
        always for a `join_cost` of 1: plain batching, whatever the timings say)."""
        line = None if join_cost >= 1 else self.line(group)
        if line is None:
            return True
        intercept, slope = line
        return slope <= join_cost * (intercept + slope)


@dataclass(frozen=True)
class Policy:
    """The policy's knobs (docs/CONFIGURATION.md: WORK_WEIGHT, PRIORITY_OFFSET_S, BATCH_JOIN_COST)."""

    work_weight: float = 4.0
    priority_offset_s: float = 30.0
    join_cost: float = 0.5


class Scheduler:
    """The jobs and rows waiting for the GPU and the policy above (see the module docstring)."""

    def __init__(self, policy: Policy, costs: CallCosts | None = None) -> None:
        self.policy = policy
        self.costs = costs or CallCosts()
        self._jobs: list[Job] = []
        self._caps: dict[Hashable, int] = {}
        self._seq = itertools.count()
        self._decoded_last = False

    # -- what happened ------------------------------------------------------------------------
    def add(self, job: Job) -> None:
        job.seq = next(self._seq)
        self._jobs.append(job)

    def remove(self, job: Job) -> None:
        """Cancelled (or done): its rows leave at once, in flight or not."""
        job.removed = True
        if job in self._jobs:
            self._jobs.remove(job)

    def ran(self, slots: list[Slot], seconds: float | None) -> None:
        """A model call over `slots` succeeded (in `seconds`; None when it was split or retried, so
        its time is not the cost of one call): each is one call further."""
        for slot in slots:
            slot.calls_left -= 1
        if slots and seconds is not None:
            self.costs.record(slots[0].job.group, len(slots), sum(slot.weight for slot in slots), seconds)

    def decoded(self, slots: list[Slot], seconds: float) -> None:
        """A decode of `slots` took `seconds` (they are then released one by one)."""
        self.costs.record_decode(sum(slot.weight for slot in slots), seconds)

    def finished(self, slot: Slot) -> None:
        """Its sampling is done: it waits for decoding."""
        slot.state = "finished"

    def release(self, slot: Slot) -> None:
        """Delivered or failed: it leaves, and its job with its last slot."""
        job = slot.job
        if slot in job.slots:
            job.slots.remove(slot)
        if not job.slots:
            self.remove(job)

    def cap(self, group: Hashable, rows: int) -> None:
        """A call of more rows than this ran out of memory: the group's calls stay this small."""
        self._caps[group] = max(1, min(rows, self._caps.get(group, rows)))

    # -- what runs next -------------------------------------------------------------------------
    def next(self) -> Call | list[Slot] | None:
        """The GPU's next piece of work: a decode chunk when its job ranks no lower than the next
        call's top job, never twice in a row while a call waits, and not while the call would finish
        more rows for the chunk's room; else the call. None when nothing is left."""
        call = self.next_call()
        chunk = self.next_decode()
        if chunk and (call is None or (not self._decoded_last and not self._fills_at(call, chunk)
                                       and self.rank(chunk[0].job) <= self.rank(call.top))):
            self._decoded_last = True
            return chunk
        self._decoded_last = False
        return call

    @staticmethod
    def _fills_at(call: Call, chunk: list[Slot]) -> bool:
        """The chunk has room and `call` finishes rows of its group: decoded after that call, they
        share the decode (rows of a group finish a call or two apart; a decode of several small
        images costs much less than one each), at the price of one call's wait."""
        top = chunk[0].job
        return len(chunk) < top.decode_rows and any(
            slot.calls_left == 1 and slot.job.group == top.group for slot in call.slots)

    def rank(self, job: Job) -> float:
        """Seconds; lowest first: arrival + work_weight × remaining work (model calls and decodes) +
        priority offset."""
        work = (job.remaining_calls() * self.costs.seconds_per_work
                + job.remaining_decodes() * self.costs.decode_seconds_per_work)
        policy = self.policy
        return job.arrival_s + policy.work_weight * work + _OFFSET_SIGN[job.priority] * policy.priority_offset_s

    def _order(self, jobs: list[Job]) -> list[Job]:
        return sorted(jobs, key=lambda job: (self.rank(job), job.seq))

    def next_call(self) -> Call | None:
        """The rows of the next model call, or None when no row needs one."""
        live = [job for job in self._jobs if any(slot.state != "finished" for slot in job.slots)]
        if not live:
            return None
        ordered = self._order(live)
        top = ordered[0]
        limit = min(top.limit, self._caps.get(top.group, top.limit))
        chosen = _runnable(top)[:limit]
        if len(chosen) < limit and self.costs.join_is_cheap(top.group, self.policy.join_cost):
            for job in ordered[1:]:
                if job.group == top.group:
                    chosen += _runnable(job)[: limit - len(chosen)]
        return Call(top.group, chosen, limit, top)

    def next_decode(self) -> list[Slot]:
        """Finished rows of one group, the best-ranked job's first, up to that job's `decode_rows`
        (a pixel budget: one decode holds up the next call for about the same time at any size)."""
        ordered = self._order([job for job in self._jobs if any(slot.state == "finished" for slot in job.slots)])
        if not ordered:
            return []
        top = ordered[0]
        finished = [slot for job in ordered if job.group == top.group for slot in job.slots if slot.state == "finished"]
        return finished[: top.decode_rows]

    def has_started_rows(self) -> bool:
        """Rows in flight or waiting to be decoded: the GPU is not idle."""
        return any(slot.state != "waiting" for job in self._jobs for slot in job.slots)

    def pending_images(self) -> int:
        return sum(len(job.slots) for job in self._jobs)


def _runnable(job: Job) -> list[Slot]:
    """A job's rows that need a model call: started ones first (fewest calls left), then by index."""
    slots = [slot for slot in job.slots if slot.state != "finished"]
    return sorted(slots, key=lambda slot: (slot.state != "started", slot.calls_left, slot.index))
