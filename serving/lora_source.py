"""Where a job's LoRA file comes from: a name inside LORA_DIR, or an https URL (cached on disk).

Everything here comes from a client, so everything is bounded: names cannot leave LORA_DIR (no
`..`, no absolute paths, no symlink out), files and downloads have a size limit, a download has one
deadline for the whole transfer (not per read: a server dripping a byte a second is cut off), and
URLs reach only public addresses, checked after DNS resolution and at every redirect, with the
connection made to the address that was checked.

Downloads are kept in LORA_CACHE_DIR by content sha256 (bounded bytes, least recently used out) with
a small URL -> sha256 index, so a repeated URL is read from disk. URLs are taken as immutable: a
new file needs a new URL (as with hub revisions and CivitAI version ids).
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cachetools import LRUCache

from pipelines.lora import LoraError
from serving import public_fetch
from serving.public_fetch import FetchError, FetchLimits

SUFFIX = ".safetensors"
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LoraFile:
    """A resolved LoRA: its content hash (the adapter cache key), its bytes (in memory, or a file
    read only when the adapter cache misses), and whether a download was avoided (`cache_hit`:
    served from LORA_CACHE_DIR; always False for LORA_DIR files, which are local anyway)."""

    sha256: str
    size: int
    cache_hit: bool
    location: Path | None = None
    data: bytes | None = field(default=None, repr=False)

    def read(self) -> bytes:
        return self.data if self.data is not None else self.location.read_bytes()


def _too_big(max_bytes: int) -> LoraError:
    return LoraError(f"must be at most {max_bytes / 2**20:g} MB")


# -- the disk cache -----------------------------------------------------------------------------
class DiskCache:
    """Files by content sha256 under `root`, total bytes bounded, least recently used evicted.

    Use is recorded in the file's mtime (atime is often off on volumes). Writes are atomic
    (temp file + rename), so a crash never leaves a half file under a sha256 name.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "urls").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _blob(self, sha256: str) -> Path:
        return self.root / "blobs" / f"{sha256}{SUFFIX}"

    def _url_entry(self, url: str) -> Path:
        return self.root / "urls" / hashlib.sha256(url.encode()).hexdigest()

    def lookup(self, url: str) -> LoraFile | None:
        """The cached file for this URL, marked as just used; None if absent or evicted."""
        with self._lock:
            try:
                sha256 = self._url_entry(url).read_text().strip()
            except OSError:
                return None
            blob = self._blob(sha256)
            if not _SHA256.fullmatch(sha256) or not blob.is_file():
                return None
            os.utime(blob)
            return LoraFile(sha256, blob.stat().st_size, cache_hit=True, location=blob)

    def store(self, url: str, data: bytes) -> LoraFile:
        """Keep `data` (if it fits at all), index it under `url`, evict down to the byte bound."""
        sha256 = hashlib.sha256(data).hexdigest()
        blob = self._blob(sha256)
        with self._lock:
            _write_atomic(blob, data)
            _write_atomic(self._url_entry(url), sha256.encode())
            self._evict(keep=blob)
        return LoraFile(sha256, len(data), cache_hit=False, location=blob, data=data)

    def _evict(self, keep: Path) -> None:
        blobs = []
        for path in (self.root / "blobs").glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            blobs.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in blobs)
        for _, size, path in sorted(blobs, key=lambda b: b[0]):
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "blobs").glob(f"*{SUFFIX}"))


def _write_atomic(target: Path, data: bytes) -> None:
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


# -- the source ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSourceConfig:
    """LORA_DIR (None: names refused), whether URLs are allowed, LORA_MAX_MB as bytes, the download
    deadline, and LORA_CACHE_DIR with its byte bound (None: downloads are kept in memory only)."""

    lora_dir: Path | None
    allow_urls: bool
    max_bytes: int
    fetch_timeout_s: float
    cache_dir: Path | None
    cache_max_bytes: int


class LoraSource:
    """Resolves a job's `path` to a LoraFile; raises LoraError, as a file that does not fit the model
    does."""

    def __init__(
        self, config: LoraSourceConfig, check_address: Callable[[str], None] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.cache = DiskCache(config.cache_dir, config.cache_max_bytes) if config.cache_dir else None
        self._check_address, self._context = check_address, context
        self._hashes: LRUCache = LRUCache(maxsize=4096)  # LORA_DIR file identity -> sha256: hash once
        self._lock = threading.Lock()

    def resolve(self, path: str) -> LoraFile:
        if "://" in path:
            return self._from_url(path)
        return self._from_dir(path)

    def _from_url(self, url: str) -> LoraFile:
        if not url.startswith("https://"):
            raise LoraError("URLs must use https")
        if not self.config.allow_urls:
            raise LoraError("URLs are disabled on this endpoint")
        if self.cache is not None and (hit := self.cache.lookup(url)) is not None:
            return hit
        try:
            data = public_fetch.fetch_https(url, FetchLimits(self.config.max_bytes, self.config.fetch_timeout_s),
                                            check_address=self._check_address, context=self._context)
        except FetchError as err:
            raise LoraError(err.rule) from None
        if self.cache is not None and len(data) <= self.cache.max_bytes:
            return self.cache.store(url, data)
        return LoraFile(hashlib.sha256(data).hexdigest(), len(data), cache_hit=False, data=data)

    def _from_dir(self, name: str) -> LoraFile:
        root = self.config.lora_dir
        if root is None:
            raise LoraError("LORA_DIR is not set on this endpoint: use an https URL")
        if not name or name.startswith(("/", "\\", "~")) or "\\" in name or "\x00" in name:
            raise LoraError("must be a file name inside LORA_DIR")
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise LoraError("must be a file name inside LORA_DIR (no '.' or '..' parts)")
        if not name.endswith(SUFFIX):
            raise LoraError(f"must be a {SUFFIX} file")
        base = root.resolve()
        target = (base / name).resolve()
        if not target.is_relative_to(base):
            raise LoraError("must be a file name inside LORA_DIR")
        try:
            stat = target.stat()
        except OSError:
            raise LoraError("no such file in LORA_DIR") from None
        if not target.is_file():
            raise LoraError("no such file in LORA_DIR")
        if stat.st_size > self.config.max_bytes:
            raise _too_big(self.config.max_bytes)
        identity = (str(target), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            sha256 = self._hashes.get(identity)
        if sha256 is None:
            sha256 = _hash_file(target)
            with self._lock:
                self._hashes[identity] = sha256
        return LoraFile(sha256, stat.st_size, cache_hit=False, location=target)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
