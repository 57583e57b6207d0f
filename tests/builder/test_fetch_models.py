"""The builder's logic against a local fake hub: manifest, pinning, verification, placement, idempotency."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from builder.fetch_models import BuildSource, FetchReport, ReleaseSource, fetch_models, main, pin_manifest
from builder.manifest import (
    MANIFEST_PATH,
    MODEL_INFO_FILE,
    UNPINNED,
    FileSpec,
    ManifestError,
    VerificationError,
    load_manifest,
    save_manifest,
)
from pipelines.pulid_flux import PARSING_WEIGHTS
from pipelines.z_image import read_model_identity

ROOT = Path(__file__).resolve().parents[2]
FILES = {
    "acme/turbo": {"model_index.json": b"{}", "transformer/w.safetensors": b"w" * 1000, "README.md": b"not wanted"},
    "acme/flux": {"model_index.json": b"{}", "vae/v.safetensors": b"v" * 300},
    "acme/faces": {"glintr100.onnx": b"g" * 50, "other.onnx": b"o"},
}


class FakeHub:
    """Repos as folders {root}/{repo}/{path}; every revision resolves to one fake commit per repo."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.downloads: list[str] = []

    def resolve(self, repo: str, revision: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def list_files(self, repo: str, commit: str) -> list[str]:
        base = self.root / repo
        return [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]

    def download(self, repo: str, commit: str, path: str, dest_dir: Path) -> Path:
        assert commit == self.resolve(repo, commit), "downloads name the resolved commit"
        self.downloads.append(f"{repo}/{path}")
        dest = dest_dir / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / repo / path, dest)
        return dest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(tmp_path: Path) -> FakeHub:
    for repo, files in FILES.items():
        for path, data in files.items():
            (tmp_path / "hub" / repo / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "hub" / repo / path).write_bytes(data)
    return FakeHub(tmp_path / "hub")


def source(repo: str, target_dir: str, include: list[str], pinned: bool) -> dict:
    if not pinned:
        return {"repo": repo, "revision": UNPINNED, "target_dir": target_dir, "include": include, "files": []}
    files = [{"path": p, "size": len(d), "sha256": sha(d)} for p, d in FILES[repo].items()
             if any(re.fullmatch(i.replace("*", ".*"), p) for i in include)]
    commit = hashlib.sha1(repo.encode()).hexdigest()
    return {"repo": repo, "revision": commit, "target_dir": target_dir, "include": include, "files": files}


def write_manifest(path: Path, pinned: bool = True) -> Path:
    document = {"comment": "test", "models": {
        "z-image-turbo": {"dir": "z-image-turbo", "id": "acme/turbo", "sources": [
            source("acme/turbo", "", ["model_index.json", "transformer/*"], pinned)]},
        "pulid-flux": {"dir": "pulid-flux", "id": "pulid-test", "sources": [
            source("acme/flux", "flux", ["model_index.json", "vae/*"], pinned),
            source("acme/faces", "insightface/models/antelopev2", ["glintr100.onnx"], pinned)]},
    }}
    path.write_text(json.dumps(document))
    return path


def test_the_shipped_manifest_parses_and_names_the_bundle_layout() -> None:
    manifest = load_manifest(MANIFEST_PATH)
    assert manifest.model("z-image-turbo").id == "Tongyi-MAI/Z-Image-Turbo"
    pulid = {s.repo: s for s in manifest.model("pulid-flux").sources}
    assert pulid["black-forest-labs/FLUX.1-dev"].target_dir == "flux"
    assert pulid["guozinan/PuLID"].wants("pulid_flux_v0.9.1.safetensors")
    assert pulid["QuanSun/EVA-CLIP"].wants("EVA02_CLIP_L_336_psz14_s6B.pt")
    assert pulid["DIAMONIK7777/antelopev2"].target_dir == "insightface/models/antelopev2"
    assert not pulid["black-forest-labs/FLUX.1-dev"].wants("flux1-dev.safetensors")  # the single-file copy
    parsing = pulid["github.com/xinntao/facexlib"]
    assert parsing.release and parsing.revision == "v0.2.0" and parsing.include == ("parsing_bisenet.pth",)
    assert parsing.target(FileSpec("parsing_bisenet.pth")) == f"facexlib/{PARSING_WEIGHTS}"


