"""A test helper: one Taskonomy-format shard whose rgb is noise (incompressible), so a shard is
as many bytes as a test needs (several reads long, or many MB) with few views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mult.data import shards as sh
from mult.data.png import encode_png


def noise_shard(out: Path, views: int, size: int, name: str = "noise") -> Path:
    """``out/{name}-000000.tar`` + its manifest: ``views`` views of noise rgb (``size``²) and a
    constant depth per view (3000 + index). Returns ``out``."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    shard = f"{name}-000000.tar"
    builder = sh.ShardBuilder(out / shard)
    for i in range(views):
        builder.add(f"{name}-p{i}-v0", {
            "rgb.png": encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
            "depth_zbuffer.png": encode_png(np.full((size, size), 3000 + i, np.uint16)),
        })
    nbytes, sha = builder.close()
    (out / sh.MANIFEST_NAME).write_text(json.dumps({
        "format_version": sh.FORMAT_VERSION, "format": "taskonomy", "encoding": "original",
        "tasks": ["depth_zbuffer"], "num_samples": views,
        "shards": [{"name": shard, "samples": views, "bytes": nbytes, "sha256": sha}]}))
    return out
