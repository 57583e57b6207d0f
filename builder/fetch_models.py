"""Download the pinned weights into the image at build time, verify them, and pin the manifest.

    python -m builder.fetch_models --target /models [--with-pulid]      # the Dockerfile's step
    python -m builder.fetch_models --target /tmp/models --pin [--with-pulid]   # a maintainer, once

Files land at {target}/{model dir}/{source target_dir}/{repo path} (docs/CONSISTENT_MODE.md has
the PuLID bundle layout), each verified by size and hash: the manifest's, or for a hub source pinned
by commit alone, what the hub reports for that commit (LFS sha256, git blob sha1 for small files).
A file already there and verified is not downloaded again, so a rerun after a failure is cheap.
Each model folder gets `model_info.json` ({"id", "revision", "sources", "files"}): the worker
reports what it serves, and the image records every file's size and hash.
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


from builder.manifest import (
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

    def list_files(self, repo: str, commit: str) -> list[FileSpec]:
        """Every file of the repo at that commit, with the size and hash the source vouches for
        (none where it has none: a release asset is measured when pinned)."""

    def download(self, repo: str, commit: str, path: str, dest_dir: Path) -> Path:
        """Fetch one file to dest_dir/path and return where it is."""


class HubSource:
    """The Hugging Face Hub; HF_TOKEN (a build secret) opens gated repos such as FLUX.1-dev."""

    def __init__(self, token: str | None = None, endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi

        self.token = token or os.environ.get("HF_TOKEN") or None
        self.endpoint = endpoint  # None: HF_ENDPOINT, else huggingface.co
        self.api = HfApi(endpoint=endpoint, token=self.token)

    def resolve(self, repo: str, revision: str) -> str:
        return self.api.model_info(repo, revision=revision).sha

    def list_files(self, repo: str, commit: str) -> list[FileSpec]:
        info = self.api.model_info(repo, revision=commit, files_metadata=True)
        if info.sha != commit:
            raise ManifestError(f"{repo}: the hub answered commit {info.sha} for {commit}")
        return [hub_file_spec(sibling) for sibling in info.siblings or []]

    def download(self, repo: str, commit: str, path: str, dest_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(
            hf_hub_download(repo, path, revision=commit, local_dir=dest_dir, token=self.token, endpoint=self.endpoint)
        )


def hub_file_spec(sibling) -> FileSpec:
    """A file of a hub commit as the hub describes it (`model_info(files_metadata=True)`): an LFS
    file by its LFS size and sha256, a small file by its size and git blob id."""
    if sibling.lfs is not None:
        return FileSpec(sibling.rfilename, sibling.lfs.size, sibling.lfs.sha256)
    return FileSpec(sibling.rfilename, sibling.size, git_sha1=sibling.blob_id)


class ReleaseSource:
    """GitHub release assets (repos named `github.com/{owner}/{name}`): facexlib publishes its
    parsing weights only there. The tag is the revision; the manifest's sha256 pins the bytes."""

    def __init__(
        self, web: str = "https://github.com", api: str = "https://api.github.com", timeout: float = 120
    ) -> None:
        self.web, self.api, self.timeout = web.rstrip("/"), api.rstrip("/"), timeout

    def resolve(self, repo: str, revision: str) -> str:
        return revision

    def list_files(self, repo: str, commit: str) -> list[FileSpec]:
        url = f"{self.api}/repos/{repo.removeprefix(RELEASE_PREFIX)}/releases/tags/{commit}"
        with urllib.request.urlopen(url, timeout=self.timeout) as response:
            return [FileSpec(asset["name"]) for asset in json.load(response)["assets"]]

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

    def list_files(self, repo: str, commit: str) -> list[FileSpec]:
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

    Pinned sources are taken as the manifest says; one pinned by commit alone takes its files,
    with their sizes and hashes, from the source at that commit. Unpinned ones (allowed, or `pin`)
    are resolved at the source: the revision to a commit (the placeholder means main), the files
    from the `include` patterns; files without a hash (release assets) are always downloaded and
    measured. Unpinned or `pin` sources land in `report.pins`.
    """
    if not (allow_unpinned or pin):
        check_pinned(manifest, names)
    report = FetchReport()
    staging = target / STAGING_DIR
    try:
        for name in names:
            model = manifest.model(name)
            model_dir = target / model.dir
            commits, files = {}, []
            for index, spec in enumerate(model.sources):
                resolved = _resolve(spec, source, pin)
                commits[spec.repo] = resolved.revision
                measured = [_place(resolved, f, model_dir, staging, source, report) for f in resolved.files]
                files += [{"repo": spec.repo, **f.as_json(), "path": resolved.target(f)} for f in measured]
                if not spec.pinned or pin:
                    report.pins[(name, index)] = pinned_copy(spec, resolved.revision, measured)
            info = {"id": model.id, "revision": commits[model.sources[0].repo], "sources": commits, "files": files}
            (model_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            log.info("%s ready in %s (%s@%s)", name, model_dir, info["id"], info["revision"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _resolve(spec: SourceSpec, source: Source, pin: bool) -> SourceSpec:
    """The source with a commit and a file list: as pinned, or listed at the source."""
    if spec.pinned and not pin:
        if spec.files:
            return spec
        files = _listing(spec, source, spec.revision)
        if unhashed := [f.path for f in files if not f.pinned]:
            raise ManifestError(
                f"{spec.repo}@{spec.revision}: the source reports no size/hash for {', '.join(unhashed)}"
            )
        return replace(spec, files=files)
    commit = source.resolve(spec.repo, "main" if spec.revision == UNPINNED else spec.revision)
    return replace(spec, revision=commit, files=_listing(spec, source, commit))


def _listing(spec: SourceSpec, source: Source, commit: str) -> tuple[FileSpec, ...]:
    """The repo files at `commit` that the source's `include` patterns select."""
    files = sorted((f for f in source.list_files(spec.repo, commit) if spec.wants(f.path)), key=lambda f: f.path)
    if not files:
        raise ManifestError(f"{spec.repo}@{commit}: no file matches {list(spec.include)}")
    if escaping := [f.path for f in files if ".." in Path(f.path).parts or Path(f.path).is_absolute()]:
        raise ManifestError(f"{spec.repo}@{commit}: a listed path leaves the model folder: {', '.join(escaping)}")
    return tuple(files)


def _place(
    spec: SourceSpec, file: FileSpec, model_dir: Path, staging: Path, source: Source, report: FetchReport
) -> FileSpec:
    """Make model_dir/target hold the file's verified bytes; return it with its size and hash
    (measured where the source gave none)."""
    dest = model_dir / spec.target(file)
    label = f"{spec.repo}/{file.path}"
    if file.pinned:
        try:
            verify_file(dest, file)
            report.kept.append(label)
            return file
        except VerificationError:
            pass  # absent or stale: download it again
    log.info("downloading %s@%s -> %s", label, spec.revision[:12], dest)
    downloaded = source.download(spec.repo, spec.revision, file.path, staging)
    if file.pinned:
        verify_file(downloaded, file)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(downloaded, dest)  # only verified, complete files reach the model folder
    report.fetched.append(label)
    return file if file.pinned else FileSpec(file.path, *file_digest(dest))


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
    parser.add_argument(
        "--with-pulid", action="store_true", help="also the consistent-mode bundle (FLUX.1-dev + PuLID)"
    )
    parser.add_argument(
        "--pin", action="store_true", help="resolve, download, measure and write the pins into the manifest"
    )
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
