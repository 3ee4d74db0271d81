"""Object storage behind one small interface: a local directory or ``s3://bucket/prefix``.

Every path handed to a :class:`Storage` is relative to its root (``"shard-000000.tar"``,
``"_work/groups/a.json"``), always with forward slashes. S3 lives in :mod:`mult.data.s3`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

log = logging.getLogger(__name__)

TMP_MARKER = ".tmp-"  # local temporary files: ``.{name}.tmp-{uuid}``, never listed


class StorageError(IOError):
    """A storage operation failed after its retries; the message names the object."""


# ---------------------------------------------------------------------------------------------
# The interface.
# ---------------------------------------------------------------------------------------------
class Storage:
    """A root (local directory or S3 prefix) holding objects addressed by relative paths."""

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as fh:
            return fh.read()

    def open_read(self, rel: str) -> IO[bytes]:  # pragma: no cover - abstract
        """A streaming, buffered binary file object; raises FileNotFoundError when absent."""
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> None:  # pragma: no cover - abstract
        """Write an object atomically: readers see the old object or the whole new one."""
        raise NotImplementedError

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:  # pragma: no cover
        """Publish a local file atomically (S3: managed multipart upload)."""
        raise NotImplementedError

    def download_file(self, rel: str, local_path: str | os.PathLike) -> None:  # pragma: no cover
        raise NotImplementedError

    def exists(self, rel: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def size(self, rel: str) -> int | None:  # pragma: no cover - abstract
        """Bytes of an object, or None when it does not exist."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:  # pragma: no cover - abstract
        """Relative paths of all objects under ``prefix`` (a path prefix, not a glob), sorted."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:  # pragma: no cover - abstract
        """Remove an object; removing an absent object is not an error."""
        raise NotImplementedError

    def url(self, rel: str = "") -> str:  # pragma: no cover - abstract
        """The absolute URL of ``rel``: a local path or ``s3://bucket/key``."""
        raise NotImplementedError


def _check_rel(rel: str) -> str:
    rel = rel.replace("\\", "/").lstrip("/")
    if any(part == ".." for part in rel.split("/")):
        raise ValueError(f"storage path {rel!r} may not contain '..'")
    return rel


def open_storage(url: str | os.PathLike) -> "Storage":
    """A :class:`LocalStorage` for a path or ``file://`` URL, an :class:`S3Storage` for ``s3://``."""
    url = os.fspath(url)
    if url.startswith("s3://"):
        from mult.data.s3 import S3Storage

        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"S3 URL {url!r} has no bucket; expected s3://bucket/prefix")
        return S3Storage(bucket, prefix)
    if url.startswith("file://"):
        return LocalStorage(url[len("file://"):])
    if "://" in url:
        raise ValueError(f"unsupported storage URL {url!r}; use a local path or s3://bucket/prefix")
    return LocalStorage(url)


# ---------------------------------------------------------------------------------------------
# Local directories.
# ---------------------------------------------------------------------------------------------
class LocalStorage(Storage):
    """A directory. Writes go to a hidden temporary name in the same directory, then
    ``os.replace`` publishes them, so a killed writer never leaves a half-written object."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def _path(self, rel: str) -> Path:
        return self.root / _check_rel(rel)

    def _tmp_for(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")

    def open_read(self, rel: str) -> IO[bytes]:
        return open(self._path(rel), "rb")

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        tmp = self._tmp_for(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        path = self._path(rel)
        tmp = self._tmp_for(path)
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def download_file(self, rel: str, local_path: str | os.PathLike) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(rel), local_path)

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def size(self, rel: str) -> int | None:
        try:
            return self._path(rel).stat().st_size
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_rel(prefix)
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(".") and TMP_MARKER in name:
                    continue
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def url(self, rel: str = "") -> str:
        return str(self._path(rel)) if rel else str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"


def read_json(url: str | os.PathLike) -> Any:
    """Parse the JSON object at ``url`` (a file path or ``s3://bucket/key``); ValueError when it
    is not valid JSON, FileNotFoundError when it is absent."""
    parent, _, name = os.fspath(url).rstrip("/").rpartition("/")
    try:
        return json.loads(open_storage(parent or ".").read_bytes(name))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{os.fspath(url)}: not valid JSON ({exc})") from exc


def iter_chunks(fh: IO[bytes], chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Read a file object to its end in chunks."""
    while True:
        chunk = fh.read(chunk_size)
        if not chunk:
            return
        yield chunk
