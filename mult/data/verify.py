"""Verify a sharded dataset by reading it back the way training reads it.

``python -m pipelines.shard verify URL`` runs :func:`verify_shard` once per shard (a Ray task
each). A shard's bytes are streamed once: hashed (sha256 and length, checked against the
manifest) while webdataset's own tar iterator and key grouping, the loader's path, split them
into samples; every sample is decoded by :func:`mult.data.samples.decode_members`, the function
the loader calls, for every task in the manifest. A dataset that verifies is one training
reads without a bad sample. Users run it after a conversion or a copy between buckets.

A shard's row::

    {"name", "expected_samples", "samples", "bytes",
     "sha256": "ok" | "mismatch" | "unchecked",      # unchecked: the object could not be read through
     "bad": [{"key", "member", "reason"}],           # member: "{key}.{domain}.{ext}" when one is to blame
     "error": None | {"kind", "message"}}

``error.kind`` is ``missing`` (no such object), ``storage`` (a read failed after the storage
layer's own retries and resumes), ``tar`` (the archive cannot be parsed past some point),
``count`` (the shard holds another number of samples than the manifest says) or ``task`` (the
worker checking it died). Problems are recorded, never raised, so one bad shard hides no other.
"""

from __future__ import annotations

import hashlib
import io
import logging
from typing import IO, Any, Callable, Iterable, Sequence

from mult.data.png import CorruptFileError, check_png
from mult.data.samples import decode_members, read_manifest, split_members
from mult.data.shards import PICKLE_EXTS
from mult.data.storage import iter_chunks, open_storage

log = logging.getLogger(__name__)

MapFn = Callable[[Callable[[str], dict], Sequence[str]], Iterable[dict]]


class VerifyError(RuntimeError):
    """Verification could not start (no readable manifest); the message says why."""


class _HashingReader(io.RawIOBase):
    """Reads through ``fh``, hashing and counting every byte. A failed read is remembered, so
    that it is reported as a storage error and not as a broken archive."""

    def __init__(self, fh: IO[bytes], url: str):
        super().__init__()
        self._fh, self.url = fh, url
        self.sha, self.bytes = hashlib.sha256(), 0
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._fh.read(len(buffer))
        except BaseException as exc:
            self.error = exc
            raise
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        self.bytes += n
        return n

    def drain(self) -> None:
        """Read (and hash) whatever the tar parser left: end-of-archive padding, or the rest
        of a shard it could not parse."""
        for _ in iter_chunks(self):
            pass

    def __str__(self) -> str:  # webdataset appends str(stream) to the errors it re-raises
        return self.url


def _row(name: str, expected: int | None) -> dict[str, Any]:
    return {"name": name, "expected_samples": expected, "samples": 0, "bytes": 0, "sha256": "unchecked",
            "bad": [], "error": None}


def failed_row(name: str, exc: BaseException) -> dict[str, Any]:
    """The row of a shard whose check itself died (a lost worker): nothing is known of it."""
    row = _row(name, None)
    row["error"] = {"kind": "task", "message": f"{type(exc).__name__}: {exc}"}
    return row


def _message(exc: BaseException) -> str:
    # webdataset re-raises with its stream and URL appended to ``args``; the first is the message.
    first = exc.args[0] if exc.args else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _culprit(sample: dict[str, Any], key: str) -> str | None:
    """The member to blame for a sample that does not decode: a pickle or a broken PNG."""
    for suffix, data in sorted(sample.items()):
        if suffix.startswith("__"):
            continue
        ext = suffix.rsplit(".", 1)[-1]
        if ext in PICKLE_EXTS:
            return f"{key}.{suffix}"
        if ext == "png":
            try:
                check_png(data, f"{key}.{suffix}")
            except CorruptFileError:
                return f"{key}.{suffix}"
    return None


def _check_sample(sample: dict[str, Any], manifest: dict[str, Any], seen: set[str]) -> dict[str, Any] | None:
    """None if the sample decodes as the loader would decode it; else what is wrong."""
    key = sample["__key__"]
    if key in seen:
        return {"key": key, "member": None, "reason": "duplicate key in this shard (training reads it twice)"}
    try:
        decode_members(split_members(sample), key, manifest, manifest["tasks"])
    except Exception as exc:  # every format's decoder raises its own types; all are bad samples
        return {"key": key, "member": _culprit(sample, key), "reason": f"{type(exc).__name__}: {exc}"}
    return None


