"""The scheduling policy as a pure function: ranking (least remaining work first, aging, priority),
which rows share a call (groups, the row limit, joining only where it is cheap), the bound on a
job's wait under a steady stream of small jobs, and the decode order. No model, no threads: a
simulated clock and a cost per call stand in for the GPU."""

from __future__ import annotations

import pytest

from serving.scheduler import CallCosts, Job, Policy, Scheduler

STEPS = 8


def job(name: str, images: int, arrival: float, group: str = "512", limit: int = 4, priority=None,
        calls: int = STEPS) -> Job:
    made = Job(name, group, arrival, limit, priority)
    for index in range(images):
        made.add_slot(index, calls, 1.0)
    return made


def costs(per_call: dict[int, float], group: str = "512") -> CallCosts:
    """Timed calls as the engine loop records them: seconds per call by row count."""
    measured = CallCosts()
    for rows, seconds in per_call.items():
        measured.record(group, rows, float(rows), seconds)
    return measured


COMPUTE_BOUND = {1: 1.0, 4: 4.0}  # a call costs its rows (a 1024² call on a GPU)
CHEAP = {1: 1.0, 4: 1.3}  # batching is nearly free (small images)


def names(call) -> list[str]:
    return [f"{slot.job.name}{slot.index}" for slot in call.slots]


def test_least_remaining_work_first_and_fifo_before_any_call_is_timed():
    untimed = Scheduler(Policy(1.0, 30, 0.5))
    big, small = job("big", 8, arrival=0.0), job("small", 1, arrival=1.0)
    untimed.add(big)
    untimed.add(small)
    assert untimed.next_call().top is big  # nothing timed yet: by arrival
    timed = Scheduler(Policy(1.0, 30, 0.5), costs(COMPUTE_BOUND))
    timed.add(big)
    timed.add(small)
    assert names(timed.next_call()) == ["small0"]  # 8 calls of work left against 64: it runs, alone


def test_priority_is_a_head_start_or_a_handicap_of_the_offset():
    scheduler = Scheduler(Policy(1.0, 100, 0.5), costs(COMPUTE_BOUND))
    profile_set = job("profile", 8, arrival=0.0, priority="interactive")  # 64 s of work, minus 100
    base = job("base", 1, arrival=0.0)  # 8 s of work
    scheduler.add(base)
    scheduler.add(profile_set)
    assert scheduler.next_call().top is profile_set
    scheduler.remove(profile_set)
    late = job("late", 1, arrival=0.0, priority="background")
    scheduler.add(late)
    assert scheduler.next_call().top is base
    assert scheduler.rank(late) - scheduler.rank(base) == pytest.approx(100)


@pytest.mark.parametrize("measured, expected", [
    (COMPUTE_BOUND, ["small0"]),  # joining would slow the small job 4x: the big job is preempted
    (CHEAP, ["small0", "big0", "big1", "big2"]),  # joining is nearly free: the call fills up
    ({}, ["small0", "big0", "big1", "big2"]),  # not measured yet: join, as plain batching would
])
def test_other_jobs_rows_join_a_call_only_where_batching_is_cheap(measured, expected):
    scheduler = Scheduler(Policy(1.0, 30, 0.5), costs(measured))
    scheduler.add(job("big", 8, arrival=0.0))
    scheduler.add(job("small", 1, arrival=5.0))
    if not measured:  # rank the small job first without timings: it came first
        scheduler = Scheduler(Policy(1.0, 30, 0.5))
        scheduler.add(job("small", 1, arrival=0.0))
        scheduler.add(job("big", 8, arrival=5.0))
    assert names(scheduler.next_call()) == expected


def test_a_call_takes_one_group_up_to_the_row_limit_started_rows_first():
    scheduler = Scheduler(Policy(1.0, 30, 1.0), costs(CHEAP))
    big = job("big", 6, arrival=0.0, limit=4)
    scheduler.add(big)
    scheduler.add(job("other-size", 8, arrival=0.0, group="1024"))  # more work left: ranks second
    big.slots[5].state, big.slots[5].calls_left = "started", 3
    big.slots[2].state, big.slots[2].calls_left = "started", 5
    call = scheduler.next_call()
    assert names(call) == ["big5", "big2", "big0", "big1"] and call.limit == 4  # fewest calls left first
    scheduler.cap("512", 2)  # a call of 4 ran out of memory
    assert names(scheduler.next_call()) == ["big5", "big2"]


