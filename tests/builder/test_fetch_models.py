"""The builder against a loopback Hugging Face hub (the HTTP endpoints huggingface_hub calls):
manifest, pinning by commit, verification against the hub's hashes, placement, idempotency."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit

import pytest

from builder.fetch_models import BuildSource, FetchReport, HubSource, ReleaseSource, fetch_models, main, pin_manifest
from builder.manifest import (
    MANIFEST_PATH,
    MODEL_INFO_FILE,
    UNPINNED,
    FileSpec,
    ManifestError,
    VerificationError,
    git_blob_sha1,
    load_manifest,
    save_manifest,
    verify_file,
)
from pipelines.pulid_flux import PARSING_WEIGHTS
from pipelines.z_image import read_model_identity

ROOT = Path(__file__).resolve().parents[2]
FILES = {
    "acme/turbo": {"model_index.json": b"{}", "transformer/w.safetensors": b"w" * 1000, "README.md": b"not wanted"},
    "acme/flux": {"model_index.json": b"{}", "vae/v.safetensors": b"v" * 300},
    "acme/faces": {"glintr100.onnx": b"g" * 50, "other.onnx": b"o"},
}
LFS_SUFFIXES = (".safetensors", ".onnx")  # as on the hub: weights in LFS, small text files in git


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commit_of(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


def sibling(path: str, data: bytes) -> dict:
    """A file as `GET /api/models/{repo}/revision/{rev}?blobs=true` lists it."""
    if path.endswith(LFS_SUFFIXES):
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha(data)}\nsize {len(data)}\n".encode()
        return {"rfilename": path, "size": len(data), "blobId": blob_sha1(pointer),
                "lfs": {"size": len(data), "sha256": sha(data), "pointerSize": len(pointer)}}
    return {"rfilename": path, "size": len(data), "blobId": blob_sha1(data)}


class HubHandler(BaseHTTPRequestHandler):
    """The hub's repo-info and resolve endpoints. Every revision of a repo resolves to one commit;
    `served` overrides the bytes a download gets (a hub or mirror serving other bytes)."""

    files: ClassVar[dict[str, dict[str, bytes]]] = {}
    served: ClassVar[dict[str, bytes]] = {}
    downloads: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if info := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
            repo = info[1]
            if repo not in self.files:
                return self.send_error(404)
            listing = [sibling(p, d) for p, d in self.files[repo].items()]
            return self._send(json.dumps({"id": repo, "sha": commit_of(repo), "siblings": listing}).encode(), body)
        if (resolve := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([0-9a-f]{40})/(.+)", path)) and resolve[1] in self.files:
            repo, commit, name = resolve[1], resolve[2], resolve[3]
            if commit != commit_of(repo) or name not in self.files[repo]:
                return self.send_error(404)
            data = self.served.get(f"{repo}/{name}", self.files[repo][name])
            if body:
                self.downloads.append(f"{repo}/{name}")
            etag = sha(data) if name.endswith(LFS_SUFFIXES) else blob_sha1(data)
            return self._send(data, body, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'})
        self.send_error(404)

    def _send(self, data: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


class LoopbackHub(HubSource):
    """The real HubSource (huggingface_hub's HfApi and hf_hub_download) pointed at the loopback hub."""

    @property
    def downloads(self) -> list[str]:
        return HubHandler.downloads

    def serve(self, repo_path: str, data: bytes) -> None:
        HubHandler.served[repo_path] = data


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the handler's import sets it for the worker
    HubHandler.files = {repo: dict(files) for repo, files in FILES.items()}
    HubHandler.served, HubHandler.downloads = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield LoopbackHub(token=None, endpoint=f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()


def source(repo: str, target_dir: str, include: list[str], pinned: bool, files: bool = True) -> dict:
    """A manifest source: unpinned, pinned by commit with the hub's hashes listed, or (files=False)
    pinned by commit alone."""
    if not pinned:
        return {"repo": repo, "revision": UNPINNED, "target_dir": target_dir, "include": include, "files": []}
    listed = [{"path": p, **hub_hash(p, d)} for p, d in FILES[repo].items()
              if files and any(re.fullmatch(i.replace("*", ".*"), p) for i in include)]
    return {"repo": repo, "revision": commit_of(repo), "target_dir": target_dir, "include": include, "files": listed}


def hub_hash(path: str, data: bytes) -> dict:
    """What --pin records for a hub file: its size and the hub's hash for it."""
    if path.endswith(LFS_SUFFIXES):
        return {"size": len(data), "sha256": sha(data)}
    return {"size": len(data), "git_sha1": blob_sha1(data)}


def write_manifest(path: Path, pinned: bool = True, files: bool = True) -> Path:
    document = {"comment": "test", "models": {
        "z-image-turbo": {"dir": "z-image-turbo", "id": "acme/turbo", "sources": [
            source("acme/turbo", "", ["model_index.json", "transformer/*"], pinned, files)]},
        "pulid-flux": {"dir": "pulid-flux", "id": "pulid-test", "sources": [
            source("acme/flux", "flux", ["model_index.json", "vae/*"], pinned, files),
            source("acme/faces", "insightface/models/antelopev2", ["glintr100.onnx"], pinned, files)]},
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


def test_files_land_at_their_target_paths_with_model_info(tmp_path: Path, hub: LoopbackHub) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json"))
    fetch_models(manifest, tmp_path / "models", hub, ("z-image-turbo", "pulid-flux"))

    models = tmp_path / "models"
    assert (models / "z-image-turbo/transformer/w.safetensors").read_bytes() == b"w" * 1000
    assert (models / "pulid-flux/flux/vae/v.safetensors").is_file()
    assert (models / "pulid-flux/insightface/models/antelopev2/glintr100.onnx").is_file()
    assert not (models / "z-image-turbo/README.md").exists()
    assert not (models / ".staging").exists()
    identity = read_model_identity(models / "z-image-turbo")
    assert (identity.id, identity.revision, identity.demo) == ("acme/turbo", commit_of("acme/turbo"), False)


def test_a_second_run_downloads_nothing(tmp_path: Path, hub: LoopbackHub) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json"))
    first = fetch_models(manifest, tmp_path / "models", hub, ("z-image-turbo",))
    hub.downloads.clear()
    second = fetch_models(manifest, tmp_path / "models", hub, ("z-image-turbo",))
    assert len(first.fetched) == 2 and hub.downloads == [] and second.fetched == []
    assert sorted(second.kept) == ["acme/turbo/model_index.json", "acme/turbo/transformer/w.safetensors"]


def test_a_corrupted_file_in_the_target_is_downloaded_again(tmp_path: Path, hub: LoopbackHub) -> None:
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
def test_a_source_serving_other_bytes_fails_naming_the_file(
    tmp_path: Path, hub: LoopbackHub, bad: bytes, message: str
) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json"))
    hub.serve("acme/turbo/transformer/w.safetensors", bad)
    with pytest.raises(VerificationError) as err:
        fetch_models(manifest, tmp_path / "models", hub, ("z-image-turbo",))
    assert "w.safetensors" in str(err.value) and message in str(err.value)
    assert not (tmp_path / "models/z-image-turbo/transformer/w.safetensors").exists()


def test_an_unpinned_manifest_is_refused_before_any_download(tmp_path: Path, hub: LoopbackHub, capsys) -> None:
    manifest_path = write_manifest(tmp_path / "m.json", pinned=False)
    with pytest.raises(ManifestError, match="not a 40-hex commit"):
        fetch_models(load_manifest(manifest_path), tmp_path / "models", hub)
    assert main(["--target", str(tmp_path / "models"), "--manifest", str(manifest_path)], hub) == 2
    assert "--pin" in capsys.readouterr().err
    assert hub.downloads == []


def test_allow_unpinned_builds_from_the_current_commit(tmp_path: Path, hub: LoopbackHub) -> None:
    manifest_path = write_manifest(tmp_path / "m.json", pinned=False)
    args = ["--target", str(tmp_path / "models"), "--manifest", str(manifest_path), "--allow-unpinned"]
    assert main(args, hub) == 0
    assert sorted(hub.downloads) == ["acme/turbo/model_index.json", "acme/turbo/transformer/w.safetensors"]
    assert read_model_identity(tmp_path / "models/z-image-turbo").revision == commit_of("acme/turbo")
    assert not load_manifest(manifest_path).model("z-image-turbo").sources[0].pinned  # nothing written


def test_pin_writes_commits_sizes_and_hashes_that_a_build_then_accepts(tmp_path: Path, hub: LoopbackHub) -> None:
    manifest_path = write_manifest(tmp_path / "m.json", pinned=False)
    argv = ["--target", str(tmp_path / "pin"), "--manifest", str(manifest_path), "--pin", "--with-pulid"]
    assert main(argv, hub) == 0

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


def test_release_assets_are_pinned_by_tag_and_sha256_and_then_verified(
    tmp_path: Path, hub: LoopbackHub, releases
) -> None:
    path = write_manifest(tmp_path / "m.json", pinned=False)
    document = json.loads(path.read_text())
    document["models"]["pulid-flux"]["sources"].append(
        {"repo": "github.com/acme/parser", "revision": "v1", "target_dir": "facexlib", "include": ["*.pth"],
         "files": []})
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


def test_the_shipped_manifest_pins_z_image_turbo_by_commit_so_a_build_needs_no_maintainer_step() -> None:
    from builder.fetch_models import check_pinned

    manifest = load_manifest(MANIFEST_PATH)
    (turbo,) = manifest.model("z-image-turbo").sources
    assert turbo.revision == "f332072aa78be7aecdf3ee76d5c247082da564a6" and turbo.pinned
    check_pinned(manifest, ("z-image-turbo",))  # the Dockerfile's default build
    with pytest.raises(ManifestError, match="black-forest-labs/FLUX.1-dev"):
        check_pinned(manifest, ("z-image-turbo", "pulid-flux"))  # opt-in: a maintainer pins it with a token


def test_a_source_pinned_by_commit_alone_is_verified_against_the_hubs_hashes_and_recorded(
    tmp_path: Path, hub: LoopbackHub
) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json", files=False))
    assert main(["--target", str(tmp_path / "models"), "--manifest", str(tmp_path / "m.json")], hub) == 0

    info = json.loads((tmp_path / "models/z-image-turbo" / MODEL_INFO_FILE).read_text())
    assert info["revision"] == commit_of("acme/turbo")
    assert info["files"] == [
        {"repo": "acme/turbo", "path": "model_index.json", "size": 2, "git_sha1": blob_sha1(b"{}")},
        {"repo": "acme/turbo", "path": "transformer/w.safetensors", "size": 1000, "sha256": sha(b"w" * 1000)},
    ]
    hub.downloads.clear()
    assert fetch_models(manifest, tmp_path / "models", hub).fetched == []  # kept copies verify by the hub's hashes


@pytest.mark.parametrize("path, bad, kind", [
    ("transformer/w.safetensors", b"W" * 1000, "sha256"),
    ("model_index.json", b"[]", "git blob sha1"),
])
def test_a_hub_serving_bytes_other_than_its_commit_lists_fails(
    tmp_path: Path, hub: LoopbackHub, path: str, bad: bytes, kind: str
) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json", files=False))
    hub.serve(f"acme/turbo/{path}", bad)
    with pytest.raises(VerificationError, match=f"{re.escape(path)}: {kind} mismatch"):
        fetch_models(manifest, tmp_path / "models", hub)
    assert not (tmp_path / "models/z-image-turbo" / path).exists()


def test_git_blob_sha1_is_gits_own_object_id(tmp_path: Path) -> None:
    import subprocess

    for name, data in {"empty": b"", "config.json": b'{"dim": 3840}\n', "bytes.bin": bytes(range(256)) * 3}.items():
        (tmp_path / name).write_bytes(data)
        expected = subprocess.run(
            ["git", "hash-object", str(tmp_path / name)], capture_output=True, text=True, check=True
        )
        assert git_blob_sha1(tmp_path / name) == expected.stdout.strip()
    assert git_blob_sha1(tmp_path / "empty") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
    verify_file(tmp_path / "config.json", FileSpec("config.json", 14, git_sha1=git_blob_sha1(tmp_path / "config.json")))
    with pytest.raises(VerificationError, match="git blob sha1 mismatch"):
        verify_file(tmp_path / "config.json", FileSpec("config.json", 14, git_sha1=git_blob_sha1(tmp_path / "empty")))


def test_a_release_asset_needs_a_sha256_to_count_as_pinned(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.json")
    document = json.loads(path.read_text())
    document["models"]["pulid-flux"]["sources"].append({"repo": "github.com/acme/parser", "revision": "v1",
        "target_dir": "facexlib", "include": ["*.pth"], "files": [{"path": "p.pth", "size": 4, "git_sha1": "a" * 40}]})
    path.write_text(json.dumps(document))
    assert "sha256" in load_manifest(path).model("pulid-flux").sources[-1].problems()[0]


def test_a_hub_listing_a_path_outside_the_model_folder_is_refused_before_any_download(
    tmp_path: Path, hub: LoopbackHub
) -> None:
    manifest = load_manifest(write_manifest(tmp_path / "m.json", files=False))
    HubHandler.files["acme/turbo"]["transformer/../../../etc/evil.safetensors"] = b"x"
    with pytest.raises(ManifestError, match="leaves the model folder"):
        fetch_models(manifest, tmp_path / "models", hub)
    assert hub.downloads == [] and not (tmp_path / "etc").exists()
