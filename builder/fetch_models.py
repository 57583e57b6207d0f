"""Download the pinned weights into the image at build time, verify them, and pin the manifest.

    python builder/fetch_models.py --target /models [--with-pulid]      # the Dockerfile's step
    python builder/fetch_models.py --target /tmp/models --pin [--with-pulid]   # a maintainer, once

Files land at {target}/{model dir}/{source target_dir}/{repo path} (docs/CONSISTENT_MODE.md has
the PuLID bundle layout), each verified by size and sha256; a file already there and verified is
not downloaded again, so a rebuild with a warm cache (or a rerun after a failure) is cheap.
Each model folder gets `model_info.json` ({"id", "revision"}): the worker reports what it serves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from the Dockerfile

from builder.manifest import (  # noqa: E402
    MANIFEST_PATH,
    MODEL_INFO_FILE,
    PIN_HELP,
    RELEASE_PREFIX,
    UNPINNED,
    FileSpec,
    Manifest,
    ManifestError,
    SourceSpec,
    VerificationError,
    file_digest,
    is_release,
    load_manifest,
    pinned_copy,
    save_manifest,
    verify_file,
)

log = logging.getLogger("fetch_models")
BASE_MODELS = ("z-image-turbo",)
PULID_MODELS = ("pulid-flux",)
STAGING_DIR = ".staging"


class Source(Protocol):
    """Where weights come from: the Hugging Face Hub in the image build, a local folder in tests."""

    def resolve(self, repo: str, revision: str) -> str:
        """The 40-hex commit a branch, tag or commit names."""

    def list_files(self, repo: str, commit: str) -> list[str]:
        """Every file path of the repo at that commit."""

    def download(self, repo: str, commit: str, path: str, dest_dir: Path) -> Path:
        """Fetch one file to dest_dir/path and return where it is."""


class HubSource:
    """The Hugging Face Hub; HF_TOKEN (a build secret) opens gated repos such as FLUX.1-dev."""

    def __init__(self, token: str | None = None) -> None:
        from huggingface_hub import HfApi

        self.token = token or os.environ.get("HF_TOKEN") or None
        self.api = HfApi(token=self.token)

    def resolve(self, repo: str, revision: str) -> str:
        return self.api.model_info(repo, revision=revision).sha

    def list_files(self, repo: str, commit: str) -> list[str]:
        return self.api.list_repo_files(repo, revision=commit)

    def download(self, repo: str, commit: str, path: str, dest_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, path, revision=commit, local_dir=dest_dir, token=self.token))


class ReleaseSource:
    """GitHub release assets (repos named `github.com/{owner}/{name}`): facexlib publishes its
    parsing weights only there. The tag is the revision; the manifest's sha256 pins the bytes."""

    def __init__(self, web: str = "https://github.com", api: str = "https://api.github.com", timeout: float = 120) -> None:
        self.web, self.api, self.timeout = web.rstrip("/"), api.rstrip("/"), timeout

    def resolve(self, repo: str, revision: str) -> str:
        return revision

    def list_files(self, repo: str, commit: str) -> list[str]:
        url = f"{self.api}/repos/{repo.removeprefix(RELEASE_PREFIX)}/releases/tags/{commit}"
        with urllib.request.urlopen(url, timeout=self.timeout) as response:
            return [asset["name"] for asset in json.load(response)["assets"]]

    def download(self, repo: str, commit: str, path: str, dest_dir: Path) -> Path:
        url = f"{self.web}/{repo.removeprefix(RELEASE_PREFIX)}/releases/download/{commit}/{path}"
        dest = dest_dir / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=self.timeout) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, 8 * 2**20)
        return dest


class BuildSource:
    """What the image build reads: hub repos from the Hub, `github.com/...` repos from their releases."""

    def __init__(self, hub: Source, releases: Source) -> None:
        self.hub, self.releases = hub, releases

    def _for(self, repo: str) -> Source:
        return self.releases if is_release(repo) else self.hub

    def resolve(self, repo: str, revision: str) -> str:
        return self._for(repo).resolve(repo, revision)

    def list_files(self, repo: str, commit: str) -> list[str]:
        return self._for(repo).list_files(repo, commit)

    def download(self, repo: str, commit: str, path: str, dest_dir: Path) -> Path:
        return self._for(repo).download(repo, commit, path, dest_dir)


@dataclass
class FetchReport:
    """What a run did: files downloaded, files found already verified, and the pins it measured."""

    fetched: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    pins: dict[tuple[str, int], SourceSpec] = field(default_factory=dict)


def model_names(with_pulid: bool) -> tuple[str, ...]:
    return BASE_MODELS + (PULID_MODELS if with_pulid else ())


