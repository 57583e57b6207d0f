"""Fixtures shared by the pipeline tests, and the compile tests' fresh-process runs started early."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
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
    """The compile tests' scripts, each in a fresh interpreter (a started worker, as far as dynamo and
    Inductor's in-memory caches know): tests/pipelines/compiled_generation.py into an empty cache
    (`first_compile`), then again from that run's saved mega-cache file alone (`restarted_compile`), and
    tests/pipelines/compiled_consistent.py (`compiled_consistent`). Minutes of Inductor on CPU that share
    nothing with the pytest process, so they run on two background threads from the end of collection
    while the rest of the suite runs; the tests that read them run last, and their fixtures wait."""

    def __init__(self) -> None:
        self._root = tempfile.TemporaryDirectory(prefix="compile-runs-")
        self._lock = threading.Lock()
        self._processes: list[subprocess.Popen[str]] = []
        self._stopped = False
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="compile-runs")
        self._runs: dict[str, Future[dict]] = {}

    def folder(self, name: str) -> Path:
        return Path(self._root.name) / name

    def start(self, names: set[str]) -> None:
        """Submit the runs named (and what they need) that are not started yet; the order keeps the
        restart, which waits for the first compile, from holding a thread another run could use."""
        wanted = names | ({"first_compile"} if "restarted_compile" in names else set())
        jobs = {"first_compile": partial(self._run, "compiled_generation", "first_compile"),
                "compiled_consistent": partial(self._run, "compiled_consistent", "compiled_consistent"),
                "restarted_compile": self._restart}
        for name, job in jobs.items():
            if name in wanted and name not in self._runs:
                self._runs[name] = self._pool.submit(job)

    def result(self, name: str) -> tuple[Path, dict]:
        """The run's folder and its report (the script's JSON line), once it has ended."""
        self.start({name})
        return self.folder(name), self._runs[name].result()

    def _run(self, script: str, name: str) -> dict:
        folder = self.folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._stopped:
                raise RuntimeError("the test session ended before this compile run started")
            process = subprocess.Popen([sys.executable, "-m", f"tests.pipelines.{script}", str(folder)], cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._processes.append(process)
        try:
            stdout, stderr = process.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        assert process.returncode == 0, stderr[-3000:]
        return json.loads(stdout.strip().splitlines()[-1])

    def _restart(self) -> dict:
        self._runs["first_compile"].result()  # its saved cache is the restart's only input
        restart = self.folder("restarted_compile")
        restart.mkdir()
        shutil.copy(self.folder("first_compile") / MEGA_CACHE_FILE, restart / MEGA_CACHE_FILE)  # no inductor dir
        return self._run("compiled_generation", "restarted_compile")

    def stop(self) -> None:
        """End the runs still going (an interrupted session), then remove their folders."""
        with self._lock:
            self._stopped = True
            for process in self._processes:
                if process.poll() is None:
                    process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._root.cleanup()


RUNS = pytest.StashKey[CompileRuns]()
COMPILE_FIXTURES = {"first_compile", "restarted_compile", "compiled_consistent"}


def _compile_runs(config: pytest.Config) -> CompileRuns:
    if RUNS not in config.stash:
        config.stash[RUNS] = CompileRuns()
    return config.stash[RUNS]


def _needs_runs(item: pytest.Item) -> bool:
    return bool(COMPILE_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(trylast=True)  # after any shuffle: the order is otherwise left as it is
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that wait for the runs go last, so that the rest of the suite runs beside them."""
    items.sort(key=_needs_runs)  # stable: file order within each group


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the runs now that the selected tests need (none under `-m "not slow"`)."""
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ())} & COMPILE_FIXTURES
    if needed and not session.config.option.collectonly:
        _compile_runs(session.config).start(needed)


def pytest_unconfigure(config: pytest.Config) -> None:
    if RUNS in config.stash:
        config.stash[RUNS].stop()


@pytest.fixture
def first_compile(request: pytest.FixtureRequest) -> tuple[Path, dict]:
    """compiled_generation.py's folder (with the compile cache it saved) and report."""
    return _compile_runs(request.config).result("first_compile")


@pytest.fixture
def restarted_compile(request: pytest.FixtureRequest) -> tuple[Path, dict]:
    """The restart's folder (the first run's mega-cache file, nothing else) and its report."""
    return _compile_runs(request.config).result("restarted_compile")


@pytest.fixture
def compiled_consistent(request: pytest.FixtureRequest) -> tuple[Path, dict]:
    """compiled_consistent.py's folder (images.npz: eager and compiled images) and report."""
    return _compile_runs(request.config).result("compiled_consistent")
