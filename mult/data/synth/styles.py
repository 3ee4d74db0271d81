"""How a generated dataset looks: the parameters a scene style changes.

Each dataset's style is its entry in the dataset table (:data:`mult.data.datasets.DATASETS`),
so views from different datasets differ the way real datasets do (a domain shift).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StyleParams:
    """What a dataset style changes. Ranges are ``(low, high)`` for uniform draws.

    ``name`` seeds the style's random streams, so two styles never draw the same rooms.
    """

    name: str

    room_size: tuple[float, float]  # floor side length
    room_height: tuple[float, float]
    objects: tuple[int, int]  # object count, inclusive
    size_scale: tuple[float, float]  # multiplies each class's base size
    shape_override: float  # probability an object gets a random shape instead of its class's
    class_weights: dict[str, float]  # unnormalised, over the object classes (missing -> 1)
    saturation: tuple[float, float]
    value: tuple[float, float]
    patterns: tuple[float, float, float, float]  # probabilities of PLAIN, CHECKER, STRIPES, WAVES
    frequency: tuple[float, float]  # texture cycles per metre
    light_color: tuple[float, float, float]
    light_intensity: float
    ambient: float
    window_prob: float  # probability per wall of an opening (no surface behind it)
    noise: float  # RGB sensor noise std, in [0, 1] units
    posterize: int  # 0: off; else the number of levels per channel
    gamma: float
