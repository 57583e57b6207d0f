"""Jobs the RunPod SDK has taken but not yet handed to the handler.

The SDK's JobScaler puts a taken job in its queue and starts its handler at its run loop's next
0.1 s tick. Until then the scheduler cannot see it, and an idle GPU would start a model call
without it. `SdkIntake.pending` tells the engine loop that such a job is on its way (it then holds
the first call, at most `SDK_PICKUP_S`), read from the SDK's own record of the jobs it holds
(`worker_state.JobsProgress`, read only; nothing of the SDK is patched). docs/ENDPOINT.md.
"""

from __future__ import annotations

from runpod.serverless.modules.worker_state import JobsProgress

from serving.engine_loop import IncomingJobs

# The SDK starts a taken job at its next 0.1 s tick; a busy event loop adds a little.
SDK_PICKUP_S = 0.25


def _held_job_ids() -> set[str]:
    """Jobs the SDK has taken and not finished. `set.copy` is one C call under the GIL, so the
    GPU thread can read the set while the event loop changes it."""
    return {job.id for job in set.copy(JobsProgress())}


class SdkIntake:
    """Which of the SDK's jobs have reached the handler (`started`, called first thing by it)."""

    def __init__(self) -> None:
        self._started: set[str] = set()  # among the jobs the SDK still holds

    def started(self, job_id: str) -> None:
        self._started.intersection_update(_held_job_ids())  # forget jobs the SDK has finished
        self._started.add(job_id)

    def pending(self) -> bool:
        """Whether the SDK holds a job whose handler has not begun (called from the GPU thread)."""
        return bool(_held_job_ids() - self._started)

    def incoming(self) -> IncomingJobs:
        return IncomingJobs(pending=self.pending, wait_s=SDK_PICKUP_S)
