"""Start-up phases, timed: where a cold start goes (imports, each model's load, acceleration,
warm-up), logged as each ends and returned in capabilities as `startup_ms`.

Self-contained on purpose (no import from the rest of the worker), so the start-up code can call
it from wherever it moves to.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


class StartupTimer:
    """Phases in the order they ran, each in ms. A phase that raises is recorded too, marked."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = self._clock()
        failed = True
        try:
            yield
            failed = False
        finally:
            self.record(f"{name} (failed)" if failed else name, (self._clock() - started) * 1000)

    def record(self, name: str, ms: float) -> None:
        """Add a phase timed elsewhere (a repeated name adds up: one phase run in parts)."""
        self._phases[name] = round(self._phases.get(name, 0.0) + ms, 1)
        log.info("startup: %s took %.0f ms", name, ms)

    def as_dict(self) -> dict[str, float]:
        """Phase -> ms in run order, then `total`: what capabilities returns."""
        return {**self._phases, "total": round(sum(self._phases.values()), 1)}

    def summary(self) -> str:
        """One log line for the whole start-up."""
        return ", ".join(f"{name} {ms / 1000:.2f} s" for name, ms in self.as_dict().items())
