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
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from mult.data.retry import RetryPolicy

log = logging.getLogger(__name__)

TMP_MARKER = ".tmp-"  # local temporary files: ``.{name}.tmp-{uuid}``, never listed


class StorageError(IOError):
    """A storage operation failed; the message names the object (``url``) and the error (``cause``).

    The attributes survive code that rewrites ``args`` (webdataset appends to them), so a
    caller can rebuild a message from them.
    """

    def __init__(self, message: str, *, url: str | None = None, cause: str | None = None):
        super().__init__(message)
        self.message, self.url, self.cause = message, url, cause

    def __str__(self) -> str:
        return self.message


class StorageUnavailableError(StorageError):
    """Infrastructure, not data: the store kept failing (throttling, 5xx, credentials, timeouts,
    resets) for longer than ``data.storage_retry_s`` for one object. See :mod:`mult.data.retry`."""


class InsufficientSpaceError(StorageError):
    """A local disk lacks the bytes a write is about to need; nothing was written."""


def ensure_free_space(directory: str | os.PathLike, need: int, what: str) -> None:
    """Raise :class:`InsufficientSpaceError` naming ``directory``, the need and the free bytes
    when ``need`` bytes would not fit (checked before writing, so no half-written file is left)."""
    path = Path(directory)
    while not path.exists() and path != path.parent:  # the disk of the nearest existing parent
        path = path.parent
    free = shutil.disk_usage(path).free
    if need > free:
        raise InsufficientSpaceError(
            f"not enough free space in {str(directory)!r} for {what}: need {need} bytes "
            f"({need / 2**30:.2f} GiB), {free} bytes ({free / 2**30:.2f} GiB) free",
            url=str(directory), cause="no space")


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

    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of all objects under ``prefix`` (a path prefix, not a glob), sorted."""
        return sorted(self.sizes(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:  # pragma: no cover - abstract
        """``{relative path: bytes}`` of all objects under ``prefix``: a listing that can tell a
        whole object from a cut-off one."""
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


def open_storage(url: str | os.PathLike, *, retry: "RetryPolicy | None" = None) -> "Storage":
    """A :class:`LocalStorage` for a path or ``file://`` URL, an :class:`S3Storage` for ``s3://``.

    ``retry`` (S3 only): how long one object may keep failing (default: ``RetryPolicy()``).
    """
    url = os.fspath(url)
    if url.startswith("s3://"):
        from mult.data.s3 import S3Storage

        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"S3 URL {url!r} has no bucket; expected s3://bucket/prefix")
        return S3Storage(bucket, prefix, retry=retry)
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

    def _replace(self, path: Path, write: Callable[[Path], object]) -> None:
        """``write(tmp)`` a hidden temporary next to ``path``, then ``os.replace`` it into place
        (the temporary is removed whatever happens)."""
        tmp = self._tmp_for(path)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())

        self._replace(self._path(rel), write)

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        self._replace(self._path(rel), lambda tmp: shutil.copyfile(local_path, tmp))

    def download_file(self, rel: str, local_path: str | os.PathLike) -> None:
        src, dest = self._path(rel), Path(local_path)
        ensure_free_space(dest.parent, src.stat().st_size, f"a copy of {src}")
        self._replace(dest, lambda tmp: shutil.copyfile(src, tmp))

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def size(self, rel: str) -> int | None:
        try:
            return self._path(rel).stat().st_size
        except FileNotFoundError:
            return None

    def sizes(self, prefix: str = "") -> dict[str, int]:
        prefix = _check_rel(prefix)
        if not self.root.is_dir():
            return {}
        out = {}
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(".") and TMP_MARKER in name:
                    continue
                path = Path(dirpath, name)
                rel = path.relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    try:
                        out[rel] = path.stat().st_size
                    except FileNotFoundError:  # removed while we listed
                        continue
        return out

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