def test_files_land_at_their_target_paths_with_model_info(tmp_path: Path, hub: FakeHub) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json"))
    fetch_models(manifest, tmp_path / "models", hub, ("z-image-turbo", "pulid-flux"))

    models = tmp_path / "models"
    assert (models / "z-image-turbo/transformer/w.safetensors").read_bytes() == b"w" * 1000
    assert (models / "pulid-flux/flux/vae/v.safetensors").is_file()
    assert (models / "pulid-flux/insightface/models/antelopev2/glintr100.onnx").is_file()
    assert not (models / "z-image-turbo/README.md").exists()
    assert not (models / ".staging").exists()
    identity = read_model_identity(models / "z-image-turbo")
    assert (identity.id, identity.revision, identity.demo) == ("acme/turbo", hub.resolve("acme/turbo", ""), False)


def test_a_second_run_downloads_nothing(tmp_path: Path, hub: FakeHub) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json"))
    first = fetch_models(manifest, tmp_path / "models", hub, ("z-image-turbo",))
    hub.downloads.clear()
    second = fetch_models(manifest, tmp_path / "models", hub, ("z-image-turbo",))
    assert len(first.fetched) == 2 and hub.downloads == [] and second.fetched == []
    assert sorted(second.kept) == ["acme/turbo/model_index.json", "acme/turbo/transformer/w.safetensors"]


def test_a_corrupted_file_in_the_target_is_downloaded_again(tmp_path: Path, hub: FakeHub) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json"))
    fetch_models(manifest, tmp_path / "models", hub, ("z-image-turbo",))
    (tmp_path / "models/z-image-turbo/transformer/w.safetensors").write_bytes(b"x" * 1000)
    hub.downloads.clear()
    fetch_models(manifest, tmp_path / "models", hub, ("z-image-turbo",))
    assert hub.downloads == ["acme/turbo/transformer/w.safetensors"]
    assert (tmp_path / "models/z-image-turbo/transformer/w.safetensors").read_bytes() == b"w" * 1000


@pytest.mark.parametrize("bad, message", [
    (b"w" * 999, "size mismatch: expected 1000 bytes, got 999"),
    (b"W" * 1000, f"sha256 mismatch: expected {sha(b'w' * 1000)}, got {sha(b'W' * 1000)}"),
])
def test_a_source_serving_other_bytes_fails_naming_the_file(tmp_path: Path, hub: FakeHub, bad: bytes, message: str) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json"))
    (hub.root / "acme/turbo/transformer/w.safetensors").write_bytes(bad)
    with pytest.raises(VerificationError) as err:
        fetch_models(manifest, tmp_path / "models", hub, ("z-image-turbo",))
    assert "w.safetensors" in str(err.value) and message in str(err.value)
    assert not (tmp_path / "models/z-image-turbo/transformer/w.safetensors").exists()


def test_an_unpinned_manifest_is_refused_before_any_download(tmp_path: Path, hub: FakeHub, capsys) -> None:
    manifest_path = write_manifest(tmp_path / "m.json", pinned=False)
    with pytest.raises(ManifestError, match="not a 40-hex commit"):
        fetch_models(load_manifest(manifest_path), tmp_path / "models", hub)
    assert main(["--target", str(tmp_path / "models"), "--manifest", str(manifest_path)], hub) == 2
    assert "--pin" in capsys.readouterr().err
    assert hub.downloads == []


def test_allow_unpinned_builds_from_the_current_commit(tmp_path: Path, hub: FakeHub) -> None:
    manifest_path = write_manifest(tmp_path / "m.json", pinned=False)
    args = ["--target", str(tmp_path / "models"), "--manifest", str(manifest_path), "--allow-unpinned"]
    assert main(args, hub) == 0
    assert sorted(hub.downloads) == ["acme/turbo/model_index.json", "acme/turbo/transformer/w.safetensors"]
    assert read_model_identity(tmp_path / "models/z-image-turbo").revision == hub.resolve("acme/turbo", "main")
    assert not load_manifest(manifest_path).model("z-image-turbo").sources[0].pinned  # nothing written


