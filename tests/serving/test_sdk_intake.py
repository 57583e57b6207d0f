"""SdkIntake against the SDK's own job record (runpod's JobsProgress singleton, as the JobScaler fills it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from runpod.serverless.modules.worker_state import JobsProgress

from serving.sdk_intake import SdkIntake


@pytest.fixture
def held() -> Iterator[JobsProgress]:
    progress = JobsProgress()
    before = set(progress)
    yield progress
    for job in set(progress) - before:
        progress.remove(job)


def test_a_taken_job_is_pending_until_its_handler_starts(held: JobsProgress) -> None:
    intake = SdkIntake()
    assert not intake.pending()
    held.add({"id": "job-a"})  # the JobScaler took it
    assert intake.pending()
    intake.started("job-a")
    assert not intake.pending()
    held.add({"id": "job-b"})
    assert intake.pending()  # a second job taken while the first runs


def test_a_finished_job_taken_again_is_pending_again(held: JobsProgress) -> None:
    """/retry runs a job again under its id: once the SDK has finished it, its start is forgotten."""
    intake = SdkIntake()
    held.add({"id": "job-a"})
    intake.started("job-a")
    held.remove({"id": "job-a"})  # the SDK finished it
    intake.started("job-b")  # a start forgets what the SDK no longer holds
    held.add({"id": "job-a"})  # retried
    assert intake.pending()
