"""Dataset tree -> WebDataset tar shards + ``manifest.json``, resumable and idempotent.

Layout of an output URL (local directory or ``s3://bucket/prefix``)::

    {stem}-{index:06d}.tar      shards; {stem} is the group (building, scene, run) made safe
    manifest.json               written last: every shard, its samples, bytes and sha256
    report.json                 corrupt and missing files, with their count
    _work/settings.json         the conversion settings (a rerun must match them)
    _work/shards/{name}.json    one record per published and verified shard
    _work/groups/{stem}.json    one record per finished group

One sample is one view; its members are ``{key}.{domain}.{ext}`` in sorted domain order, with
the original file bytes (``encoding: "original"``). ``tasks`` (default: every task the tree has)
chooses the members: ``rgb``, the requested tasks' files and the auxiliary domains
(``mask_valid``, ``point_info``: kept when present, never missing). Only a missing ``rgb`` or a
missing file of a requested task is a bad file; the manifest records each shard's tasks.
With ``resize=S`` the views are decoded, each domain resized its own way (:func:`mult.data.transforms.resize_raw`) to ``S x S`` and
written as Taskonomy-encoded PNGs (``encoding: "taskonomy"``), whatever the source format.

Tars are byte-deterministic (:mod:`mult.data.tarfiles`), so a group always produces the same
shards. A shard is built in a local temporary file, published, read back and its sha256
verified; only then is its record written. A rerun skips finished groups and
re-publishes nothing whose record and size already match, so a kill at any point leaves no
duplicate or half-written shard behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mult.data.datasets import get_dataset
from mult.data.png import CorruptFileError, check_png, encode_png_for_reading
from mult.data.storage import Storage, open_storage
from mult.data.tarfiles import ShardBuilder, publish_shard
from mult.data.views import View
from mult.tasks import INPUT_DOMAIN, MASK_DOMAIN, TASKS

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
WORK = "_work"
ENCODING_ORIGINAL = "original"
ENCODING_TASKONOMY = "taskonomy"  # resized shards: Taskonomy-encoded PNGs whatever the source
CHECKS = ("png", "decode")
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "torch"})


class ConversionError(RuntimeError):
    """The conversion cannot go on or went past its bad-file threshold; the message says why."""


@dataclass
class ShardSettings:
    """What a conversion was asked to do; a rerun into the same URL must ask the same."""

    format: str
    source: str
    split: str | None = None
    split_file: str | None = None
    samples_per_shard: int = 256
    resize: int | None = None
    check: str = "png"  # "png": structure and CRCs of every PNG; "decode": full to_raw per view
    tasks: list[str] | None = None  # None: every task found in the tree

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.resize is not None and self.resize < 8:
            raise ValueError(f"resize must be >= 8 pixels (or None to keep the originals), got {self.resize}")
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}; valid checks: {', '.join(CHECKS)}")
        get_dataset(self.format)  # raises with the valid names
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not self.tasks:
                raise ValueError(f"tasks must be a non-empty list of task names (or None: every task found), "
                                 f"got {self.tasks!r}")
            unknown = [t for t in self.tasks if t not in TASKS]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
            self.tasks = [t for t in TASKS if t in set(self.tasks)]  # table order, no duplicates

    @property
    def encoding(self) -> str:
        return ENCODING_TASKONOMY if self.resize else ENCODING_ORIGINAL

    def comparable(self) -> dict[str, Any]:
        """Settings that change the shards' content (the source path may move between runs)."""
        d = asdict(self)
        d.pop("source")
        d["format_version"] = FORMAT_VERSION
        return d