def test_a_removed_job_leaves_at_once_and_a_released_last_slot_takes_its_job():
    scheduler = Scheduler(Policy(1.0, 30, 0.5))
    first, second = job("a", 2, 0.0), job("b", 1, 1.0)
    scheduler.add(first)
    scheduler.add(second)
    scheduler.remove(first)
    assert names(scheduler.next_call()) == ["b0"] and first.removed
    scheduler.release(second.slots[0])
    assert scheduler.next_call() is None and scheduler.pending_images() == 0


def test_a_decode_takes_finished_rows_of_one_group_best_ranked_first_up_to_the_jobs_pixel_budget():
    scheduler = Scheduler(Policy(1.0, 30, 0.5), costs(COMPUTE_BOUND))
    big, small, other = job("big", 4, 0.0), job("small", 2, 0.5), job("other", 1, 0.0, group="1024")
    big.decode_rows = small.decode_rows = 3  # e.g. 256² images under a 0.25-megapixel budget (4 would fit)
    for made in (big, small, other):
        scheduler.add(made)
    for slot in big.slots[:3] + small.slots + other.slots:
        scheduler.finished(slot)

    def decode() -> list[str]:
        return [f"{slot.job.name}{slot.index}" for slot in scheduler.next_decode()]

    assert decode() == ["other0"]  # nothing left but decoding, first to arrive: its group only
    scheduler.release(other.slots[0])
    assert decode() == ["small0", "small1", "big0"]  # small ranks first, then big's rows of its group
    small.decode_rows = 1  # a 512² image: one at a time
    assert decode() == ["small0"]


def test_a_decode_goes_first_only_for_a_job_ranked_no_lower_and_never_twice_while_a_call_waits():
    scheduler = Scheduler(Policy(1.0, 30, 0.5), costs(COMPUTE_BOUND))
    scheduler.costs.record_decode(1.0, 2.0)  # a decode costs two row-calls
    big, small = job("big", 4, 0.0), job("small", 1, 1.0)
    big.decode_rows = 2
    scheduler.add(big)
    scheduler.add(small)
    for slot in big.slots[:2]:
        scheduler.finished(slot)
    assert scheduler.next().top is small  # small ranks first: its call; big's finished rows wait
    scheduler.remove(small)
    assert [slot.index for slot in scheduler.next()] == [0, 1]  # big's own rows: decode first ...
    assert scheduler.next().top is big  # ... then a call before the next decode
    scheduler.release(big.slots[0])
    for slot in big.slots[1:]:
        scheduler.finished(slot)
    assert [slot.index for slot in scheduler.next()] == [1, 2] and [s.index for s in scheduler.next()] == [1, 2]


def test_a_decode_with_room_waits_for_a_call_that_finishes_more_rows_of_its_group():
    scheduler = Scheduler(Policy(1.0, 30, 0.5), costs(COMPUTE_BOUND))
    group = job("group", 3, 0.0)
    group.decode_rows = 4
    scheduler.add(group)
    scheduler.finished(group.slots[0])
    group.slots[1].calls_left, group.slots[2].calls_left = 1, 3
    for slot in group.slots[1:]:
        slot.state = "started"
    call = scheduler.next()
    assert names(call) == ["group1", "group2"]  # it finishes group1: the decode waits for it
    scheduler.ran(call.slots, None)
    scheduler.finished(group.slots[1])
    assert [slot.index for slot in scheduler.next()] == [0, 1]  # now no call finishes one: decode


