"""A procedural 3D room in a dataset's style, and where a camera may stand in it.

Every generated view (Taskonomy, Replica, NYU and CocoDoom layouts) is a camera in such a room,
rendered by :mod:`mult.data.synth.render`, so depth, normals, shading, semantic labels, texture
edges, keypoints and RGB of one view agree with each other: they are all read off the same ray
hits.

Frames:

* **world**: metres, ``z`` up; the room is the box ``[0, Lx] x [0, Ly] x [0, Lz]``.
* **camera**: ``x`` right, ``y`` down, ``z`` forward (Taskonomy's normal-map frame). The
  rotation ``Camera.rotation`` maps camera vectors to world vectors (its columns are the
  camera axes in world coordinates).

The ``style`` of a scene changes room size, object sizes and shapes, the class mix, textures
and lighting, so views from different styles differ the way real datasets do (a domain shift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mult.data.synth.camera import Camera
from mult.data.synth.styles import StyleParams
from mult.encodings import SEMANTIC_CLASSES

PLANE, BOX, SPHERE, CYLINDER = 0, 1, 2, 3
# Texture patterns.
PLAIN, CHECKER, STRIPES, WAVES = 0, 1, 2, 3

_BACKGROUND = 1  # semantic id of walls, floor and ceiling

# Per object class: shape, base size (dx, dy, dz) in metres, and whether it sits on furniture.
# Spheres use dz as diameter; cylinders use dx as diameter and dz as height.
_CLASS_SHAPES: dict[str, tuple[int, tuple[float, float, float], bool]] = {
    "bottle": (CYLINDER, (0.08, 0.08, 0.30), True),
    "chair": (BOX, (0.50, 0.50, 0.90), False),
    "couch": (BOX, (1.90, 0.90, 0.80), False),
    "potted_plant": (SPHERE, (0.60, 0.60, 0.60), False),
    "bed": (BOX, (2.00, 1.60, 0.55), False),
    "dining_table": (BOX, (1.50, 0.90, 0.75), False),
    "toilet": (CYLINDER, (0.45, 0.45, 0.45), False),
    "tv": (BOX, (1.00, 0.12, 0.60), True),
    "microwave": (BOX, (0.50, 0.38, 0.30), True),
    "oven": (BOX, (0.60, 0.60, 0.90), False),
    "toaster": (BOX, (0.30, 0.20, 0.22), True),
    "sink": (BOX, (0.60, 0.50, 0.90), False),
    "refrigerator": (BOX, (0.75, 0.70, 1.80), False),
    "book": (BOX, (0.22, 0.16, 0.05), True),
    "clock": (CYLINDER, (0.30, 0.30, 0.08), True),
    "vase": (CYLINDER, (0.16, 0.16, 0.35), True),
}
_OBJECT_CLASSES: tuple[str, ...] = SEMANTIC_CLASSES[2:]


@dataclass
class Scene:
    """A room plus objects, stored as flat per-surface arrays so rendering is vectorised.

    Surface ``i`` has ``kind[i]`` (PLANE, BOX, SPHERE, CYLINDER); surfaces ``0..5`` are the
    room's planes (floor, ceiling, walls x=0, x=Lx, y=0, y=Ly). Geometry per surface:
    ``center [S, 3]``, ``half [S, 3]`` (box half-sizes; sphere radius in ``half[:, 0]``;
    cylinder radius and half-height in ``half[:, 0]`` and ``half[:, 2]``), ``yaw [S]``
    (boxes, about world z). Appearance: ``color_a/color_b [S, 3]`` in [0, 1], ``pattern [S]``,
    ``frequency [S]``, ``direction [S, 3]`` (the stripe/wave axis). Labels: ``semantic [S]``
    (Taskonomy ids), ``instance [S]`` (0 for room surfaces).
    """

    style: StyleParams
    size: np.ndarray  # [3] room extent (Lx, Ly, Lz)
    kind: np.ndarray
    center: np.ndarray
    half: np.ndarray
    yaw: np.ndarray
    color_a: np.ndarray
    color_b: np.ndarray
    pattern: np.ndarray
    frequency: np.ndarray
    direction: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray
    windows: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    # (plane index, a0, a1, b0, b1): an opening on that wall, over its two in-plane axes
    light_position: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    light_color: np.ndarray = field(default_factory=lambda: np.ones(3, np.float32))

    @property
    def num_objects(self) -> int:
        return int(len(self.kind) - 6)


# ------------------------------------------------------------------------------------------------
# Scene construction.
# ------------------------------------------------------------------------------------------------
def _random_color(rng: np.random.Generator, p: StyleParams) -> np.ndarray:
    hue = rng.uniform(0.0, 1.0)
    sat = rng.uniform(*p.saturation)
    val = rng.uniform(*p.value)
    # HSV -> RGB, one colour.
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    rgb = val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb.astype(np.float32)


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    d = rng.normal(size=3)
    return (d / np.linalg.norm(d)).astype(np.float32)


def make_scene(rng: np.random.Generator, style: StyleParams) -> Scene:
    """Draw a room with furniture-like objects in a dataset's style."""
    p = style
    lx, ly = rng.uniform(*p.room_size, size=2)
    lz = rng.uniform(*p.room_height)
    size = np.array([lx, ly, lz], np.float64)

    kinds, centers, halves, yaws, semantics = [], [], [], [], []
    # Room planes: floor, ceiling, x=0, x=Lx, y=0, y=Ly (centres lie on the planes).
    for axis, coord in ((2, 0.0), (2, lz), (0, 0.0), (0, lx), (1, 0.0), (1, ly)):
        c = size / 2.0
        c[axis] = coord
        kinds.append(PLANE)
        centers.append(c)
        halves.append(size / 2.0)
        yaws.append(0.0)
        semantics.append(_BACKGROUND)

    weights = np.array([p.class_weights.get(c, 1.0) for c in _OBJECT_CLASSES], np.float64)
    weights /= weights.sum()
    n_obj = int(rng.integers(p.objects[0], p.objects[1] + 1))
    supports: list[tuple[np.ndarray, np.ndarray, float]] = []  # (centre, half, yaw) of box tops
    for _ in range(n_obj):
        name = _OBJECT_CLASSES[int(rng.choice(len(_OBJECT_CLASSES), p=weights))]
        kind, base, on_furniture = _CLASS_SHAPES[name]
        if rng.random() < p.shape_override:
            kind = int(rng.choice([BOX, SPHERE, CYLINDER]))
        dims = np.array(base) * rng.uniform(*p.size_scale) * rng.uniform(0.85, 1.15, size=3)
        dims = np.minimum(dims, [lx * 0.45, ly * 0.45, lz * 0.7])
        if kind == SPHERE:
            half = np.array([dims[2] / 2.0] * 3)
        elif kind == CYLINDER:
            r = min(dims[0], dims[1]) / 2.0
            half = np.array([r, r, dims[2] / 2.0])
        else:
            half = dims / 2.0
        yaw = float(rng.uniform(0.0, math.pi)) if kind == BOX else 0.0
        footprint = float(np.hypot(half[0], half[1]))
        if on_furniture and supports and rng.random() < 0.75:
            s_center, s_half, _ = supports[int(rng.integers(len(supports)))]
            spread = np.maximum(s_half[:2] - 0.5 * half[:2], 0.0)
            xy = s_center[:2] + rng.uniform(-1.0, 1.0, size=2) * spread
            base_z = s_center[2] + s_half[2]
        else:
            margin = np.minimum(footprint + 0.05, [lx / 2.0 - 0.01, ly / 2.0 - 0.01])
            xy = rng.uniform(margin, [lx - margin[0], ly - margin[1]])
            base_z = 0.0
        center = np.array([xy[0], xy[1], base_z + half[2]])
        if kind == BOX and half[2] * 2 > 0.4 and half[0] > 0.15 and half[1] > 0.15:
            supports.append((center, half, yaw))
        kinds.append(kind)
        centers.append(center)
        halves.append(half)
        yaws.append(yaw)
        semantics.append(SEMANTIC_CLASSES.index(name))

    n = len(kinds)
    pattern = rng.choice(4, size=n, p=np.array(p.patterns) / sum(p.patterns))
    color_a = np.stack([_random_color(rng, p) for _ in range(n)])
    color_b = np.stack([_random_color(rng, p) for _ in range(n)])
    # Pattern contrast: the second colour is a mix so textures read as texture, not as new objects.
    color_b = 0.5 * color_a + 0.5 * color_b
    frequency = rng.uniform(*p.frequency, size=n).astype(np.float32)
    direction = np.stack([_random_direction(rng) for _ in range(n)])

    windows = []
    for plane in range(2, 6):
        if rng.random() < p.window_prob:
            a_len = lx if plane >= 4 else ly  # walls x=const span y; walls y=const span x
            a0 = rng.uniform(0.1, 0.6) * a_len
            a1 = min(a0 + rng.uniform(0.6, 1.6), a_len - 0.1)
            b0 = rng.uniform(0.8, 1.2)
            b1 = min(b0 + rng.uniform(0.6, 1.3), lz - 0.2)
            windows.append((plane, float(a0), float(a1), float(b0), float(b1)))

    light = np.array([rng.uniform(0.25, 0.75) * lx, rng.uniform(0.25, 0.75) * ly, lz - 0.1])
    return Scene(
        style=style,
        size=size.astype(np.float32),
        kind=np.array(kinds, np.int32),
        center=np.array(centers, np.float32),
        half=np.array(halves, np.float32),
        yaw=np.array(yaws, np.float32),
        color_a=color_a.astype(np.float32),
        color_b=color_b.astype(np.float32),
        pattern=pattern.astype(np.int32),
        frequency=frequency,
        direction=direction.astype(np.float32),
        semantic=np.array(semantics, np.uint8),
        instance=np.array([0] * 6 + list(range(1, n - 5)), np.int32),
        windows=windows,
        light_position=light.astype(np.float32),
        light_color=np.array(p.light_color, np.float32) * p.light_intensity,
    )


