"""One sample of a shard: the manifest, its members, and decoding them into network inputs.

The webdataset stream (:mod:`mult.data.loader`) and the tools that look at single samples
(``pipelines.shard inspect``) decode through :func:`decode_members`, so a sample decodes the
same way everywhere: exact 16-bit values, each task's target and mask from the task table,
resized its own way (:mod:`mult.data.transforms`).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import torch

from mult.data.datasets import TRAINING_SET, RawDecoder, get_dataset
from mult.data.shards import ENCODING_ORIGINAL, ENCODING_TASKONOMY, FORMAT_VERSION, MANIFEST_NAME, PICKLE_EXTS
from mult.data.storage import open_storage
from mult.data.transforms import hflip_target, normalize_rgb, resize_nearest, resize_rgb, resize_target
from mult.tasks import INPUT_DOMAIN, MASK_DOMAIN, TASKS


# ---------------------------------------------------------------------------------------------
# Manifest.
# ---------------------------------------------------------------------------------------------
def read_manifest(url: str, *, retry: Any = None) -> dict[str, Any]:
    """Load and check ``{url}/manifest.json`` (local directory or ``s3://bucket/prefix``);
    ``retry``: a :class:`mult.data.retry.RetryPolicy` for S3 (default: the storage layer's)."""
    storage = open_storage(url, retry=retry)
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST_NAME))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST_NAME} at {storage.url()}; write shards there with "
                                "`python -m pipelines.shard`") from None
    for key in ("format_version", "format", "encoding", "shards", "tasks", "num_samples"):
        if key not in manifest:
            raise ValueError(f"{storage.url(MANIFEST_NAME)} lacks {key!r}; not a shard manifest")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{storage.url(MANIFEST_NAME)} has format_version {manifest['format_version']}; "
                         f"this code reads up to {FORMAT_VERSION}")
    if manifest["encoding"] not in (ENCODING_ORIGINAL, ENCODING_TASKONOMY):
        raise ValueError(f"unknown shard encoding {manifest['encoding']!r}")
    for shard in manifest["shards"]:
        extra = [t for t in shard.get("tasks", ()) if t not in manifest["tasks"]]
        if extra or not isinstance(shard.get("tasks", []), list):
            raise ValueError(f"{storage.url(MANIFEST_NAME)}: shard {shard.get('name')!r} lists tasks "
                             f"{shard.get('tasks')!r}, not a list within the manifest's {manifest['tasks']}")
    return manifest


def manifest_summary(url: str) -> dict[str, Any]:
    """What ``pipelines.shard inspect URL`` prints: the manifest without its shard list."""
    m = read_manifest(url)
    return {"url": url, "format": m["format"], "encoding": m["encoding"], "format_version": m["format_version"],
            "image_size": m.get("image_size"), "split": m.get("split"), "tasks": m["tasks"],
            "task_counts": m.get("task_counts"), "domains": m.get("domains"), "num_shards": len(m["shards"]),
            "num_samples": m["num_samples"], "bytes": m.get("bytes"), "bad_count": m.get("bad_count")}


