"""The weights manifest (builder/manifest.json): what the image holds, pinned to commits and hashes.

Pinning is what makes an image reproducible: a hub revision is a 40-hex commit (a branch moves).
A commit is content-addressed, so the sizes and hashes the hub reports for it (sha256 for LFS
files, the git blob sha1 for small ones) are as fixed as the commit: a source pinned by commit
alone is verified against them at build time. A GitHub release tag is not content-addressed, so
its files carry the sha256 measured when a maintainer pinned it. Either way a build that gets
different bytes fails instead of serving another model under the same name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path

MANIFEST_PATH = Path(__file__).resolve().parent / "manifest.json"
MODEL_INFO_FILE = "model_info.json"  # read by pipelines.z_image.read_model_identity
UNPINNED = "UNPINNED-run-builder/fetch_models.py--pin"
PIN_HELP = (
    "To pin: python -m builder.fetch_models --pin --target /tmp/models [--with-pulid]\n"
    "  (resolves each revision to its current commit, downloads, writes the commit and each file's "
    "size and hash into builder/manifest.json; review and commit it).\n"
    "To build anyway from the repos' current main, unverified: add --allow-unpinned "
    "(docker: --build-arg ALLOW_UNPINNED=1)."
)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = _COMMIT
_CHUNK = 8 * 2**20


class ManifestError(ValueError):
    """The manifest is malformed, or not pinned where a pinned one is required."""


class VerificationError(RuntimeError):
    """A file's bytes differ from what the manifest pinned."""


@dataclass(frozen=True)
class FileSpec:
    """One file of a repo: its path there and, once pinned, its size and either its sha256 (LFS
    files, release assets) or its git blob sha1 (the hub's small non-LFS files have only that)."""

    path: str
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None

    @property
    def pinned(self) -> bool:
        hashed = bool(self.sha256 and _SHA256.fullmatch(self.sha256)) or bool(
            self.git_sha1 and _SHA1.fullmatch(self.git_sha1)
        )
        return isinstance(self.size, int) and hashed

    def as_json(self) -> dict:
        """The manifest's (and model_info.json's) form: only the hash this file has."""
        document: dict = {"path": self.path, "size": self.size}
        if self.git_sha1 and not self.sha256:
            document["git_sha1"] = self.git_sha1
        else:
            document["sha256"] = self.sha256
        return document


RELEASE_PREFIX = "github.com/"


def is_release(repo: str) -> bool:
    """A `github.com/{owner}/{name}` source is a GitHub release, any other a Hugging Face hub repo."""
    return repo.startswith(RELEASE_PREFIX)


@dataclass(frozen=True)
class SourceSpec:
    """Files of one hub repo at one revision, placed under `target_dir` of the model's folder.
    `include` (glob patterns) selects the repo files; `files`, when listed, pins them. A hub source
    pinned by commit with no `files` takes them, with sizes and hashes, from the hub at build time.

    A repo named `github.com/{owner}/{name}` is a GitHub release instead: `revision` is its tag,
    `include` names the assets, and the assets' sha256 pin it (a tag is not a commit)."""

    repo: str
    revision: str
    target_dir: str
    include: tuple[str, ...]
    files: tuple[FileSpec, ...] = ()

    @property
    def release(self) -> bool:
        return is_release(self.repo)

    @property
    def pinned(self) -> bool:
        return not self.problems()

    def wants(self, repo_path: str) -> bool:
        return any(fnmatch(repo_path, pattern) for pattern in self.include)

    def target(self, file: FileSpec) -> str:
        """The file's path inside the model folder."""
        return f"{self.target_dir.strip('/')}/{file.path}".lstrip("/")

    def problems(self) -> list[str]:
        """Why this source is not pinned (empty when it is)."""
        found = []
        if self.release and self.revision == UNPINNED:
            found.append(f"{self.repo}: no release tag")
        elif not self.release and not _COMMIT.fullmatch(self.revision):
            found.append(f"{self.repo}: revision {self.revision!r} is not a 40-hex commit")
        if self.release and not self.files:
            found.append(f"{self.repo}: no file list")
        elif self.release and (unhashed := [f.path for f in self.files if not f.sha256]):
            found.append(f"{self.repo}: no sha256 for {', '.join(unhashed)} (a release tag can move)")
        elif unpinned := [f.path for f in self.files if not f.pinned]:
            found.append(f"{self.repo}: no size/hash for {', '.join(unpinned)}")
        return found