# ---------------------------------------------------------------------------------------------
# One group.
# ---------------------------------------------------------------------------------------------
def group_stem(group: str) -> str:
    """A file-name-safe, collision-free stem for a group name."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", group)
    if safe != group or not safe:
        safe = f"{safe}_{hashlib.sha1(group.encode()).hexdigest()[:8]}"
    return safe


@dataclass
class GroupState:
    """Counts and bad items gathered while converting one group."""

    views: int = 0
    files: int = 0
    bad: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # views left out (no readable rgb)
    task_counts: Counter = field(default_factory=Counter)
    domain_counts: Counter = field(default_factory=Counter)

    def add_bad(self, kind: str, key: str, domain: str | None, error: str, path: str | None = None) -> None:
        self.bad.append({"kind": kind, "key": key, "domain": domain, "error": error, "path": path})


@dataclass(frozen=True)
class _Selection:
    """Which member domains a conversion keeps and which count as missing."""

    tasks: tuple[str, ...]  # the tasks whose files count
    domain_tasks: dict[str, str]  # member domain -> the task it labels (the reader's table)

    def counts(self, domain: str) -> bool:
        """A missing file of this domain is a bad file: ``rgb`` and the requested tasks' files."""
        return domain == INPUT_DOMAIN or self.domain_tasks.get(domain) in self.tasks

    def keeps(self, domain: str) -> bool:
        """Written to the shard: what counts, plus auxiliary domains (labelling no task)."""
        return self.counts(domain) or domain not in self.domain_tasks


def conversion_tasks(settings: ShardSettings, reader: Any) -> list[str]:
    """The tasks whose files a conversion keeps and counts: ``settings.tasks``, or every task
    the tree has (``reader.tasks_found()``)."""
    return list(settings.tasks) if settings.tasks is not None else list(reader.tasks_found())


def _check_tasks(settings: ShardSettings, reader: Any) -> None:
    """Refuse requested tasks that the format cannot carry or the tree does not have."""
    found = reader.tasks_found()
    if settings.tasks is None:
        if not found:
            log.warning("no task folders under %s: the shards will hold rgb only", settings.source)
        return
    carried = sorted(set(reader.domain_tasks.values()), key=list(TASKS).index)
    impossible = [t for t in settings.tasks if t not in carried]
    if impossible:
        raise ConversionError(f"tasks {impossible}: {settings.format} has no labels for them; "
                              f"its tasks: {', '.join(carried)}")
    absent = [t for t in settings.tasks if t not in found]
    if absent:
        raise ConversionError(f"tasks {absent}: not found under {settings.source} (it has "
                              f"{', '.join(found) or 'no task folders'}); leave them out of --tasks")


class _TaskProbe:
    """Which tasks a view's member set yields, learnt by decoding one view per member set."""

    def __init__(self, to_raw: Callable[[dict[str, bytes], str], dict]):
        self.to_raw = to_raw
        self.known: dict[frozenset, list[str]] = {}

    def tasks(self, members: dict[str, bytes], key: str, decode: bool) -> tuple[list[str], dict | None]:
        domains = frozenset(members)
        raw = None
        if decode or domains not in self.known:
            raw = self.to_raw(members, key)  # may raise: the caller reports the view
            self.known[domains] = sorted(t for t in raw if t in TASKS)
        return self.known[domains], raw


def _read_view(view: View, state: GroupState, selection: _Selection) -> dict[str, tuple[str, bytes]] | None:
    """Read and check the view's files that ``selection`` keeps; bad ones are reported and
    dropped. None: drop the view (no readable rgb)."""
    for domain in view.missing:
        if selection.counts(domain):
            state.add_bad("missing", view.key, domain, "file not found")
    out: dict[str, tuple[str, bytes]] = {}
    for domain, member in sorted(view.members.items()):
        if not selection.keeps(domain):
            continue
        state.files += 1
        try:
            data = member.read()
        except OSError as exc:
            state.add_bad("missing", view.key, domain, f"{type(exc).__name__}: {exc}", member.path)
            continue
        if member.ext == "png":
            try:
                check_png(data, member.path or f"{view.key}.{domain}")
            except CorruptFileError as exc:
                state.add_bad("corrupt", view.key, domain, str(exc), member.path)
                continue
        elif member.ext == "json":
            try:
                json.loads(data)
            except ValueError as exc:
                state.add_bad("corrupt", view.key, domain, f"invalid JSON: {exc}", member.path)
                continue
        out[domain] = (member.ext, data)
    if INPUT_DOMAIN not in out:
        state.dropped.append(view.key)
        return None
    return out