def shard_tasks(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Each shard's tasks. Shards converted before these were recorded (no ``tasks`` entry)
    are taken to have the manifest's tasks, which is what every reader assumed then."""
    return {s["name"]: list(s.get("tasks", manifest["tasks"])) for s in manifest["shards"]}


def task_coverage(manifest: dict[str, Any], tasks: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``(absent, partial)``: the ``tasks`` no shard has, and for each task that only some
    shards have, the names of the shards without it (their samples carry no label for it)."""
    per_shard = shard_tasks(manifest)
    absent = [t for t in tasks if t not in manifest["tasks"]]
    partial = {}
    for task in tasks:
        lacking = [name for name, have in per_shard.items() if task not in have]
        if task not in absent and lacking:
            partial[task] = lacking
    return absent, partial


# ---------------------------------------------------------------------------------------------
# Decoding one sample (no webdataset needed).
# ---------------------------------------------------------------------------------------------
def split_members(sample: dict[str, Any]) -> dict[str, bytes]:
    """webdataset sample (``{"rgb.png": bytes, "__key__": ...}``) -> ``{domain: bytes}``.

    Raises ValueError for pickle members, which are never unpickled.
    """
    members = {}
    for suffix, data in sample.items():
        if suffix.startswith("__"):
            continue
        domain, _, ext = suffix.partition(".")
        if ext.rsplit(".", 1)[-1] in PICKLE_EXTS or domain in PICKLE_EXTS:
            raise ValueError(f"member {suffix!r} is a pickle; pickle members are refused")
        members[domain] = data
    return members


def raw_decoder(manifest: dict[str, Any]) -> RawDecoder:
    """The ``to_raw`` that reads this manifest's shards: resized shards are Taskonomy-encoded
    whatever their source format."""
    name = TRAINING_SET if manifest["encoding"] == ENCODING_TASKONOMY else manifest["format"]
    return get_dataset(name).load_to_raw()


def decode_members(members: dict[str, bytes], key: str, manifest: dict[str, Any], tasks: Sequence[str],
                   image_size: int | None = None, flip: bool = False) -> dict[str, Any]:
    """Members of one view -> numpy ``rgb`` ``float32 [3, S, S]`` (ImageNet-normalised),
    ``targets`` ``{task: float32 [C, S, S] | int64 [S, S]}``, ``valid`` ``{task: bool [S, S]}``.

    ``S`` is ``image_size`` (``None``: the stored size). Only ``tasks`` the manifest has are
    decoded; one this view lacks gets a zero target with an all-False mask.
    """
    raw = raw_decoder(manifest)(members, key)
    rgb = raw[INPUT_DOMAIN]
    size = image_size or rgb.shape[0]
    if image_size is None and rgb.shape[0] != rgb.shape[1]:
        size = None  # keep non-square stored images as they are
    mask = raw.get(MASK_DOMAIN)
    small_mask = resize_nearest(mask, size) if mask is not None and size is not None else None
    targets, valid = {}, {}
    for task in tasks:
        spec = TASKS[task]
        if task in raw and size is not None and spec.resize == "nearest":
            # Nearest sampling commutes with the per-pixel target functions, so sample the raw
            # map first and convert only the pixels kept (exactly the same result, less work).
            target, ok = spec.to_target(resize_nearest(raw[task], size))
            if small_mask is not None:
                ok = ok & small_mask
        elif task in raw:
            target, ok = spec.to_target(raw[task])
            if mask is not None:
                ok = ok & mask
            if size is not None:
                target, ok = resize_target(target, ok, size, spec.resize)
        else:
            h, w = (size, size) if size is not None else rgb.shape[:2]
            target = (np.zeros((h, w), np.int64) if spec.kind == "classification"
                      else np.zeros((spec.channels, h, w), np.float32))
            ok = np.zeros((h, w), bool)
        if flip:
            target, ok = hflip_target(target, task), ok[:, ::-1].copy()
        targets[task], valid[task] = np.ascontiguousarray(target), ok
    if size is not None:
        rgb = resize_rgb(rgb, size)
    if flip:
        rgb = rgb[:, ::-1]
    return {"key": key, "rgb": normalize_rgb(rgb), "targets": targets, "valid": valid}


def load_members(url: str, key: str, manifest: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Find sample ``key`` in the shards at ``url`` and return its members (``{domain: bytes}``).

    Shards whose group the key starts with are searched first; raises KeyError if absent.
    """
    import tarfile

    storage = open_storage(url)
    manifest = manifest or read_manifest(url)
    shards = sorted(manifest["shards"], key=lambda s: not key.startswith(str(s.get("group", "")).replace(".", "_")))
    for shard in shards:
        members: dict[str, bytes] = {}
        with storage.open_read(shard["name"]) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for info in tar:
                sample_key, _, suffix = info.name.partition(".")
                if sample_key == key and info.isreg():
                    members[suffix] = tar.extractfile(info).read()
                elif members:
                    break
        if members:
            return split_members(members)
    raise KeyError(f"sample {key!r} is in none of the {len(shards)} shard(s) at {storage.url()}")


def decode_sample(url: str, key: str, *, tasks: Sequence[str] | None = None,
                  image_size: int | None = None) -> dict[str, Any]:
    """Read and decode one sample without webdataset (see :func:`decode_members`)."""
    manifest = read_manifest(url)
    members = load_members(url, key, manifest)
    tasks = [t for t in (tasks or manifest["tasks"]) if t in manifest["tasks"]]
    return decode_members(members, key, manifest, tasks, image_size)


def collate(samples: Sequence[dict[str, Any]], bad_samples: int = 0) -> dict[str, Any]:
    """Samples from :func:`decode_members` -> a batch of tensors (``[B, ...]``)."""
    tasks = samples[0]["targets"].keys()
    return {
        "key": [s["key"] for s in samples],
        "rgb": torch.from_numpy(np.stack([s["rgb"] for s in samples])),
        "targets": {t: torch.from_numpy(np.stack([s["targets"][t] for s in samples])) for t in tasks},
        "valid": {t: torch.from_numpy(np.stack([s["valid"][t] for s in samples])) for t in tasks},
        "bad_samples": bad_samples,
    }


def sample_stats(url: str, key: str) -> dict[str, Any]:
    """``{"key", "domains": {domain: {"min", "max", "mean", "valid_fraction"}}}`` over valid
    pixels, in physical units, at the stored resolution."""
    manifest = read_manifest(url)
    raw = raw_decoder(manifest)(load_members(url, key, manifest), key)
    mask = raw.get(MASK_DOMAIN)
    domains: dict[str, Any] = {}
    for domain, array in raw.items():
        if domain in TASKS:
            spec = TASKS[domain]
            values = spec.to_physical(array)
            valid = spec.to_target(array)[1]
            if mask is not None:
                valid = valid & mask
            per_pixel = values if values.ndim == 2 else None
            valid = valid & (np.isfinite(per_pixel) if per_pixel is not None else np.isfinite(values).all(axis=-1))
            selected = values[valid]
        elif domain == INPUT_DOMAIN:
            valid = np.ones(array.shape[:2], bool)
            selected = array.astype(np.float64)[valid]
        elif domain == MASK_DOMAIN:
            valid = np.ones(array.shape[:2], bool)
            selected = array.astype(np.float64)
        else:
            continue
        if selected.size:
            stats = {"min": float(selected.min()), "max": float(selected.max()), "mean": float(selected.mean())}
        else:
            stats = {"min": None, "max": None, "mean": None}
        domains[domain] = {**stats, "valid_fraction": float(valid.mean())}
    return {"key": key, "domains": domains}