@dataclass(frozen=True)
class ModelSpec:
    """One model folder under the target (the worker's MODEL_DIR or PULID_MODEL_DIR)."""

    name: str
    dir: str
    id: str
    sources: tuple[SourceSpec, ...]


@dataclass(frozen=True)
class Manifest:
    models: dict[str, ModelSpec]
    comment: str = ""

    def model(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise ManifestError(f"no model {name!r} in the manifest (has: {', '.join(self.models)})")
        return self.models[name]


def load_manifest(path: Path = MANIFEST_PATH) -> Manifest:
    """Parse and check the manifest's shape; raise ManifestError naming the bad entry."""
    raw = json.loads(Path(path).read_text())
    try:
        models = {
            name: ModelSpec(
                name=name,
                dir=entry["dir"],
                id=entry["id"],
                sources=tuple(_source(source) for source in entry["sources"]),
            )
            for name, entry in raw["models"].items()
        }
    except (KeyError, TypeError) as err:
        raise ManifestError(f"{path}: malformed manifest ({type(err).__name__}: {err})") from None
    for model in models.values():
        targets = [source.target(f) for source in model.sources for f in source.files]
        if len(targets) != len(set(targets)):
            raise ManifestError(f"{path}: {model.name}: two files have the same target path")
        if any(".." in Path(t).parts or Path(t).is_absolute() for t in targets):
            raise ManifestError(f"{path}: {model.name}: a target path leaves the model folder")
    return Manifest(models=models, comment=raw.get("comment", ""))


def _source(entry: dict) -> SourceSpec:
    return SourceSpec(
        repo=entry["repo"],
        revision=entry["revision"],
        target_dir=entry.get("target_dir", ""),
        include=tuple(entry["include"]),
        files=tuple(
            FileSpec(f["path"], f.get("size"), f.get("sha256"), f.get("git_sha1")) for f in entry.get("files", [])
        ),
    )


def save_manifest(manifest: Manifest, path: Path = MANIFEST_PATH) -> None:
    """Write the manifest back (what `--pin` does), in the layout `load_manifest` reads."""
    document = {
        "comment": manifest.comment,
        "models": {
            model.name: {
                "dir": model.dir,
                "id": model.id,
                "sources": [
                    {
                        "repo": s.repo,
                        "revision": s.revision,
                        "target_dir": s.target_dir,
                        "include": list(s.include),
                        "files": [f.as_json() for f in s.files],
                    }
                    for s in model.sources
                ],
            }
            for model in manifest.models.values()
        },
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n")


def file_digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file, streamed: weights are tens of GB."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The id git (and so the hub) gives a file's bytes: sha1 of `blob <size>\\0` + the bytes."""
    digest = hashlib.sha1(f"blob {Path(path).stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, expected: FileSpec) -> None:
    """Raise VerificationError naming the file unless its size and hash (sha256, else the git blob
    sha1) are the pinned ones."""
    if not path.is_file():
        raise VerificationError(f"{path}: missing (expected {expected.size} bytes)")
    size = path.stat().st_size
    if size != expected.size:
        raise VerificationError(f"{path}: size mismatch: expected {expected.size} bytes, got {size}")
    if expected.sha256:
        kind, want, got = "sha256", expected.sha256, file_digest(path)[1]
    elif expected.git_sha1:
        kind, want, got = "git blob sha1", expected.git_sha1, git_blob_sha1(path)
    else:
        raise VerificationError(f"{path}: no hash to verify against")
    if got != want:
        raise VerificationError(f"{path}: {kind} mismatch: expected {want}, got {got}")


def pinned_copy(source: SourceSpec, commit: str, files: list[FileSpec]) -> SourceSpec:
    """The source pinned to `commit` with the measured or hub-reported sizes and hashes of its files."""
    return replace(source, revision=commit, files=tuple(sorted(files, key=lambda f: f.path)))
