"""Generated Taskonomy and Replica trees, file-for-file in the real formats.

Files: ``{root}/{folder}/{building}/point_{p}_view_{v}_domain_{domain}.{png,json}`` (``plain``)
or ``{root}/{folder}/taskonomy/{building}/...`` (``omnidata``, what omnidata's downloader
writes); Replica is always ``{root}/{folder}/replica/{scene}/...``. The semantic folder is
``segment_semantic`` and its files say ``domain_segmentsemantic``, as in the real data.
Encodings follow DESIGN.md's table exactly (16-bit depth at 512 units per metre with 65535 for
no surface, normals ``round((n + 1) / 2 * 255)`` with holes ``(128, 128, 128)``, ...).

Taskonomy renders several views of each fixated *point*; so does this generator: a scene's
views are grouped into points of one to three views that share ``point_location``.

``auxiliary=False`` leaves out the ``mask_valid`` and ``point_info`` folders, as Taskonomy's own
release and omnidata downloads without those domains do.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mult.data.png import encode_png
from mult.data.synth.camera import Camera
from mult.data.synth.render import Rendered, render
from mult.data.synth.scene import make_scene, sample_camera, sample_target
from mult.data.synth.styles import StyleParams
from mult.encodings import DEPTH_UNITS_PER_METRE, NORMAL_HOLE
from mult.tasks import MASK_DOMAIN, POINT_INFO_DOMAIN, TASKS

log = logging.getLogger(__name__)

DEPTH_NO_SURFACE = 65535
AUXILIARY_FOLDERS = (MASK_DOMAIN, POINT_INFO_DOMAIN)  # not tasks; absent from some real trees
FOV_RANGE = (0.6, 1.2)  # radians; Taskonomy's cameras vary their field of view per view
SPLIT_FILE = "splits/train_val_test_full.csv"
_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
_SYLLABLES = ("al", "ben", "cor", "dal", "el", "fen", "gar", "hol", "ir", "jan", "kel", "lor",
              "mar", "nor", "ol", "pen", "quin", "ros", "sil", "tor", "ul", "ver", "wil", "yor")
_REPLICA_NAMES = ("apartment", "frl_apartment", "room", "office", "hotel")


# ------------------------------------------------------------------------------------------------
# Encodings: physical values -> the integers stored in the files.
# ------------------------------------------------------------------------------------------------
def encode_depth(depth: np.ndarray) -> np.ndarray:
    """Metres ``float [H, W]`` (inf/nan = no surface) -> ``uint16``: round(m * 512), 65535 for none."""
    raw = np.full(depth.shape, DEPTH_NO_SURFACE, np.uint16)
    ok = np.isfinite(depth)
    raw[ok] = np.clip(np.round(depth[ok] * DEPTH_UNITS_PER_METRE), 0, DEPTH_NO_SURFACE - 1)
    return raw


def encode_normal(normal: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Unit normals ``[H, W, 3]`` -> ``uint8`` RGB ``round((n + 1) / 2 * 255)``, holes 128."""
    raw = np.round((np.clip(normal, -1.0, 1.0) + 1.0) / 2.0 * 255.0).astype(np.uint8)
    raw[~valid] = NORMAL_HOLE
    return raw


def encode_response(values: np.ndarray) -> np.ndarray:
    """Raw-unit responses (keypoints2d, edge_texture) ``[H, W]`` -> ``uint16``."""
    return np.clip(np.round(values), 0, 65535).astype(np.uint16)