def test_the_line_through_timed_calls_and_its_marginal_cost():
    measured = costs({1: 2.0, 2: 3.0, 4: 5.0})
    assert measured.line("512") == pytest.approx((1.0, 1.0))
    assert measured.join_is_cheap("512", 0.5) and not measured.join_is_cheap("512", 0.49)
    assert costs(COMPUTE_BOUND).join_is_cheap("512", 1.0)  # 1: always, whatever the timings
    for seconds in (5.0, 5.0, 50.0):  # one compile-slow call among the timings of 4 rows
        measured.record("512", 4, 4.0, seconds)
    assert measured.line("512") == pytest.approx((1.0, 1.0))  # the median of a row count holds
    assert measured.seconds_per_work > 0 and CallCosts().line("512") is None


# -- the bound on a job's wait, on a simulated GPU -----------------------------------------------
def simulate(scheduler: Scheduler, jobs: list[Job], cost, aging: bool = True) -> tuple[dict[str, float], list]:
    """Run every job to the end, each arriving at its arrival_s: a call costs cost(rows) seconds.
    Returns each job's finish time and each call's (start time, top job). Without `aging` the
    scheduler is told every job arrived at 0, which leaves least remaining work alone."""
    clock, finish, tops = 0.0, {}, []
    arrivals = sorted(((j.arrival_s, j) for j in jobs), key=lambda pair: pair[0])
    while arrivals or scheduler.pending_images():
        while arrivals and arrivals[0][0] <= clock:
            _, arrived = arrivals.pop(0)
            arrived.arrival_s = arrived.arrival_s if aging else 0.0
            scheduler.add(arrived)
        call = scheduler.next_call()
        if call is None:
            clock = arrivals[0][0]
            continue
        tops.append((clock, call.top))
        seconds = cost(len(call.slots))
        clock += seconds
        scheduler.ran(call.slots, seconds)
        for slot in call.slots:
            slot.state = "started"
            if slot.calls_left == 0:
                scheduler.finished(slot)
                scheduler.release(slot)
                if not slot.job.slots:
                    finish[slot.job.name] = clock
    return finish, tops


def stream_scenario(aging: bool, work_weight: float = 1.0) -> tuple[dict[str, float], list, list[float]]:
    """One second per row-call (compute-bound): an 8-image job at t=0 (64 s of work alone) and a
    1-image job (8 s) every 10 s for 300 s. Returns the finish times, the calls' tops and the
    small jobs' arrival times."""
    scheduler = Scheduler(Policy(work_weight, 30, 0.5), costs(COMPUTE_BOUND))
    scheduler.costs.record("512", 1, 1.0, 1.0)  # 1 s per unit of work: ranks in seconds of solo work
    arrivals = [10.0 * i + 1 for i in range(30)]
    stream = [job(f"small{i}", 1, arrival=t) for i, t in enumerate(arrivals)]
    finish, tops = simulate(scheduler, [job("big", 8, arrival=0.0), *stream], lambda rows: float(rows), aging)
    return finish, tops, arrivals


@pytest.mark.parametrize("work_weight", [1.0, 4.0])
def test_a_large_job_under_a_steady_stream_of_small_ones_finishes_within_the_stated_bound(work_weight):
    """A newcomer ranks first only while it arrives within work_weight × the big job's work W of
    the big job's arrival: the big job finishes by W + the work of the jobs arriving in that
    window, and no job arriving after it runs before it. A small job waits at most for the big
    job's remaining work."""
    finish, tops, arrivals = stream_scenario(aging=True, work_weight=work_weight)
    window = work_weight * 8 * STEPS  # work_weight × the big job's solo work W, in seconds
    in_window = [t for t in arrivals if t < window]
    assert finish["big"] <= 8 * STEPS + STEPS * len(in_window)
    before_big = [top for start, top in tops if start < finish["big"]]
    assert [top.name for top in before_big if top.name != "big" and top.arrival_s >= window] == []
    assert all(finish[f"small{i}"] - t <= STEPS + 8 * STEPS for i, t in enumerate(arrivals))
    assert finish["small0"] - arrivals[0] <= 2 * STEPS  # ahead of the big job's turn: about its own time


def test_without_aging_the_same_stream_holds_the_large_job_past_that_bound():
    """The check above can fail: least remaining work alone lets every newcomer overtake."""
    finish, _, arrivals = stream_scenario(aging=False)
    assert finish["big"] > 8 * STEPS + STEPS * len([t for t in arrivals if t < 8 * STEPS])
