"""Deterministic tar shards: build one, hash it, publish it, verify it.

Tars are byte-deterministic (sorted members, zero mtimes and owners), so a group always
produces the same shards. A shard is built in a local temporary file, published (an atomic
rename locally, a multipart upload on S3, which is invisible until complete) and read back:
its sha256 must match what was written.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

from mult.data.storage import Storage, iter_chunks, open_storage


class ShardVerifyError(RuntimeError):
    """A published shard does not read back as written; the message names it."""


# ---------------------------------------------------------------------------------------------
class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, fh: Any):
        super().__init__()
        self._fh, self.sha = fh, hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.bytes

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self._fh.write(data)


def member_name(key: str, domain: str, ext: str) -> str:
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
    return f"{key}.{domain}.{ext}"


class ShardBuilder:
    """Writes one tar shard to a local file: ``add(key, {"rgb.png": bytes, ...})`` per sample."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "wb")
        self._hasher = _HashingFile(self._fh)
        self._tar = tarfile.open(fileobj=self._hasher, mode="w", format=tarfile.PAX_FORMAT)
        self.keys: list[str] = []

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for suffix in sorted(members):
            data = members[suffix]
            domain, _, ext = suffix.partition(".")
            info = tarfile.TarInfo(member_name(key, domain, ext))
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)

    def close(self) -> tuple[int, str]:
        """Finish the archive; returns ``(bytes, sha256 hex)``."""
        self._tar.close()
        self._fh.close()
        return self._hasher.bytes, self._hasher.sha.hexdigest()


def sha256_of(storage: Storage, rel: str) -> tuple[int, str]:
    """Stream an object and return ``(bytes, sha256 hex)``."""
    sha, n = hashlib.sha256(), 0
    with storage.open_read(rel) as fh:
        for chunk in iter_chunks(fh):
            sha.update(chunk)
            n += len(chunk)
    return n, sha.hexdigest()


def publish_shard(storage: Storage, local: Path, name: str, nbytes: int, sha: str) -> None:
    """Upload ``local`` as ``name`` and verify the published bytes; a mismatch deletes it and raises."""
    storage.upload_file(local, name)
    got_bytes, got_sha = sha256_of(storage, name)
    if (got_bytes, got_sha) != (nbytes, sha):
        storage.delete(name)
        raise ShardVerifyError(
            f"{storage.url(name)}: published shard does not verify (read back {got_bytes} bytes, "
            f"sha256 {got_sha[:12]}; wrote {nbytes} bytes, sha256 {sha[:12]})"
        )


def verify_shards(url: str, shards: list[dict[str, Any]]) -> list[str]:
    """Re-hash every shard listed (manifest entries: ``name``, ``bytes``, ``sha256``) under
    ``url``; returns the names that are missing or do not match."""
    storage = open_storage(url)
    bad = []
    for shard in shards:
        try:
            nbytes, sha = sha256_of(storage, shard["name"])
        except FileNotFoundError:
            bad.append(shard["name"])
            continue
        if (nbytes, sha) != (shard["bytes"], shard["sha256"]):
            bad.append(shard["name"])
    return bad
