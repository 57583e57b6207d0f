"""Fixtures shared by the pipeline tests, and the compile tests' fresh-process runs started early."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines.acceleration import MEGA_CACHE_FILE
from tests.conftest import ROOT


@pytest.fixture
def restore_attention_backend():
    """set_attention_backend also sets diffusers' process-wide default: keep tests independent."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(saved)


# -- the compile runs --------------------------------------------------------------------------------

class CompileRuns:
    """tests/pipelines/compiled_generation.py twice, each in a fresh interpreter (a started worker, as far
    as dynamo and Inductor's in-memory caches know): a first compile into an empty cache, then a restart
    from that run's saved mega-cache file alone. Minutes of Inductor on CPU that share nothing with the
    pytest process, so they run on a background thread from the end of collection while the rest of
    the suite runs; the tests that read them run last, and their fixtures wait for the results."""

    def __init__(self, restart: bool) -> None:
        self._root = tempfile.TemporaryDirectory(prefix="compile-runs-")
        self.first_dir = Path(self._root.name) / "first"
        self.restart_dir = Path(self._root.name) / "restart"
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._stopped = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="compile-runs")
        self.first: Future[dict] = self._pool.submit(self._run, self.first_dir)
        self.restarted: Future[dict] | None = self._pool.submit(self._restart) if restart else None

    def _run(self, cache_dir: Path) -> dict:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._stopped:
                raise RuntimeError("the test session ended before this compile run started")
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tests.pipelines.compiled_generation", str(cache_dir)], cwd=ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = self._process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            raise
        assert self._process.returncode == 0, stderr[-3000:]
        return json.loads(stdout.strip().splitlines()[-1])

    def _restart(self) -> dict:
        self.first.result()  # its saved cache is the restart's only input
        self.restart_dir.mkdir()
        shutil.copy(self.first_dir / MEGA_CACHE_FILE, self.restart_dir / MEGA_CACHE_FILE)  # no inductor dir
        return self._run(self.restart_dir)

    def stop(self) -> None:
        """End a run still going (an interrupted session), then remove the caches."""
        with self._lock:
            self._stopped = True
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._root.cleanup()


RUNS = pytest.StashKey[CompileRuns]()


def _compile_runs(config: pytest.Config, restart: bool) -> CompileRuns:
    if RUNS not in config.stash:
        config.stash[RUNS] = CompileRuns(restart)
    return config.stash[RUNS]


COMPILE_FIXTURES = {"first_compile", "restarted_compile"}


def _needs_runs(item: pytest.Item) -> bool:
    return bool(COMPILE_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(trylast=True)  # after any shuffle: the order is otherwise left as it is
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that wait for the runs go last, so that the rest of the suite runs beside them."""
    items.sort(key=_needs_runs)  # stable: file order within each group


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the runs now if a selected test needs them (not under `-m "not slow"`)."""
    needed = {name for item in session.items if _needs_runs(item) for name in item.fixturenames}
    if needed and not session.config.option.collectonly:
        _compile_runs(session.config, restart="restarted_compile" in needed)


def pytest_unconfigure(config: pytest.Config) -> None:
    if RUNS in config.stash:
        config.stash[RUNS].stop()


@pytest.fixture
def first_compile(request: pytest.FixtureRequest) -> dict:
    """The first compile's report (compiled_generation.py's JSON line)."""
    return _compile_runs(request.config, restart=False).first.result()


@pytest.fixture
def restarted_compile(request: pytest.FixtureRequest) -> tuple[Path, dict]:
    """The restart's cache folder (the first run's mega-cache file, nothing else) and its report."""
    runs = _compile_runs(request.config, restart=True)
    assert runs.restarted is not None, "collection did not ask for the restart run"
    return runs.restart_dir, runs.restarted.result()