# ------------------------------------------------------------------------------------------------
# Camera placement.
# ------------------------------------------------------------------------------------------------
def _inside_object(scene: Scene, point: np.ndarray, margin: float) -> bool:
    for i in range(6, len(scene.kind)):
        rel = point - scene.center[i]
        if scene.kind[i] == BOX:
            c, s = math.cos(-scene.yaw[i]), math.sin(-scene.yaw[i])
            rel = np.array([c * rel[0] - s * rel[1], s * rel[0] + c * rel[1], rel[2]])
            if np.all(np.abs(rel) < scene.half[i] + margin):
                return True
        elif scene.kind[i] == SPHERE:
            if np.linalg.norm(rel) < scene.half[i, 0] + margin:
                return True
        elif np.hypot(rel[0], rel[1]) < scene.half[i, 0] + margin and abs(rel[2]) < scene.half[i, 2] + margin:
            return True
    return False


def look_at(position: np.ndarray, target: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """Rotation (camera -> world, columns right, down, forward) looking from ``position`` at ``target``."""
    forward = np.asarray(target, np.float64) - np.asarray(position, np.float64)
    norm = np.linalg.norm(forward)
    if norm < 1e-9:
        raise ValueError("look_at: target coincides with the camera position")
    forward /= norm
    up = np.array([0.0, 0.0, 1.0])
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-6:  # looking straight up or down
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = math.cos(roll), math.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, forward], axis=1)


