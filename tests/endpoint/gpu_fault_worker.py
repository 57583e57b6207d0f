"""TEST FIXTURE: `python handler.py` with one injectable GPU failure, for the refresh_worker test.

`python -m tests.endpoint.gpu_fault_worker` imports handler.py (its worker, its model) and runs
its `main()` as `python handler.py` does, with one change at the narrowest seam, the GPU this
machine does not have: the engine's model call raises a fatal CUDA error once, when the file
named by $GPU_FAULT_FILE exists. Firing removes the file, so a worker started after it (the
replacement) and every later call work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import handler
from pipelines.engine import Engine

GPU_FAULT_ENV = "GPU_FAULT_FILE"
CUDA_FAILURE = "CUDA error: an illegal memory access was encountered"


def fail_once_when_armed(engine: Engine, trigger: Path) -> None:
    real_step = engine.step

    def step(rows: Any) -> Any:
        try:
            trigger.unlink()  # atomic: one model call, in one process, gets the fault
        except FileNotFoundError:
            return real_step(rows)
        raise RuntimeError(CUDA_FAILURE)

    engine.step = step  # type: ignore[method-assign]


if __name__ == "__main__":
    fail_once_when_armed(handler.WORKER.engine, Path(os.environ[GPU_FAULT_ENV]))
    sys.exit(handler.main(sys.argv[1:]))
