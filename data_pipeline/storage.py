"""Where datasets live: a local path or any pyarrow filesystem URI (s3://, gs://, hdfs://, file://).

Why pyarrow filesystems: they are already a dependency, speak S3 natively (credentials from the usual
AWS environment/config chain, endpoint and region from the URI query, e.g.
`s3://bucket/data?endpoint_override=http://127.0.0.1:9000&scheme=http`), and give the same
streaming API for reading inputs and writing shards, so prepare and the loader have one code path.

Reading a remote dataset never memory-maps across the network: each shard is fetched into a local
cache directory, checked against the manifest's size and SHA-256 while it streams in, and only then
renamed into place (atomically, so a crashed fetch or two ranks fetching the same shard never leave a
half file behind). Fetches run on a small thread pool so the loader can ask for the shards its next
batches need before it needs them.

Traded off: the cache is not bounded. A global permutation touches every shard in every stretch of
training, so evicting shards would mean re-downloading them all the time; the cache dir must hold the
dataset (as Megatron's local copy must). Paths in a manifest are relative and may not escape the
dataset root, so a hostile manifest cannot point the loader (or the cache) at other files.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow.fs as pafs

__all__ = [
    "Location",
    "ShardFetcher",
    "UnsafePathError",
    "IntegrityError",
    "resolve",
    "safe_relpath",
]

_READ_BLOCK = 8 << 20


class UnsafePathError(ValueError):
    """A path in a manifest points outside the dataset root."""


class IntegrityError(ValueError):
    """Stored data does not match what its manifest promises (size, checksum, token range)."""


def is_uri(location: str) -> bool:
    return "://" in location


class Location:
    """A dataset root: a pyarrow filesystem plus the root path inside it."""

    def __init__(self, fs: pafs.FileSystem, root: str, uri: str, local: bool) -> None:
        self.fs, self.root, self.uri, self.local = fs, root.rstrip("/") or "/", uri, local

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, safe_relpath(rel, self.uri))

    def child(self, rel: str) -> Location:
        """The Location of a subdirectory (e.g. the held-out `eval/` split)."""
        rel = safe_relpath(rel, self.uri)
        return Location(self.fs, self.path(rel), self.uri_of(rel), self.local)

    def uri_of(self, rel: str) -> str:
        """A path or URI naming the file `rel` (a remote URI keeps its query, e.g. the endpoint)."""
        if self.local:
            return self.path(rel)
        base, sep, query = self.uri.partition("?")
        return base.rstrip("/") + "/" + safe_relpath(rel, self.uri) + sep + query

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file; local writes go through a temp file and a rename (atomic)."""
        target = self.path(rel)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        tmp = target if not self.local else f"{target}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if tmp != target:
            os.replace(tmp, target)

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def list_files(self, rel: str) -> list[str]:
        """Relative paths of the files under `rel` (recursive, sorted); [] when it does not exist."""
        base = self.path(rel)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        root = self.root.rstrip("/") + "/"
        return sorted(i.path[len(root):] for i in infos if i.type == pafs.FileType.File)

    def __repr__(self) -> str:
        return self.uri


def resolve(location: str | os.PathLike) -> Location:
    """A Location for a local path or a pyarrow filesystem URI."""
    text = os.fspath(location)
    if not text:
        raise ValueError("a dataset location is an empty string; pass a directory or a URI such as s3://b/p")
    if is_uri(text) and not text.startswith("file://"):
        try:
            fs, root = pafs.FileSystem.from_uri(text)
        except Exception as exc:  # pyarrow raises several types for a bad URI
            raise ValueError(f"cannot open filesystem URI {text!r}: {exc}") from exc
        return Location(fs, root, text, local=False)
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = os.path.abspath(os.path.expanduser(text))
    return Location(pafs.LocalFileSystem(), path, path, local=True)


def safe_relpath(rel: str, root: object) -> str:
    """`rel` normalised; refuses absolute paths, `..` escapes, URIs and backslashes."""
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"manifest path {rel!r} under {root} must be a non-empty relative path")
    norm = posixpath.normpath(rel)
    if (
        rel.startswith(("/", "~"))
        or "\\" in rel
        or "://" in rel
        or norm == ".."
        or norm.startswith("../")
        or norm == "."
    ):
        raise UnsafePathError(
            f"manifest path {rel!r} escapes the dataset root {root}; shard paths must be relative "
            "paths inside the dataset directory (re-run prepare to rewrite the manifest)"
        )
    return norm


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


class ShardFetcher:
    """Fetch remote shards into `cache_dir`, verified by size and SHA-256; prefetch on a thread pool."""

    def __init__(self, location: Location, cache_dir: str, workers: int = 2) -> None:
        self._loc = location
        self._cache = os.path.abspath(os.path.expanduser(cache_dir))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ds_fp4-fetch")
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()

    def local_path(self, rel: str) -> str:
        return os.path.join(self._cache, safe_relpath(rel, self._loc.uri))

    def prefetch(self, rel: str, nbytes: int, sha256: str) -> None:
        """Start fetching `rel` in the background if it is neither cached nor on its way."""
        with self._lock:
            if rel in self._pending or self._cached(rel, nbytes):
                return
            self._pending[rel] = self._pool.submit(self._fetch, rel, nbytes, sha256)

    def get(self, rel: str, nbytes: int, sha256: str) -> str:
        """The local path of `rel`, fetching (and verifying) it first if needed."""
        if self._cached(rel, nbytes):
            return self.local_path(rel)
        self.prefetch(rel, nbytes, sha256)
        with self._lock:
            future = self._pending.get(rel)
        if future is not None:
            try:
                future.result()
            finally:
                with self._lock:
                    self._pending.pop(rel, None)
        return self.local_path(rel)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def _cached(self, rel: str, nbytes: int) -> bool:
        try:
            return os.path.getsize(self.local_path(rel)) == nbytes
        except OSError:
            return False

    def _fetch(self, rel: str, nbytes: int, sha256: str) -> None:
        target = self.local_path(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.part-{uuid.uuid4().hex}"
        h, size = hashlib.sha256(), 0
        try:
            with self._loc.fs.open_input_stream(self._loc.path(rel)) as src, open(tmp, "wb") as dst:
                while block := src.read(_READ_BLOCK):
                    h.update(block)
                    size += len(block)
                    dst.write(block)
            if size != nbytes:
                raise IntegrityError(
                    f"shard {self._loc.uri}/{rel} is {size} bytes but the manifest says {nbytes} "
                    "(truncated or replaced); re-run prepare or re-upload the shard"
                )
            if h.hexdigest() != sha256:
                raise IntegrityError(
                    f"shard {self._loc.uri}/{rel} has SHA-256 {h.hexdigest()} but the manifest says "
                    f"{sha256} (corrupted); re-run prepare or re-upload the shard"
                )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