def check_pinned(manifest: Manifest, names: tuple[str, ...]) -> None:
    """Refuse an unpinned manifest up front, naming every gap and how to pin."""
    problems = [f"{name}: {p}" for name in names for s in manifest.model(name).sources for p in s.problems()]
    if problems:
        raise ManifestError("the manifest is not pinned:\n  " + "\n  ".join(problems) + "\n" + PIN_HELP)


def fetch_models(
    manifest: Manifest,
    target: Path,
    source: Source,
    names: tuple[str, ...] = BASE_MODELS,
    allow_unpinned: bool = False,
    pin: bool = False,
) -> FetchReport:
    """Place and verify every file of the named models under `target`; write model_info.json.

    Pinned sources are taken as the manifest says. Unpinned ones (allowed, or `pin`) are resolved
    at the source: the revision to a commit (the placeholder means main), the file list from the
    `include` patterns; their files are always downloaded (nothing to verify a kept copy against)
    and measured into `report.pins`.
    """
    if not (allow_unpinned or pin):
        check_pinned(manifest, names)
    report = FetchReport()
    staging = target / STAGING_DIR
    try:
        for name in names:
            model = manifest.model(name)
            model_dir = target / model.dir
            commits = {}
            for index, spec in enumerate(model.sources):
                resolved = spec if spec.pinned and not pin else _resolve(spec, source)
                commits[spec.repo] = resolved.revision
                measured = [_place(resolved, f, model_dir, staging, source, report) for f in resolved.files]
                if not resolved.pinned or pin:
                    report.pins[(name, index)] = pinned_copy(spec, resolved.revision, measured)
            info = {"id": model.id, "revision": commits[model.sources[0].repo], "sources": commits}
            (model_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            log.info("%s ready in %s (%s@%s)", name, model_dir, info["id"], info["revision"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _resolve(spec: SourceSpec, source: Source) -> SourceSpec:
    """The source at its current commit with the repo files its patterns select (sizes unknown)."""
    commit = source.resolve(spec.repo, "main" if spec.revision == UNPINNED else spec.revision)
    paths = sorted(p for p in source.list_files(spec.repo, commit) if spec.wants(p))
    if not paths:
        raise ManifestError(f"{spec.repo}@{commit}: no file matches {list(spec.include)}")
    return replace(spec, revision=commit, files=tuple(FileSpec(p) for p in paths))


def _place(
    spec: SourceSpec, file: FileSpec, model_dir: Path, staging: Path, source: Source, report: FetchReport
) -> tuple[str, int, str]:
    """Make model_dir/target hold the file's verified bytes; return (path, size, sha256)."""
    dest = model_dir / spec.target(file)
    label = f"{spec.repo}/{file.path}"
    if file.pinned:
        try:
            verify_file(dest, file)
            report.kept.append(label)
            return file.path, file.size, file.sha256
        except VerificationError:
            pass  # absent or stale: download it again
    log.info("downloading %s@%s -> %s", label, spec.revision[:12], dest)
    downloaded = source.download(spec.repo, spec.revision, file.path, staging)
    if file.pinned:
        verify_file(downloaded, file)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(downloaded, dest)  # only verified, complete files reach the model folder
    report.fetched.append(label)
    size, sha256 = (file.size, file.sha256) if file.pinned else file_digest(dest)
    return file.path, size, sha256


def pin_manifest(manifest: Manifest, report: FetchReport) -> Manifest:
    """The manifest with the sources measured by a `pin` run replaced by their pinned copies."""
    models = dict(manifest.models)
    for (name, index), pinned in report.pins.items():
        sources = list(models[name].sources)
        sources[index] = pinned
        models[name] = replace(models[name], sources=tuple(sources))
    return replace(manifest, models=models)


def main(argv: list[str], source: Source | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, required=True, help="root of the model folders, e.g. /models")
    parser.add_argument("--with-pulid", action="store_true", help="also the consistent-mode bundle (FLUX.1-dev + PuLID)")
    parser.add_argument("--pin", action="store_true", help="resolve, download, measure and write the pins into the manifest")
    parser.add_argument("--allow-unpinned", action="store_true", help="build from an unpinned manifest, unverified")
    parser.add_argument("--manifest", type=Path, default=MANIFEST_PATH)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = model_names(args.with_pulid)
    try:
        manifest = load_manifest(args.manifest)
        source = source or BuildSource(HubSource(), ReleaseSource())
        report = fetch_models(manifest, args.target, source, names, args.allow_unpinned, args.pin)
    except (ManifestError, VerificationError) as err:
        print(f"fetch_models: {err}", file=sys.stderr)
        return 2
    if args.pin:
        save_manifest(pin_manifest(manifest, report), args.manifest)
        print(f"pinned {len(report.pins)} source(s) in {args.manifest}")
    elif report.pins:
        log.warning("UNPINNED build: %d source(s) taken from their current commit, unverified", len(report.pins))
    print(f"fetch_models: {len(report.fetched)} downloaded, {len(report.kept)} already verified, under {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
