"""The embedded consistent-mode bundle: built once, atomically, whoever builds it at the same time."""

from __future__ import annotations

import os
from pathlib import Path

import models.demo_pulid as demo_pulid


def test_a_bundle_another_process_finished_first_is_the_one_returned(tmp_path, monkeypatch):
    """Two processes building at once (the suite and its background compile runs, on a fresh clone):
    the other one's full folder lands just before this one renames its own, and this one uses it."""
    target = tmp_path / demo_pulid.BUNDLE_VERSION
    rename = os.replace

    def another_lands_first(source: Path, destination: Path) -> None:
        target.mkdir()
        (target / "READY").write_text("ok\n")
        rename(source, destination)

    monkeypatch.setattr(demo_pulid, "build_bundle", lambda root: (root / "mine").write_text(""))
    monkeypatch.setattr(os, "replace", another_lands_first)
    assert demo_pulid.ensure_demo_bundle(tmp_path) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo_pulid.BUNDLE_VERSION]  # no staging left
    assert not (target / "mine").exists()
