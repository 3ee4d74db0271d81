"""Generate a CocoDoom tree in the real release's formats.

Writes, under ``out``, for runs 1-3 and maps ``01..scenes``::

    run{R}/map{MM}/rgb/{tic:06d}.png       palette PNG (8-bit indices + a 256-colour palette)
    run{R}/map{MM}/depth/{tic:06d}.png     16-bit gray, 64 x map units, 65535 = sky
    run{R}/map{MM}/objects/{tic:06d}.png   8-bit RGB, id = R + 256 G + 65536 B
    {run,map}[-full]-{train,val,test}.json  COCO files: images, annotations, categories

As in the release, the three runs play the same maps (one generated room per map, different
camera paths), run splits are run1/run2/run3 -> train/val/test, map splits put maps with
``(MM - 1) % 4`` in {0, 1} / 2 / 3 in train/val/test, and the non-``full`` files keep every 5th
(train) or 20th (val, test) frame of each run and map. Views are rendered in the ``cocodoom``
scene style (big rooms, saturated posterized textures, warm light, many openings to the sky)
with Doom's 90 degree horizontal field of view; scene metres become map units at 32 per metre
(the convention :mod:`mult.data.cocodoom` documents), so the reader recovers the rendered depth.

``size`` is the frame width (the real one is 320; height is ``size * 5 / 8``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np

from mult.data.cocodoom import (
    DEPTH_SKY,
    DEPTH_UNITS_PER_MAP_UNIT,
    ID_FLOOR_CEILING,
    ID_SKY,
    ID_WALL,
    MAP_UNITS_PER_METRE,
    encode_object_ids,
    image_id,
)
from mult.data.png import encode_png
from mult.data.synth.render import render
from mult.data.synth.scene import make_scene, sample_camera
from mult.data.synth.styles import StyleParams

log = logging.getLogger(__name__)

RUNS = (1, 2, 3)
DOOM_FOV_RAD = math.pi / 2
_FLOOR, _CEILING = 0, 1  # scene surface indices; 2..5 are walls
_SKIP = {"train": 5, "val": 20, "test": 20}
_DATE = "2016-10-07T00:00:00"
# Doom thing types standing in for the scene's 16 object classes (Taskonomy ids 2..17).
CATEGORIES: tuple[str, ...] = (
    "POSSESSED", "SHOTGUY", "TROOP", "SERGEANT", "HEAD", "SKULL", "BRUISER", "KNIGHT",
    "BABY", "PAIN", "UNDEAD", "FATSO", "CHAINGUY", "VILE", "CYBORG", "BARREL",
)


def doom_palette() -> np.ndarray:
    """A 256-colour palette, ``uint8 [256, 3]``: 3 bits red, 3 green, 2 blue, at bin centres."""
    idx = np.arange(256)
    r, g, b = idx >> 5, (idx >> 2) & 7, idx & 3
    return np.stack([r * 32 + 16, g * 32 + 16, b * 64 + 32], axis=1).astype(np.uint8)


def quantize(rgb: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> palette indices ``uint8 [H, W]`` into :func:`doom_palette`."""
    rgb = rgb.astype(np.uint16)
    return ((rgb[..., 0] >> 5) << 5 | (rgb[..., 1] >> 5) << 2 | (rgb[..., 2] >> 6)).astype(np.uint8)


def depth_from_metres(depth: np.ndarray) -> np.ndarray:
    """Rendered depth (metres, inf = none) ``[H, W]`` -> CocoDoom depth ``uint16 [H, W]``."""
    scale = DEPTH_UNITS_PER_MAP_UNIT * MAP_UNITS_PER_METRE
    out = np.full(depth.shape, DEPTH_SKY, np.uint16)
    finite = np.isfinite(depth)
    out[finite] = np.clip(np.round(depth[finite] * scale), 0, DEPTH_SKY - 1)
    return out