def _resized_members(raw: dict[str, Any], size: int) -> dict[str, bytes]:
    from mult.data.transforms import resize_raw

    out = {}
    for domain, array in raw.items():
        if domain != INPUT_DOMAIN and domain != MASK_DOMAIN and domain not in TASKS:
            continue
        small = resize_raw(domain, array, size, raw.get(MASK_DOMAIN))
        if small.dtype == bool:  # mask_valid: written as 0/255 like the originals
            small = small.astype(np.uint8) * 255
        if small.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"{domain}: raw arrays must be uint8, uint16 or bool, got {small.dtype}")
        out[f"{domain}.png"] = encode_png_for_reading(small)
    return out


def convert_group(settings: ShardSettings, out_url: str, group: str,
                  on_shard: Callable[[dict], None] | None = None,
                  tmp_dir: str | None = None) -> dict[str, Any]:
    """Convert one group into shards ``{stem}-{i:06d}.tar`` and record it. Returns the record.

    ``on_shard`` is called with each shard's record once it is published and verified.
    """
    dataset = get_dataset(settings.format)
    reader = dataset.load_reader()(settings.source, split=settings.split, split_file=settings.split_file)
    selection = _Selection(tuple(conversion_tasks(settings, reader)), dict(reader.domain_tasks))
    storage = open_storage(out_url)
    stem = group_stem(group)
    state = GroupState()
    probe = _TaskProbe(dataset.load_to_raw())
    shards: list[dict[str, Any]] = []
    shard_tasks: set[str] = set()  # the tasks of the shard being built
    decode = settings.check == "decode" or settings.resize is not None
    with tempfile.TemporaryDirectory(prefix="mult-shard-", dir=tmp_dir) as tmp:
        builder: ShardBuilder | None = None

        def finish() -> None:
            nonlocal builder
            if builder is None or not builder.keys:
                return
            name = f"{stem}-{len(shards):06d}.tar"
            nbytes, sha = builder.close()
            record = {"name": name, "samples": len(builder.keys), "bytes": nbytes, "sha256": sha,
                      "group": group, "first_key": builder.keys[0], "last_key": builder.keys[-1],
                      "tasks": [t for t in TASKS if t in shard_tasks]}
            shard_tasks.clear()
            _publish_once(storage, builder.path, record)
            builder.path.unlink(missing_ok=True)
            shards.append(record)
            builder = None
            if on_shard is not None:
                on_shard(record)

        for view in reader.views(group):
            state.views += 1
            files = _read_view(view, state, selection)
            if files is None:
                continue
            members = {d: data for d, (_, data) in files.items()}
            try:
                tasks, raw = probe.tasks(members, view.key, decode)
                tasks = [t for t in tasks if t in selection.tasks]
            except Exception as exc:  # a format's decoder raises its own errors; report, go on
                state.add_bad("corrupt", view.key, None, f"view dropped: {type(exc).__name__}: {exc}")
                continue
            if settings.resize is not None:
                payload = _resized_members(raw, settings.resize)
            else:
                payload = {f"{d}.{ext}": data for d, (ext, data) in files.items()}
            if builder is None:
                builder = ShardBuilder(Path(tmp) / f"{stem}-{len(shards):06d}.tar")
            builder.add(view.key, payload)
            state.task_counts.update(tasks)
            shard_tasks.update(tasks)
            state.domain_counts.update(p.partition(".")[0] for p in payload)
            if len(builder.keys) >= settings.samples_per_shard:
                finish()
        finish()
    record = {"group": group, "stem": stem, "shards": shards, "views": state.views, "files": state.files,
              "samples": sum(s["samples"] for s in shards), "bad": state.bad, "dropped": state.dropped,
              "task_counts": dict(state.task_counts), "domain_counts": dict(state.domain_counts),
              "counted_tasks": list(selection.tasks)}
    storage.write_bytes(f"{WORK}/groups/{stem}.json", json.dumps(record, indent=1).encode())
    log.info("group %s: %d views -> %d shard(s), %d bad item(s)", group, state.views, len(shards), len(state.bad))
    return record


