"""The dataset table: one :class:`DatasetSpec` per dataset, the only place that describes one.

Everything that iterates over datasets (the sharder's ``--format``, the generator, the demo,
the evaluation's sets, their unit alignment and which metrics apply) reads this table, so
adding a fifth dataset is one entry here plus its reader and ``to_raw`` (the
:mod:`mult.data.views` contract) and, for tests and the demo, its generator.

Readers and generators are named by import path and imported on first use: h5py, scipy and
OpenCV stay out of ``import mult.data.datasets``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mult.data.synth.styles import StyleParams

RawDecoder = Callable[[dict[str, bytes], str], dict[str, np.ndarray]]


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the pipeline knows about one dataset.

    ``reader``, ``to_raw``, ``generator``: ``"module:name"`` of the reader class (built as
    ``Reader(root, split=None, split_file=None)``), of the members -> Taskonomy raw arrays
    decoder, and of the function that writes a generated tree in the dataset's real layout
    (``fn(out, *, scenes, views, size, seed, style, **options)``).
    """

    name: str
    reader: str
    to_raw: str
    generator: str
    style: StyleParams  # how its generated scenes look
    alignment: str  # how evaluation aligns its units and label spaces with the model's
    metric_depth: bool  # depth in metres: metrics that depend on absolute scale apply
    test_split: str | None  # the split the demo evaluates on (None: the whole set)
    min_scenes: int = 1  # the fewest generated scenes for which every split is non-empty
    generator_options: tuple[str, ...] = ()  # keyword options the generator takes (layout, workers)
    label_map: str | None = None  # "module:name" of a function returning the class mapping's Markdown

    def load_reader(self) -> type:
        return _load(self.reader)

    def load_to_raw(self) -> RawDecoder:
        return _load(self.to_raw)

    def generate(self, out: str | Path, *, scenes: int, views: int, size: int, seed: int, **options: Any) -> Any:
        """Write a generated tree of this dataset to ``out`` (see :mod:`mult.data.synth`)."""
        unknown = sorted(k for k, v in options.items() if v is not None and k not in self.generator_options)
        if unknown:
            raise ValueError(f"{self.name}: the generator takes no option(s) {unknown}; "
                             f"it takes {list(self.generator_options) or 'none'}")
        given = {k: v for k, v in options.items() if v is not None}
        return _load(self.generator)(Path(out), scenes=scenes, views=views, size=size, seed=seed,
                                     style=self.style, **given)

    def label_map_markdown(self) -> str | None:
        return _load(self.label_map)() if self.label_map else None


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="taskonomy",
            reader="mult.data.taskonomy:TaskonomyReader",
            to_raw="mult.data.taskonomy:taskonomy_to_raw",
            generator="mult.data.synth.taskonomy:write_taskonomy",
            generator_options=("layout", "workers", "auxiliary"),
            style=StyleParams(
                name="taskonomy",
                room_size=(3.5, 6.5), room_height=(2.5, 3.0), objects=(5, 9), size_scale=(0.9, 1.1),
                shape_override=0.1,
                class_weights={"chair": 3, "couch": 2, "dining_table": 2, "bed": 1.5, "tv": 1.5, "book": 2},
                saturation=(0.1, 0.45), value=(0.45, 0.85), patterns=(0.5, 0.15, 0.25, 0.1),
                frequency=(1.0, 4.0), light_color=(1.0, 1.0, 1.0), light_intensity=1.0, ambient=0.35,
                window_prob=0.3, noise=0.0, posterize=0, gamma=1 / 2.2,
            ),
            alignment="native label spaces: depth in metres (raw / 512), normals in the camera frame, "
            "the model's 18 segmentation classes; metric and scale-invariant depth metrics.",
            metric_depth=True,
            test_split="test",
            min_scenes=3,
        ),
        DatasetSpec(
            name="replica",
            reader="mult.data.taskonomy:ReplicaReader",
            to_raw="mult.data.taskonomy:taskonomy_to_raw",
            generator="mult.data.synth.taskonomy:write_replica",
            generator_options=("workers", "auxiliary"),
            style=StyleParams(
                name="replica",
                room_size=(4.0, 8.0), room_height=(2.6, 3.2), objects=(4, 7), size_scale=(1.1, 1.4),
                shape_override=0.05,
                class_weights={"couch": 3, "potted_plant": 3, "vase": 2, "book": 2, "clock": 1.5},
                saturation=(0.05, 0.3), value=(0.6, 0.95), patterns=(0.8, 0.05, 0.1, 0.05),
                frequency=(0.5, 2.0), light_color=(1.0, 0.9, 0.75), light_intensity=1.3, ambient=0.45,
                window_prob=0.2, noise=0.0, posterize=0, gamma=1 / 2.0,
            ),
            alignment="same encodings as Taskonomy (omnidata layout): depth in metres, normals in the "
            "camera frame; metric and scale-invariant depth metrics.",
            metric_depth=True,
            test_split=None,
            min_scenes=2,
        ),
        DatasetSpec(
            name="nyu",
            reader="mult.data.nyu:NYUReader",
            to_raw="mult.data.nyu:nyu_to_raw",
            generator="mult.data.synth.nyu:write_nyu",
            style=StyleParams(
                name="nyu",
                room_size=(2.8, 5.0), room_height=(2.4, 2.8), objects=(9, 15), size_scale=(0.6, 0.9),
                shape_override=0.2,
                class_weights={"bottle": 2, "book": 4, "sink": 2, "microwave": 2, "toaster": 2, "oven": 2},
                saturation=(0.2, 0.6), value=(0.3, 0.7), patterns=(0.25, 0.2, 0.25, 0.3),
                frequency=(3.0, 9.0), light_color=(1.0, 0.85, 0.6), light_intensity=0.8, ambient=0.25,
                window_prob=0.15, noise=0.025, posterize=0, gamma=1 / 1.8,
            ),
            alignment="depth in metres (NYU's float metres stored as Taskonomy raw units); segmentation: "
            "NYU's 40 classes mapped onto the model's classes where they overlap (table below), the "
            "rest ignored as label 0; metric and scale-invariant depth metrics.",
            metric_depth=True,
            test_split="test",
            min_scenes=2,
            label_map="mult.data.label_maps:mapping_markdown",
        ),
        DatasetSpec(
            name="cocodoom",
            reader="mult.data.cocodoom:CocoDoomReader",
            to_raw="mult.data.cocodoom:cocodoom_to_raw",
            generator="mult.data.synth.cocodoom:write_cocodoom",
            style=StyleParams(
                name="cocodoom",
                room_size=(6.0, 12.0), room_height=(3.0, 5.0), objects=(4, 8), size_scale=(1.3, 2.0),
                shape_override=0.5,
                class_weights={"refrigerator": 2, "toilet": 2, "potted_plant": 2, "oven": 2},
                saturation=(0.6, 1.0), value=(0.35, 0.9), patterns=(0.1, 0.45, 0.35, 0.1),
                frequency=(0.5, 2.0), light_color=(1.0, 0.55, 0.35), light_intensity=1.6, ambient=0.15,
                window_prob=0.5, noise=0.0, posterize=6, gamma=1 / 1.6,
            ),
            alignment="depth in Doom map units (metres = units / 32 is only a convention): only the "
            "scale-invariant depth metrics (si_*) are reported; segmentation scores background only "
            "(floor, ceiling, wall), Doom's object classes have no counterpart and are ignored.",
            metric_depth=False,
            test_split="run-full-test",
            min_scenes=4,  # four maps, so that its run and map splits are all non-empty
        ),
    )
}

DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
# The set MulT trains on; the others measure domain transfer. Its encoding is also the one
# resized shards are written in (mult.data.shards.ENCODING_TASKONOMY).
TRAINING_SET = "taskonomy"


def get_dataset(name: str) -> DatasetSpec:
    """Look a dataset up, with an error that lists the valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASET_NAMES)}") from None