def object_ids(instance: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Rendered instance and surface maps ``[H, W]`` -> CocoDoom object ids ``int64 [H, W]``."""
    ids = instance.astype(np.int64)
    ids[(surface == _FLOOR) | (surface == _CEILING)] = ID_FLOOR_CEILING
    ids[(surface >= 2) & (surface <= 5)] = ID_WALL
    ids[surface < 0] = ID_SKY
    return ids


def _frame_size(size: int) -> tuple[int, int]:
    if size < 16 or size % 8:
        raise ValueError(f"CocoDoom size (frame width) must be a multiple of 8 and >= 16, got {size}")
    return size, size * 5 // 8


def write_cocodoom(out: Path, *, scenes: int, views: int, size: int, seed: int, style: StyleParams) -> None:
    """Write a generated CocoDoom tree to ``out`` (see the module docstring).

    ``scenes`` maps, each played by the 3 runs for ``views`` frames (3 * scenes * views images).
    """
    if scenes < 1 or views < 1:
        raise ValueError(f"scenes and views must be >= 1, got scenes={scenes}, views={views}")
    if scenes > 32:
        raise ValueError(f"Doom II has 32 maps; scenes must be <= 32, got {scenes}")
    width, height = _frame_size(size)
    out = Path(out)
    rng = np.random.default_rng(seed)
    palette = doom_palette()
    rooms = [make_scene(rng, style) for _ in range(scenes)]
    images: list[dict] = []  # each with "_run", "_map", "_index" for the splits
    annotations: dict[int, list[dict]] = {}
    for run in RUNS:
        tic = 0
        for m, room in enumerate(rooms, start=1):
            folder = out / f"run{run}" / f"map{m:02d}"
            for domain in ("rgb", "depth", "objects"):
                (folder / domain).mkdir(parents=True, exist_ok=True)
            for k in range(views):
                tic += int(rng.integers(3, 10))
                cam = sample_camera(room, rng, fov_rad=DOOM_FOV_RAD, width=width, height=height)
                r = render(room, cam)
                ids = object_ids(r.instance, r.surface)
                name = f"{tic:06d}.png"
                (folder / "rgb" / name).write_bytes(encode_png(quantize(r.rgb), palette=palette))
                (folder / "depth" / name).write_bytes(encode_png(depth_from_metres(r.depth)))
                (folder / "objects" / name).write_bytes(encode_png(encode_object_ids(ids)))
                iid = image_id(run, m, tic)
                images.append({
                    "id": iid, "width": width, "height": height,
                    "file_name": f"run{run}/map{m:02d}/rgb/{name}", "license": 1,
                    "flickr_url": "", "coco_url": "", "date_captured": _DATE,
                    "_run": run, "_map": m, "_index": k,
                })
                annotations[iid] = _annotations(iid, ids, r.semantic)
    _write_splits(out, images, annotations)
    log.info(
        "wrote %d CocoDoom frames (%dx%d), %d maps x 3 runs, to %s", len(images), width, height, scenes, out
    )


def _annotations(iid: int, ids: np.ndarray, semantic: np.ndarray) -> list[dict]:
    """One COCO annotation per visible object: polygons, area, bbox, category."""
    anns = []
    for obj in np.unique(ids[ids < ID_SKY]):
        if obj == 0:
            continue
        mask = ids == obj
        classes = semantic[mask]
        category = int(np.bincount(classes).argmax()) - 1  # Taskonomy 2..17 -> category 1..16
        if category < 1:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        anns.append({
            "id": iid * 10**6 + int(obj), "image_id": iid, "category_id": category,
            "segmentation": _polygons(mask), "area": int(mask.sum()),
            "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], "iscrowd": 0,
        })
    return anns


def _polygons(mask: np.ndarray) -> list[list[int]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        pts = c.reshape(-1, 2)
        if len(pts) < 3:  # a one- or two-pixel sliver: its pixel box
            x0, y0 = pts.min(axis=0)
            x1, y1 = pts.max(axis=0) + 1
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        polys.append([int(v) for v in pts.reshape(-1)])
    return polys


def _write_splits(out: Path, images: list[dict], annotations: dict[int, list[dict]]) -> None:
    categories = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(CATEGORIES)]
    by_run = {
        "train": lambda im: im["_run"] == 1,
        "val": lambda im: im["_run"] == 2,
        "test": lambda im: im["_run"] == 3,
    }
    by_map = {
        "train": lambda im: (im["_map"] - 1) % 4 <= 1,
        "val": lambda im: (im["_map"] - 1) % 4 == 2,
        "test": lambda im: (im["_map"] - 1) % 4 == 3,
    }
    for by, rules in (("run", by_run), ("map", by_map)):
        for part, rule in rules.items():
            chosen = [im for im in images if rule(im)]
            for full in (True, False):
                sel = chosen if full else [im for im in chosen if im["_index"] % _SKIP[part] == 0]
                doc = {
                    "info": {"year": 2016, "version": 1, "description": "CocoDoom (generated)",
                             "contributor": "mult synthetic generator", "url": "", "date_created": _DATE},
                    "images": [{k: v for k, v in im.items() if not k.startswith("_")} for im in sel],
                    "annotations": [a for im in sel for a in annotations[im["id"]]],
                    "categories": categories,
                    "licenses": [{"id": 1, "name": "generated", "url": ""}],
                }
                name = f"{by}-full-{part}.json" if full else f"{by}-{part}.json"
                (out / name).write_text(json.dumps(doc))