def _publish_once(storage: Storage, local: Path, record: dict[str, Any]) -> None:
    """Publish a shard unless an earlier run already published these exact bytes."""
    name = record["name"]
    rec_path = f"{WORK}/shards/{name}.json"
    try:
        previous = json.loads(storage.read_bytes(rec_path))
    except FileNotFoundError:
        previous = None
    if (previous is not None and previous.get("sha256") == record["sha256"]
            and storage.size(name) == record["bytes"]):
        log.debug("%s already published and verified", name)
        return
    publish_shard(storage, local, name, record["bytes"], record["sha256"])
    storage.write_bytes(rec_path, json.dumps(record).encode())


# ---------------------------------------------------------------------------------------------
# The whole conversion.
# ---------------------------------------------------------------------------------------------
def prepare(settings: ShardSettings, out_url: str, overwrite: bool = False) -> tuple[list[str], list[str]]:
    """Check or record the settings at ``out_url``; returns ``(all groups, groups still to do)``."""
    storage = open_storage(out_url)
    if overwrite:
        for rel in storage.list():
            storage.delete(rel)
    settings_path = f"{WORK}/settings.json"
    try:
        previous = json.loads(storage.read_bytes(settings_path))
    except FileNotFoundError:
        previous = None
    if previous is None:
        if storage.exists(MANIFEST_NAME):
            raise ConversionError(f"{storage.url()} holds shards from another tool (a manifest "
                                  "without _work/settings.json); use a new output or overwrite=True")
        storage.write_bytes(settings_path, json.dumps({**asdict(settings), **settings.comparable()},
                                                      indent=1).encode())
    else:
        prev = {k: previous.get(k) for k in settings.comparable()}
        if prev != settings.comparable():
            diff = {k: (prev[k], v) for k, v in settings.comparable().items() if prev[k] != v}
            raise ConversionError(f"{storage.url()} already holds shards written with other settings "
                                  f"(old, new): {diff}; use a new output or overwrite=True")
        if previous.get("source") != settings.source:
            log.warning("source moved from %s to %s since the last run", previous.get("source"), settings.source)
    reader = get_dataset(settings.format).load_reader()(settings.source, split=settings.split,
                                                        split_file=settings.split_file)
    _check_tasks(settings, reader)
    groups = reader.groups()
    if not groups:
        raise ConversionError(f"no {settings.format} groups found under {settings.source}"
                              + (f" for split {settings.split!r}" if settings.split else ""))
    todo = [g for g in groups if not _group_done(storage, g)]
    return groups, todo


def _group_done(storage: Storage, group: str) -> bool:
    try:
        record = json.loads(storage.read_bytes(f"{WORK}/groups/{group_stem(group)}.json"))
    except FileNotFoundError:
        return False
    return all(storage.size(s["name"]) == s["bytes"] for s in record["shards"])


