"""Stand-in data: a tiny generated dataset, sharded, for ``--smoke-test`` runs that name no
data, and random loader-shaped batches for benchmarks that time a step, not its data.

The project's generator renders Taskonomy-format trees (real encodings, real layout) and the
shard writer converts them, exactly as ``pipelines.synth`` and ``pipelines.shard`` would; no
real dataset is involved. The result is reused when its manifests already exist.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

SPLITS = {"train": (2, 4), "val": (1, 2)}  # split -> (scenes, views per scene)


def make_smoke_dataset(
    root_url: str,
    *,
    size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 2,
    splits: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[str, str]:
    """Generate and shard a train and a val split under ``root_url``; returns their URLs.

    ``root_url`` is a local directory or ``s3://bucket/prefix``. By default train holds 8 views
    in 4 shards, val 2 views in 1 shard, ``size``² pixels, all from ``seed``. ``splits`` gives
    other ``{"train": (scenes, views per scene), "val": (...)}`` sizes, for loaders with more
    ranks x workers than 8 samples can feed (such a dataset gets its own directory).
    """
    from mult.data.datasets import TRAINING_SET, get_dataset
    from mult.data.shards import MANIFEST_NAME, ShardSettings, convert
    from mult.data.storage import open_storage

    if size < 8:
        raise ValueError(f"smoke dataset size must be >= 8 pixels, got {size}")
    sizes = dict(splits) if splits is not None else SPLITS
    if set(sizes) != set(SPLITS) or any(s < 1 or v < 1 for s, v in sizes.values()):
        raise ValueError(f"splits must give (scenes >= 1, views >= 1) for exactly {sorted(SPLITS)}, got {sizes}")
    suffix = "" if sizes == SPLITS else "-" + "-".join(f"{k}{s}x{v}" for k, (s, v) in sorted(sizes.items()))
    base = f"{root_url.rstrip('/')}/taskonomy-{size}px-seed{seed}{suffix}"
    urls = {}
    for offset, (split, (scenes, views)) in enumerate((k, sizes[k]) for k in SPLITS):
        url = f"{base}/{split}"
        urls[split] = url
        if open_storage(url).exists(MANIFEST_NAME):
            log.info("smoke %s split already at %s", split, url)
            continue
        with tempfile.TemporaryDirectory(prefix="mult-smoke-") as tmp:
            tree = Path(tmp) / TRAINING_SET
            get_dataset(TRAINING_SET).generate(tree, scenes=scenes, views=views, size=size,
                                               seed=seed * 100 + offset, layout="plain", workers=1)
            settings = ShardSettings(format=TRAINING_SET, source=str(tree), samples_per_shard=samples_per_shard)
            manifest = convert(settings, url, tmp_dir=tmp)
        log.info("smoke %s split: %d samples in %d shards at %s", split, manifest["num_samples"],
                 len(manifest["shards"]), url)
    return urls["train"], urls["val"]


def random_batch(tasks: Sequence[str], batch: int, size: int, seed: int = 0) -> dict[str, Any]:
    """A batch shaped like :func:`mult.data.loader.make_loader`'s, with random images and
    targets for ``tasks`` at ``size``² (classes drawn from 1.., every pixel valid)."""
    import torch

    from mult.tasks import get_task

    gen = torch.Generator().manual_seed(seed)
    targets = {}
    for task in tasks:
        spec = get_task(task)
        if spec.kind == "classification":
            targets[task] = torch.randint(1, spec.channels, (batch, size, size), generator=gen)
        else:
            targets[task] = torch.randn(batch, spec.channels, size, size, generator=gen)
    return {"key": [str(i) for i in range(batch)], "rgb": torch.randn(batch, 3, size, size, generator=gen),
            "targets": targets, "valid": {t: torch.ones(batch, size, size, dtype=torch.bool) for t in tasks},
            "bad_samples": 0}