def verify_shard(url: str, shard: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """Read, hash and decode one shard (a manifest entry) of the dataset at ``url``; its row."""
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    storage = open_storage(url)
    name = shard["name"]
    row = _row(name, int(shard["samples"]))
    try:
        fh = storage.open_read(name)
    except FileNotFoundError as exc:
        row["error"] = {"kind": "missing", "message": str(exc)}
        return row
    except Exception as exc:  # StorageError after the storage layer's retries, permissions, ...
        row["error"] = {"kind": "storage", "message": f"{type(exc).__name__}: {exc}"}
        return row
    with fh:
        reader = _HashingReader(fh, storage.url(name))
        seen: set[str] = set()
        last_key = None
        try:
            files = ({**f, "__url__": reader.url} for f in tar_file_iterator(reader, handler=reraise_exception))
            for sample in group_by_keys(files, handler=reraise_exception):
                problem = _check_sample(sample, manifest, seen)
                if problem is not None:
                    row["bad"].append(problem)
                last_key = sample["__key__"]
                seen.add(last_key)
                row["samples"] += 1
            reader.drain()
        except Exception as exc:
            where = f"after key {last_key!r}" if last_key else "before its first sample"
            if reader.error is not None:
                row["error"] = {"kind": "storage", "message": f"read failed {where}: {_message(reader.error)}"}
                return row
            row["error"] = {"kind": "tar", "message": f"unreadable {where}: {_message(exc)}"}
            try:
                reader.drain()  # hash the whole object all the same
            except Exception as read_exc:
                row["error"] = {"kind": "storage", "message": f"read failed {where}: {_message(read_exc)}"}
                return row
    row["bytes"] = reader.bytes
    match = reader.bytes == int(shard["bytes"]) and reader.sha.hexdigest() == shard["sha256"]
    row["sha256"] = "ok" if match else "mismatch"
    if row["error"] is None and row["samples"] != row["expected_samples"]:
        row["error"] = {"kind": "count", "message": f"holds {row['samples']} sample(s), the manifest says "
                                                    f"{row['expected_samples']}"}
    return row


def row_ok(row: dict[str, Any]) -> bool:
    """A shard passes when it read to the end without error, every sample decoded and its
    bytes are the ones converted."""
    return row["error"] is None and not row["bad"] and row["sha256"] == "ok"


def verify_dataset(url: str, *, map_shards: MapFn | None = None) -> dict[str, Any]:
    """Verify every shard of the manifest at ``url``; returns the report (``"ok"``, counts and
    one row per shard, by name). ``map_shards(fn, names)`` runs ``fn(name)`` per shard
    (``pipelines.shard verify`` passes one on Ray tasks); the default runs them here in turn.
    Raises :class:`VerifyError` when the manifest cannot be read."""
    try:
        manifest = read_manifest(url)
    except Exception as exc:  # absent, unreachable, not a manifest: nothing can be checked
        raise VerifyError(f"cannot verify {url}: {type(exc).__name__}: {exc}") from exc
    entries = {s["name"]: s for s in manifest["shards"]}

    def one(name: str) -> dict[str, Any]:
        return verify_shard(url, entries[name], manifest)

    rows = sorted((map_shards or _map_local)(one, list(entries)), key=lambda r: r["name"])
    for row in rows:
        if row["expected_samples"] is None:
            row["expected_samples"] = int(entries[row["name"]]["samples"])
    report = {
        "url": open_storage(url).url(),
        "num_shards": len(rows),
        "expected_samples": sum(r["expected_samples"] for r in rows),
        "samples": sum(r["samples"] for r in rows),
        "bad_samples": sum(len(r["bad"]) for r in rows),
        "sha_mismatches": sum(r["sha256"] == "mismatch" for r in rows),
        "errors": {kind: sum(1 for r in rows if r["error"] and r["error"]["kind"] == kind)
                   for kind in ("missing", "storage", "tar", "count", "task")},
        "shards": rows,
    }
    report["ok"] = all(row_ok(r) for r in rows)
    return report


def _map_local(fn: Callable[[str], dict], names: Sequence[str]) -> list[dict]:
    return [fn(n) for n in names]


def format_report(report: dict[str, Any]) -> str:
    """The per-shard table and a summary line, as ``pipelines.shard verify`` prints them."""
    width = max([len("shard")] + [len(r["name"]) for r in report["shards"]])
    lines = [f"{'shard':<{width}}  {'samples':>11}  {'bad':>4}  {'sha256':<9}  error"]
    for r in report["shards"]:
        error = f"{r['error']['kind']}: {r['error']['message']}" if r["error"] else ""
        counts = f"{r['samples']}/{r['expected_samples']}"
        lines.append(f"{r['name']:<{width}}  {counts:>11}  {len(r['bad']):>4}  {r['sha256']:<9}  {error}".rstrip())
        for bad in r["bad"]:
            lines.append(f"    {bad['member'] or bad['key']}: {bad['reason']}")
    errors = ", ".join(f"{n} {kind}" for kind, n in report["errors"].items() if n) or "no shard errors"
    verdict = "OK" if report["ok"] else "FAILED"
    lines.append(f"{verdict}: {report['num_shards']} shard(s), {report['samples']} of "
                 f"{report['expected_samples']} sample(s) read, {report['bad_samples']} bad, "
                 f"{report['sha_mismatches']} sha256 mismatch(es), {errors} at {report['url']}")
    return "\n".join(lines)