def test_pin_writes_commits_sizes_and_hashes_that_a_build_then_accepts(tmp_path: Path, hub: FakeHub) -> None:
    manifest_path = write_manifest(tmp_path / "m.json", pinned=False)
    assert main(["--target", str(tmp_path / "pin"), "--manifest", str(manifest_path), "--pin", "--with-pulid"], hub) == 0

    pinned = load_manifest(manifest_path)
    expected = load_manifest(write_manifest(tmp_path / "expected.json", pinned=True))
    assert pinned.models == expected.models
    hub.downloads.clear()
    assert main(["--target", str(tmp_path / "models"), "--manifest", str(manifest_path), "--with-pulid"], hub) == 0
    assert sorted(hub.downloads) == sorted(f"{s.repo}/{f.path}" for m in pinned.models.values()
                                          for s in m.sources for f in s.files)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json"))
    save_manifest(manifest, tmp_path / "again.json")
    assert load_manifest(tmp_path / "again.json") == manifest


def test_a_target_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.json")
    document = json.loads(path.read_text())
    document["models"]["z-image-turbo"]["sources"][0]["target_dir"] = "../elsewhere"
    path.write_text(json.dumps(document))
    with pytest.raises(ManifestError, match="leaves the model folder"):
        load_manifest(path)


def test_pin_manifest_replaces_only_measured_sources(tmp_path: Path) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json", pinned=False))
    assert pin_manifest(manifest, FetchReport()) == manifest


def test_the_builder_writes_the_file_the_worker_reads() -> None:
    from models.z_image_demo import MODEL_INFO_FILE as WORKER_MODEL_INFO_FILE

    assert MODEL_INFO_FILE == WORKER_MODEL_INFO_FILE


class ReleaseHandler(BaseHTTPRequestHandler):
    """GitHub's release API and download URL (which redirects to the asset's storage, as GitHub does)."""

    assets: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/api/repos/acme/parser/releases/tags/v1":
            self._send(json.dumps({"assets": [{"name": n} for n in self.assets]}).encode())
        elif self.path.startswith("/web/acme/parser/releases/download/v1/"):
            self.send_response(302)
            self.send_header("Location", "/storage/" + self.path.rsplit("/", 1)[1])
            self.end_headers()
        elif self.path.startswith("/storage/") and (name := self.path.removeprefix("/storage/")) in self.assets:
            self._send(self.assets[name])
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def releases():
    ReleaseHandler.assets = {"parser.pth": b"p" * 4000, "notes.txt": b"n"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), ReleaseHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield ReleaseSource(web=f"{base}/web", api=f"{base}/api", timeout=10)
    server.shutdown()


def test_release_assets_are_pinned_by_tag_and_sha256_and_then_verified(tmp_path: Path, hub: FakeHub, releases) -> None:
    path = write_manifest(tmp_path / "m.json", pinned=False)
    document = json.loads(path.read_text())
    document["models"]["pulid-flux"]["sources"].append(
        {"repo": "github.com/acme/parser", "revision": "v1", "target_dir": "facexlib", "include": ["*.pth"], "files": []})
    path.write_text(json.dumps(document))
    source = BuildSource(hub, releases)
    assert "github.com/acme/parser: no file list" in load_manifest(path).model("pulid-flux").sources[-1].problems()

    assert main(["--target", str(tmp_path / "pin"), "--manifest", str(path), "--pin", "--with-pulid"], source) == 0
    pinned = load_manifest(path).model("pulid-flux").sources[-1]
    assert pinned.pinned and pinned.revision == "v1"
    assert pinned.files == (FileSpec("parser.pth", 4000, sha(b"p" * 4000)),)

    assert main(["--target", str(tmp_path / "models"), "--manifest", str(path), "--with-pulid"], source) == 0
    assert (tmp_path / "models/pulid-flux/facexlib/parser.pth").read_bytes() == b"p" * 4000
    ReleaseHandler.assets["parser.pth"] = b"q" * 4000  # the asset was replaced under the same tag
    with pytest.raises(VerificationError, match="parser.pth: sha256 mismatch"):
        fetch_models(load_manifest(path), tmp_path / "other", source, ("pulid-flux",))