def sample_target(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A point to fixate ``[3]``: near a random object's centre (85%), else anywhere in the room."""
    if scene.num_objects and rng.random() < 0.85:
        i = 6 + int(rng.integers(scene.num_objects))
        return scene.center[i].astype(np.float64) + rng.normal(scale=0.15, size=3)
    size = scene.size.astype(np.float64)
    return rng.uniform([0.0, 0.0, 0.3], size - [0.0, 0.0, 0.3])


def sample_camera(
    scene: Scene,
    rng: np.random.Generator,
    *,
    fov_rad: float,
    width: int,
    height: int,
    target: np.ndarray | None = None,
) -> Camera:
    """A pinhole camera inside the room, outside every object, looking at an object (or a wall).

    ``target`` ``[3]`` fixes the fixated world point (Taskonomy renders several views of one
    point); by default it is drawn near a random object's centre, or on a wall.
    """
    if not (0.05 < fov_rad < math.pi - 0.05):
        raise ValueError(f"fov_rad must be in (0.05, pi - 0.05), got {fov_rad}")
    if width < 2 or height < 2:
        raise ValueError(f"image size must be at least 2x2, got {width}x{height}")
    size = scene.size.astype(np.float64)
    target = sample_target(scene, rng) if target is None else np.asarray(target, np.float64)
    # Prefer a position well back from the target (a wide view); relax the distance if the
    # room is too small for it.
    min_dist = rng.uniform(1.2, 2.5)
    for attempt in range(300):
        position = np.array([
            rng.uniform(0.3, size[0] - 0.3),
            rng.uniform(0.3, size[1] - 0.3),
            rng.uniform(0.9, min(1.9, size[2] - 0.3)),
        ])
        far_enough = np.linalg.norm(position - target) >= min_dist * (1.0 - attempt / 300.0)
        if far_enough and not _inside_object(scene, position, margin=0.25):
            break
    else:
        raise RuntimeError("could not place a camera outside every object in 300 tries")
    forward = target - position
    if np.linalg.norm(forward) < 0.3:
        target = position + np.array([1.0, 0.0, 0.0]) * np.sign(size[0] / 2 - position[0] + 1e-9)
        forward = target - position
    # Keep pitch within +-60 degrees so the horizon-based camera frame stays well-defined.
    horiz = np.hypot(forward[0], forward[1])
    max_dz = math.tan(math.radians(60)) * max(horiz, 1e-3)
    if abs(forward[2]) > max_dz:
        target = position + np.array([forward[0], forward[1], math.copysign(max_dz, forward[2])])
    rotation = look_at(position, target, roll=float(rng.normal(scale=0.05)))
    return Camera(float(fov_rad), int(width), int(height), position, rotation, target)