def encode_reshading(shading: np.ndarray) -> np.ndarray:
    """Shading in [0, 1] ``[H, W]`` -> ``uint8`` RGB with R = G = B (the newer files' layout)."""
    gray = np.round(np.clip(shading, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def encode_view(rendered: Rendered, camera: Camera, info: dict) -> dict[str, bytes]:
    """All files of one view, keyed by folder name (``point_info`` is JSON, the rest PNG)."""
    valid = rendered.valid
    files = {
        "rgb": encode_png(rendered.rgb),
        "depth_zbuffer": encode_png(encode_depth(rendered.depth)),
        "normal": encode_png(encode_normal(rendered.normal, valid)),
        "segment_semantic": encode_png(rendered.semantic.astype(np.uint8)),
        "keypoints2d": encode_png(encode_response(rendered.keypoints)),
        "edge_texture": encode_png(encode_response(rendered.edges)),
        "reshading": encode_png(encode_reshading(rendered.shading)),
        "mask_valid": encode_png((valid * 255).astype(np.uint8)),
    }
    files["point_info"] = json.dumps(camera.point_info(**info), sort_keys=True).encode()
    return files


def file_domain(folder: str) -> str:
    """The domain string in file names for a folder (``segment_semantic`` -> ``segmentsemantic``)."""
    return TASKS[folder].file_domain if folder in TASKS else folder


def view_filename(folder: str, point: int, view: int) -> str:
    ext = "json" if folder == "point_info" else "png"
    return f"point_{point}_view_{view}_domain_{file_domain(folder)}.{ext}"


# ------------------------------------------------------------------------------------------------
# Writing one scene (runs in a worker process).
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SceneJob:
    out: str
    dataset: str  # "taskonomy" | "replica": the omnidata component level
    layout: str  # "plain" | "omnidata"
    style: StyleParams
    name: str
    index: int
    views: int
    size: int
    seed: int
    auxiliary: bool = True  # write mask_valid and point_info


def _scene_dir(job: _SceneJob, folder: str) -> Path:
    base = Path(job.out) / folder
    if job.layout == "omnidata":
        base = base / job.dataset
    return base / job.name


def _write_scene(job: _SceneJob) -> int:
    """Render and write every view of one scene; returns the number of views written."""
    salt = zlib.crc32(job.style.name.encode())
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index, salt]))
    scene = make_scene(rng, job.style)
    point, written = 0, 0
    while written < job.views:
        target = sample_target(scene, rng)
        per_point = min(int(rng.integers(1, 4)), job.views - written)
        for view in range(per_point):
            fov = float(rng.uniform(*FOV_RANGE))
            camera = sample_camera(scene, rng, fov_rad=fov, width=job.size, height=job.size, target=target)
            info = {"building": job.name, "point": point, "view": view, "view_id": view,
                    "point_uuid": f"{job.name}-{point}", "camera_uuid": f"{job.name}-{point}-{view}"}
            for folder, data in encode_view(render(scene, camera), camera, info).items():
                if not job.auxiliary and folder in AUXILIARY_FOLDERS:
                    continue
                directory = _scene_dir(job, folder)
                directory.mkdir(parents=True, exist_ok=True)
                (directory / view_filename(folder, point, view)).write_bytes(data)
            written += 1
        point += 1
    return written


def _run_jobs(jobs: list[_SceneJob], workers: int | None) -> int:
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        return sum(_write_scene(job) for job in jobs)
    # spawn, not fork: the caller may hold threads (OpenCV, Ray) that fork would copy half-way.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
        return sum(pool.map(_write_scene, jobs))


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


# ------------------------------------------------------------------------------------------------
# Names and splits.
# ------------------------------------------------------------------------------------------------
def building_names(count: int, seed: int) -> list[str]:
    """Distinct lowercase word-like building names (Taskonomy's look like ``allensville``)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))) + str(rng.choice(["ville", "ton", "dale", "wood"]))
        if name not in names:
            names.append(name)
    return names


def assign_splits(names: list[str], seed: int) -> dict[str, str]:
    """Building -> "train" | "val" | "test", about 70/15/15, each split non-empty when possible."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 104729]))
    order = [names[i] for i in rng.permutation(len(names))]
    n = len(order)
    n_val = max(1, round(n * _SPLIT_FRACTIONS[1])) if n >= 3 else 0
    n_test = max(1, round(n * _SPLIT_FRACTIONS[2])) if n >= 2 else 0
    splits = {}
    for i, name in enumerate(order):
        splits[name] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return splits


