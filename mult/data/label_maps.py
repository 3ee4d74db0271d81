"""Label spaces of the transfer sets and how they map onto the model's classes.

NYUv2 labels come as 894 fine classes (the labeled ``.mat``), which Gupta et al. (CVPR 2013)
grouped into 40 (``classMapping40.mat``: ``mapClass`` 1x894, ``className`` 1x40). The model
predicts Taskonomy's ``segment_semantic`` classes (:data:`mult.encodings.SEMANTIC_CLASSES`): 0
uncertain (ignored), 1 background, 2-17 sixteen COCO object classes.

:data:`NYU40_TO_TASKONOMY` is the one table that aligns the two. Taskonomy's labels were made
by a COCO-trained segmenter whose "background" covers the building itself, so the structural
NYU40 classes (wall, floor, ceiling, door, window) become 1; NYU40 classes that are one of the
16 COCO classes become that class; everything else becomes 0 and is left out of evaluation,
because the model has no class for it and calling it "background" would punish a correct
"object" prediction. The evaluation report prints the table (:func:`mapping_markdown`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mult.encodings import SEMANTIC_CLASSES


NUM_NYU40 = 40
NUM_NYU894 = 894

# Gupta et al.'s 40 classes, ids 1..40 (0 = unlabeled). Spelled as in classMapping40.mat.
NYU40_CLASSES: tuple[str, ...] = (
    "unlabeled",
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)

_BACKGROUND = "background"
_IGNORE = "uncertain"

# NYU40 class -> (Taskonomy class name, why). Classes not listed map to "uncertain" (ignored).
_NYU40_RULES: dict[str, tuple[str, str]] = {
    "wall": (_BACKGROUND, "structure: Taskonomy's background"),
    "floor": (_BACKGROUND, "structure: Taskonomy's background"),
    "ceiling": (_BACKGROUND, "structure: Taskonomy's background"),
    "door": (_BACKGROUND, "part of the building, no COCO class"),
    "window": (_BACKGROUND, "part of the building, no COCO class"),
    "bed": ("bed", "same class"),
    "chair": ("chair", "same class"),
    "sofa": ("couch", "same class (COCO: couch)"),
    "table": ("dining_table", "COCO's table class"),
    "toilet": ("toilet", "same class"),
    "television": ("tv", "same class (COCO: tv)"),
    "sink": ("sink", "same class"),
    "refridgerator": ("refrigerator", "same class"),
    "books": ("book", "same class"),
}
_DEFAULT_REASON = "no matching class: ignored in evaluation"


@dataclass(frozen=True)
class ClassMapping:
    """One row of the NYU40 -> Taskonomy table."""

    nyu40_id: int
    nyu40_name: str
    taskonomy_id: int
    taskonomy_name: str
    reason: str


def _build_table() -> tuple[ClassMapping, ...]:
    rows = [ClassMapping(0, "unlabeled", 0, _IGNORE, "unlabeled in NYU")]
    for nyu_id in range(1, NUM_NYU40 + 1):
        name = NYU40_CLASSES[nyu_id]
        target, reason = _NYU40_RULES.get(name, (_IGNORE, _DEFAULT_REASON))
        rows.append(ClassMapping(nyu_id, name, SEMANTIC_CLASSES.index(target), target, reason))
    return tuple(rows)


NYU40_TO_TASKONOMY: tuple[ClassMapping, ...] = _build_table()
# Lookup array: NYU40 id (0..40) -> Taskonomy segment_semantic id.
NYU40_TO_TASKONOMY_LUT: np.ndarray = np.array([r.taskonomy_id for r in NYU40_TO_TASKONOMY], np.uint8)
NYU40_TO_TASKONOMY_LUT.setflags(write=False)


def nyu40_to_taskonomy(labels: np.ndarray) -> np.ndarray:
    """NYU40 ids ``[H, W]`` (0..40) -> Taskonomy ``segment_semantic`` raw ids ``uint8 [H, W]``."""
    labels = np.asarray(labels).astype(np.int64)
    bad = labels[(labels < 0) | (labels > NUM_NYU40)]
    if bad.size:
        raise ValueError(f"NYU40 label {int(bad[0])} outside 0..{NUM_NYU40}")
    return NYU40_TO_TASKONOMY_LUT[labels]


def mapping_markdown() -> str:
    """The NYU40 -> Taskonomy table as Markdown (the evaluation report includes it)."""
    lines = [
        "| NYU40 id | NYU40 class | Taskonomy id | Taskonomy class | why |",
        "|---:|---|---:|---|---|",
    ]
    for r in NYU40_TO_TASKONOMY:
        lines.append(
            f"| {r.nyu40_id} | {r.nyu40_name} | {r.taskonomy_id} | {r.taskonomy_name} | {r.reason} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# 894 -> 40 (classMapping40.mat)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassMap40:
    """The 894 -> 40 map. ``lut[k]`` is the NYU40 id of fine class ``k`` (``lut[0] = 0``)."""

    lut: np.ndarray  # uint8 [895]
    class_names: tuple[str, ...]  # the 40 names, NYU40 id i at index i - 1

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """Fine labels ``[H, W]`` (0..894) -> NYU40 ids ``uint8 [H, W]``."""
        labels = np.asarray(labels)
        if labels.size and int(labels.max()) >= len(self.lut):
            raise ValueError(f"NYU label {int(labels.max())} outside 0..{len(self.lut) - 1}")
        return self.lut[labels.astype(np.int64)]


def _mat_string(value: object) -> str:
    """A MATLAB char array as scipy loads it (str, or an array holding one) -> str."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            if value.dtype.kind in "US":
                return "".join(str(v) for v in value.reshape(-1))
            raise ValueError(f"expected a MATLAB string, got an array of shape {value.shape}")
        value = value.reshape(-1)[0]
    return str(value)


def load_class_map_40(path: str | os.PathLike) -> ClassMap40:
    """Read ``classMapping40.mat`` (MATLAB v5: ``mapClass`` 1x894 of 1..40, ``className`` 1x40).

    Raises :class:`mult.data.png.CorruptFileError` naming the file when it cannot be read or
    lacks those variables, or when ``mapClass`` holds ids outside 0..40.
    """
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    from mult.data.png import CorruptFileError

    try:
        mat = loadmat(os.fspath(path))
    except (OSError, ValueError, TypeError, NotImplementedError, MatReadError) as exc:
        raise CorruptFileError(f"{path}: cannot read the NYU 894->40 class map ({exc})") from exc
    missing = [k for k in ("mapClass", "className") if k not in mat]
    if missing:
        raise CorruptFileError(
            f"{path}: not an NYU 894->40 class map: lacks {', '.join(missing)} "
            "(expected mapClass 1x894 and className 1x40)"
        )
    map_class = np.asarray(mat["mapClass"]).reshape(-1)
    if map_class.size != NUM_NYU894:
        raise CorruptFileError(f"{path}: mapClass has {map_class.size} entries, expected {NUM_NYU894}")
    if map_class.min() < 0 or map_class.max() > NUM_NYU40:
        raise CorruptFileError(f"{path}: mapClass holds ids outside 0..{NUM_NYU40}")
    names = tuple(_mat_string(v) for v in np.asarray(mat["className"], dtype=object).reshape(-1))
    if len(names) != NUM_NYU40:
        raise CorruptFileError(f"{path}: className has {len(names)} names, expected {NUM_NYU40}")
    lut = np.concatenate([[0], map_class]).astype(np.uint8)
    lut.setflags(write=False)
    return ClassMap40(lut=lut, class_names=names)