def finalize(settings: ShardSettings, out_url: str, groups: Sequence[str], *,
             max_bad: int | None = None, max_bad_fraction: float | None = 0.05) -> dict[str, Any]:
    """Gather the group records into ``report.json`` and, within the threshold, ``manifest.json``.

    Raises :class:`ConversionError` (after writing the report, without a manifest) when the
    bad items exceed ``max_bad`` or ``max_bad_fraction`` of the files expected.
    """
    storage = open_storage(out_url)
    records = [json.loads(storage.read_bytes(f"{WORK}/groups/{group_stem(g)}.json")) for g in groups]
    shards = sorted((s for r in records for s in r["shards"]), key=lambda s: s["name"])
    bad = [item for r in records for item in r["bad"]]
    files = sum(r["files"] for r in records) + sum(1 for b in bad if b["kind"] == "missing")
    task_counts: Counter = Counter()
    domain_counts: Counter = Counter()
    for r in records:
        task_counts.update(r["task_counts"])
        domain_counts.update(r["domain_counts"])
    kinds = Counter(b["kind"] for b in bad)
    fraction = len(bad) / max(files, 1)
    dropped = [k for r in records for k in r.get("dropped", [])]
    counted = sorted({t for r in records for t in r.get("counted_tasks", [])}, key=list(TASKS).index)
    report = {"bad_count": len(bad), "by_kind": dict(kinds), "files": files, "counted_tasks": counted,
              "views": sum(r["views"] for r in records), "bad_fraction": fraction, "items": bad,
              "dropped_views": dropped}
    storage.write_bytes(REPORT_NAME, json.dumps(report, indent=1).encode())
    over = []
    if max_bad is not None and len(bad) > max_bad:
        over.append(f"{len(bad)} > max_bad {max_bad}")
    if max_bad_fraction is not None and fraction > max_bad_fraction:
        over.append(f"fraction {fraction:.4f} > max_bad_fraction {max_bad_fraction}")
    if over:
        raise ConversionError(f"{len(bad)} bad file(s) ({dict(kinds)}; {'; '.join(over)}): see "
                              f"{storage.url(REPORT_NAME)}; no manifest was written")
    if not shards:
        raise ConversionError(f"no samples were written from {settings.source}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "format": settings.format,
        "encoding": settings.encoding,
        "image_size": settings.resize,
        "split": settings.split,
        "tasks": sorted(task_counts, key=list(TASKS).index),
        "task_counts": dict(task_counts),
        "domains": dict(sorted(domain_counts.items())),
        "num_samples": sum(s["samples"] for s in shards),
        "num_shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
        "bad_count": len(bad),
        "dropped_views": len(dropped),
        # "tasks" per shard: absent in shards converted before it was recorded (readers then
        # take the manifest's "tasks" for every shard).
        "shards": [{k: s[k] for k in ("name", "samples", "bytes", "sha256", "group", "first_key", "tasks")
                    if k in s} for s in shards],
    }
    storage.write_bytes(MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    return manifest


MapFn = Callable[[Callable[[str], dict], Sequence[str]], Iterable[dict]]


def convert(settings: ShardSettings, out_url: str, *, map_groups: MapFn | None = None,
            max_bad: int | None = None, max_bad_fraction: float | None = 0.05,
            overwrite: bool = False, tmp_dir: str | None = None,
            on_shard: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Convert a dataset tree to shards at ``out_url``; returns the manifest.

    ``map_groups(fn, groups)`` runs ``fn(group)`` for every group (``pipelines.shard`` passes
    one that uses Ray tasks); the default runs them here, one after another. ``on_shard`` is
    called with each published shard's record (in the process that wrote it).
    """
    groups, todo = prepare(settings, out_url, overwrite=overwrite)
    log.info("%d group(s), %d to convert (%d already done)", len(groups), len(todo), len(groups) - len(todo))

    def one(group: str) -> dict:
        return convert_group(settings, out_url, group, on_shard=on_shard, tmp_dir=tmp_dir)

    if todo:
        list((map_groups or _map_local)(one, todo))
    return finalize(settings, out_url, groups, max_bad=max_bad, max_bad_fraction=max_bad_fraction)


def _map_local(fn: Callable[[str], dict], groups: Sequence[str]) -> Iterable[dict]:
    return [fn(g) for g in groups]


def source_path(path: str | os.PathLike) -> str:
    """An absolute path string for the manifest and settings."""
    return str(Path(path).expanduser().resolve())