def write_split_csv(path: Path, splits: dict[str, str]) -> None:
    """Taskonomy's split table: ``id,train,val,test`` with 0/1 flags and ``\\r`` line endings."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r")
    writer.writerow(["id", "train", "val", "test"])
    for name in sorted(splits):
        writer.writerow([name] + [int(splits[name] == s) for s in ("train", "val", "test")])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue().encode())


# ------------------------------------------------------------------------------------------------
# Public writers.
# ------------------------------------------------------------------------------------------------
def _write_scenes(out: Path, component: str, layout: str, names: list[str], style: StyleParams, *, views: int,
                  size: int, seed: int, workers: int | None, auxiliary: bool = True) -> int:
    """Render and write ``views`` views of each scene in ``names``; returns the views written."""
    for label, value, low in (("scenes", len(names), 1), ("views", views, 1), ("size", size, 8)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    jobs = [_SceneJob(str(out), component, layout, style, name, i, views, size, seed, auxiliary)
            for i, name in enumerate(names)]
    return _run_jobs(jobs, workers)


def write_taskonomy(
    out: str | os.PathLike,
    *,
    scenes: int,
    views: int,
    size: int,
    seed: int,
    style: StyleParams,
    layout: Literal["plain", "omnidata"] = "omnidata",
    workers: int | None = None,
    auxiliary: bool = True,
) -> dict:
    """Write a Taskonomy tree of ``scenes`` buildings with ``views`` views each, ``size``² pixels.

    Also writes ``splits/train_val_test_full.csv`` (buildings over train/val/test).
    ``workers`` processes render scenes in parallel (default: one per core); ``auxiliary=False``
    writes no ``mask_valid`` or ``point_info`` (Taskonomy's own release). Returns a summary
    dict: ``format``, ``root``, ``layout``, ``groups`` (building names), ``views``, ``splits``.
    """
    if layout not in ("plain", "omnidata"):
        raise ValueError(f"unknown layout {layout!r}; valid layouts: plain, omnidata")
    out = Path(out)
    names = building_names(scenes, seed)
    total = _write_scenes(out, "taskonomy", layout, names, style, views=views, size=size, seed=seed, workers=workers,
                          auxiliary=auxiliary)
    splits = assign_splits(names, seed)
    write_split_csv(out / SPLIT_FILE, splits)
    log.info("wrote %d Taskonomy views (%s layout, %d buildings, %dpx) under %s", total, layout, scenes, size, out)
    return {"format": "taskonomy", "root": str(out), "layout": layout, "groups": names,
            "views": total, "splits": splits}


def write_replica(
    out: str | os.PathLike,
    *,
    scenes: int,
    views: int,
    size: int,
    seed: int,
    style: StyleParams,
    workers: int | None = None,
    auxiliary: bool = True,
) -> dict:
    """Write a Replica tree in omnidata's layout (``{domain}/replica/{scene}/...``).

    Same encodings and file names as Taskonomy; scenes are named like Replica's
    (``apartment_0``, ``frl_apartment_0``, ``room_0``, ...). Returns a summary like
    :func:`write_taskonomy` (without ``splits``: Replica is used whole, for transfer).
    """
    out = Path(out)
    names = [f"{_REPLICA_NAMES[i % len(_REPLICA_NAMES)]}_{i // len(_REPLICA_NAMES)}" for i in range(scenes)]
    total = _write_scenes(out, "replica", "omnidata", names, style, views=views, size=size, seed=seed, workers=workers,
                          auxiliary=auxiliary)
    log.info("wrote %d Replica views (%d scenes, %dpx) under %s", total, scenes, size, out)
    return {"format": "replica", "root": str(out), "layout": "omnidata", "groups": names, "views": total}

