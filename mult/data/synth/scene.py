"""A procedural 3D room, a pinhole camera, and an analytic ray caster that renders every domain.

Every generated view (Taskonomy, Replica, NYU and CocoDoom layouts) comes from this module, so
depth, normals, shading, semantic labels, texture edges, keypoints and RGB of one view agree
with each other: they are all read off the same ray hits.

Frames:

* **world**: metres, ``z`` up; the room is the box ``[0, Lx] x [0, Ly] x [0, Lz]``.
* **camera**: ``x`` right, ``y`` down, ``z`` forward (Taskonomy's normal-map frame). The
  rotation ``Camera.rotation`` maps camera vectors to world vectors (its columns are the
  camera axes in world coordinates).

Pixel ``(u, v)`` (column, row) looks along ``((u + 0.5 - W/2) / f, (v + 0.5 - H/2) / f, 1)``
with ``f = (W/2) / tan(fov/2)``: that ray has unit ``z``, so the ray parameter of a hit *is*
its z-buffer depth.

The ``style`` of a scene changes room size, object sizes and shapes, the class mix, textures
and lighting, so views from different styles differ the way real datasets do (a domain shift).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import cv2
import numpy as np

from mult.tasks import SEMANTIC_CLASSES

STYLES: tuple[str, ...] = ("taskonomy", "replica", "nyu", "cocodoom")

# Primitive kinds.
PLANE, BOX, SPHERE, CYLINDER = 0, 1, 2, 3
# Texture patterns.
PLAIN, CHECKER, STRIPES, WAVES = 0, 1, 2, 3

_EPS = 1e-4
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


@dataclass(frozen=True)
class StyleParams:
    """What a dataset style changes. Ranges are ``(low, high)`` for uniform draws."""

    room_size: tuple[float, float]  # floor side length
    room_height: tuple[float, float]
    objects: tuple[int, int]  # object count, inclusive
    size_scale: tuple[float, float]  # multiplies each class's base size
    shape_override: float  # probability an object gets a random shape instead of its class's
    class_weights: dict[str, float]  # unnormalised, over _OBJECT_CLASSES (missing -> 1)
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


_STYLE_PARAMS: dict[str, StyleParams] = {
    "taskonomy": StyleParams(
        room_size=(3.5, 6.5), room_height=(2.5, 3.0), objects=(5, 9), size_scale=(0.9, 1.1),
        shape_override=0.1,
        class_weights={"chair": 3, "couch": 2, "dining_table": 2, "bed": 1.5, "tv": 1.5, "book": 2},
        saturation=(0.1, 0.45), value=(0.45, 0.85), patterns=(0.5, 0.15, 0.25, 0.1),
        frequency=(1.0, 4.0), light_color=(1.0, 1.0, 1.0), light_intensity=1.0, ambient=0.35,
        window_prob=0.3, noise=0.0, posterize=0, gamma=1 / 2.2,
    ),
    "replica": StyleParams(
        room_size=(4.0, 8.0), room_height=(2.6, 3.2), objects=(4, 7), size_scale=(1.1, 1.4),
        shape_override=0.05,
        class_weights={"couch": 3, "potted_plant": 3, "vase": 2, "book": 2, "clock": 1.5},
        saturation=(0.05, 0.3), value=(0.6, 0.95), patterns=(0.8, 0.05, 0.1, 0.05),
        frequency=(0.5, 2.0), light_color=(1.0, 0.9, 0.75), light_intensity=1.3, ambient=0.45,
        window_prob=0.2, noise=0.0, posterize=0, gamma=1 / 2.0,
    ),
    "nyu": StyleParams(
        room_size=(2.8, 5.0), room_height=(2.4, 2.8), objects=(9, 15), size_scale=(0.6, 0.9),
        shape_override=0.2,
        class_weights={"bottle": 2, "book": 4, "sink": 2, "microwave": 2, "toaster": 2, "oven": 2},
        saturation=(0.2, 0.6), value=(0.3, 0.7), patterns=(0.25, 0.2, 0.25, 0.3),
        frequency=(3.0, 9.0), light_color=(1.0, 0.85, 0.6), light_intensity=0.8, ambient=0.25,
        window_prob=0.15, noise=0.025, posterize=0, gamma=1 / 1.8,
    ),
    "cocodoom": StyleParams(
        room_size=(6.0, 12.0), room_height=(3.0, 5.0), objects=(4, 8), size_scale=(1.3, 2.0),
        shape_override=0.5,
        class_weights={"refrigerator": 2, "toilet": 2, "potted_plant": 2, "oven": 2},
        saturation=(0.6, 1.0), value=(0.35, 0.9), patterns=(0.1, 0.45, 0.35, 0.1),
        frequency=(0.5, 2.0), light_color=(1.0, 0.55, 0.35), light_intensity=1.6, ambient=0.15,
        window_prob=0.5, noise=0.0, posterize=6, gamma=1 / 1.6,
    ),
}


def style_params(style: str) -> StyleParams:
    """The parameters of a style, with an error that lists the valid styles."""
    if style not in _STYLE_PARAMS:
        raise ValueError(f"unknown scene style {style!r}; valid styles: {', '.join(STYLES)}")
    return _STYLE_PARAMS[style]


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

    style: str
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


@dataclass
class Camera:
    """A pinhole camera: intrinsics (``fov`` horizontal, radians; ``width``, ``height``) and pose.

    ``rotation`` ``[3, 3]`` maps camera vectors (x right, y down, z forward) to world vectors;
    ``position`` ``[3]`` is the optical centre in world metres; ``target`` is the fixated point.
    """

    fov: float
    width: int
    height: int
    position: np.ndarray
    rotation: np.ndarray
    target: np.ndarray

    @property
    def focal(self) -> float:
        """Focal length in pixels, ``(W/2) / tan(fov/2)``."""
        return (self.width / 2.0) / math.tan(self.fov / 2.0)

    def ray_directions(self) -> np.ndarray:
        """Camera-frame ray directions with unit z through pixel centres, ``float32 [H, W, 3]``."""
        f = self.focal
        u = (np.arange(self.width, dtype=np.float32) + 0.5 - self.width / 2.0) / f
        v = (np.arange(self.height, dtype=np.float32) + 0.5 - self.height / 2.0) / f
        dirs = np.empty((self.height, self.width, 3), np.float32)
        dirs[..., 0] = u[None, :]
        dirs[..., 1] = v[:, None]
        dirs[..., 2] = 1.0
        return dirs

    def point_info(self, **extra: object) -> dict:
        """The camera as a Taskonomy-style ``point_info`` dict (JSON-serialisable).

        ``camera_rotation_final`` is Blender's XYZ Euler angles of the camera (Blender cameras
        look down their local -z with +y up), as in Taskonomy's files; ``camera_rotation_matrix``
        holds ``rotation`` (this module's x-right, y-down, z-forward frame) row by row.
        """
        blender = self.rotation @ np.diag([1.0, -1.0, -1.0])
        euler = _matrix_to_euler_xyz(blender)
        info: dict = {
            "field_of_view_rads": float(self.fov),
            "resolution": int(self.width),
            "camera_location": [float(x) for x in self.position],
            "camera_rotation_final": [float(x) for x in euler],
            "camera_rotation_matrix": [[float(x) for x in row] for row in self.rotation],
            "point_location": [float(x) for x in self.target],
        }
        info.update(extra)
        return info

    @classmethod
    def from_point_info(cls, info: dict, height: int | None = None) -> "Camera":
        """Rebuild a camera from :meth:`point_info` output (or a real file's Euler angles)."""
        try:
            fov = float(info["field_of_view_rads"])
            width = int(info["resolution"])
            position = np.asarray(info["camera_location"], dtype=np.float64)
            euler = np.asarray(info["camera_rotation_final"], dtype=np.float64)
        except KeyError as exc:
            raise ValueError(f"point_info lacks key {exc.args[0]!r}") from None
        rotation = _euler_xyz_to_matrix(euler) @ np.diag([1.0, -1.0, -1.0])
        target = np.asarray(info.get("point_location", position + rotation[:, 2]), dtype=np.float64)
        return cls(fov, width, height or width, position, rotation, target)


@dataclass
class Rendered:
    """Every domain of one view, in physical units (the writers encode them to files)."""

    depth: np.ndarray  # float32 [H, W] z-buffer depth in metres, np.inf where no surface
    normal: np.ndarray  # float32 [H, W, 3] unit, camera frame, facing the camera; 0 where none
    semantic: np.ndarray  # uint8 [H, W] Taskonomy class ids; 0 where no surface
    instance: np.ndarray  # int32 [H, W] object id, 0 for room surfaces / nothing
    rgb: np.ndarray  # uint8 [H, W, 3]
    shading: np.ndarray  # float32 [H, W] Lambertian shading in [0, 1] (reshading)
    edges: np.ndarray  # float32 [H, W] texture-edge response, Taskonomy raw units (0..~10k)
    keypoints: np.ndarray  # float32 [H, W] keypoint response, Taskonomy raw units (0..~1.5k)
    surface: np.ndarray  # int32 [H, W] index of the scene surface hit, -1 where none

    @property
    def valid(self) -> np.ndarray:
        """bool [H, W]: a surface was hit."""
        return self.surface >= 0


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


def make_scene(rng: np.random.Generator, style: str = "taskonomy") -> Scene:
    """Draw a room with furniture-like objects in a given style (one of :data:`STYLES`)."""
    p = style_params(style)
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


# ------------------------------------------------------------------------------------------------
# Ray casting. o: [3] origin, d: [N, 3] directions (unit camera z), all float32/float64 numpy.
# ------------------------------------------------------------------------------------------------
def _intersect_room(scene: Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance from the (convex) room and the plane index, -1 through a window. [N], [N]."""
    t_best = np.full(len(d), np.inf, np.float32)
    plane = np.full(len(d), -1, np.int32)
    size = scene.size
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            comp = d[:, axis]
            t_hi = (size[axis] - o[axis]) / comp  # planes at the far side when comp > 0
            t_lo = (0.0 - o[axis]) / comp
            t = np.where(comp > 0, t_hi, np.where(comp < 0, t_lo, np.inf)).astype(np.float32)
            idx = {0: (2, 3), 1: (4, 5), 2: (0, 1)}[axis]
            which = np.where(comp > 0, idx[1], idx[0]).astype(np.int32)
            closer = t < t_best
            t_best = np.where(closer, t, t_best)
            plane = np.where(closer, which, plane)
    for w_plane, a0, a1, b0, b1 in scene.windows:
        sel = plane == w_plane
        if not sel.any():
            continue
        hit = o[None, :] + t_best[sel, None] * d[sel]
        a = hit[:, 1] if w_plane < 4 else hit[:, 0]
        b = hit[:, 2]
        through = (a > a0) & (a < a1) & (b > b0) & (b < b1)
        idx = np.flatnonzero(sel)[through]
        plane[idx] = -1
        t_best[idx] = np.inf
    return t_best, plane


def _rot_z(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    out = v.copy()
    out[..., 0] = c * v[..., 0] - s * v[..., 1]
    out[..., 1] = s * v[..., 0] + c * v[..., 1]
    return out


def _intersect_box(o, d, center, half, yaw) -> np.ndarray:
    lo = _rot_z((o - center)[None, :], -yaw)[0]
    ld = _rot_z(d, -yaw)
    tmin = np.full(len(d), -np.inf, np.float32)
    tmax = np.full(len(d), np.inf, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):  # slab method; fmax/fmin skip the NaN of 0 * inf on a slab face
            inv = 1.0 / ld[:, axis]
            t1 = (-half[axis] - lo[axis]) * inv
            t2 = (half[axis] - lo[axis]) * inv
            tmin = np.fmax(tmin, np.minimum(t1, t2))
            tmax = np.fmin(tmax, np.maximum(t1, t2))
    hit = (tmax >= tmin) & (tmin > _EPS)
    return np.where(hit, tmin, np.inf).astype(np.float32)


def _intersect_sphere(o, d, center, radius) -> np.ndarray:
    oc = o - center
    a = np.einsum("ij,ij->i", d, d)
    b = d @ oc
    c = float(oc @ oc) - radius * radius
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    hit = (disc >= 0) & (t > _EPS)
    return np.where(hit, t, np.inf).astype(np.float32)


def _intersect_cylinder(o, d, center, radius, half_h) -> np.ndarray:
    oc = o - center
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = d[:, 0] * oc[0] + d[:, 1] * oc[1]
    c = oc[0] ** 2 + oc[1] ** 2 - radius * radius
    disc = b * b - a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / a
        z_side = oc[2] + t_side * d[:, 2]
        side_ok = (disc >= 0) & (a > 1e-12) & (t_side > _EPS) & (np.abs(z_side) <= half_h)
        t_cap = np.where(d[:, 2] < 0, (half_h - oc[2]) / d[:, 2], (-half_h - oc[2]) / d[:, 2])
        px = oc[0] + t_cap * d[:, 0]
        py = oc[1] + t_cap * d[:, 1]
        cap_ok = (t_cap > _EPS) & (px * px + py * py <= radius * radius) & (d[:, 2] != 0)
    t = np.minimum(np.where(side_ok, t_side, np.inf), np.where(cap_ok, t_cap, np.inf))
    return t.astype(np.float32)


def _normals(scene: Scene, surface: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World-space outward (room: inward) unit normals at hit ``points [N, 3]`` of ``surface [N]``."""
    n = np.zeros_like(points)
    room_axis = {0: (2, 1.0), 1: (2, -1.0), 2: (0, 1.0), 3: (0, -1.0), 4: (1, 1.0), 5: (1, -1.0)}
    for s in np.unique(surface):
        if s < 0:
            continue
        sel = surface == s
        kind = scene.kind[s]
        if kind == PLANE:
            axis, sign = room_axis[int(s)]
            n[sel, axis] = sign
        elif kind == SPHERE:
            n[sel] = (points[sel] - scene.center[s]) / scene.half[s, 0]
        elif kind == CYLINDER:
            rel = points[sel] - scene.center[s]
            r, hh = scene.half[s, 0], scene.half[s, 2]
            on_cap = np.abs(np.abs(rel[:, 2]) - hh) < np.abs(np.hypot(rel[:, 0], rel[:, 1]) - r)
            side = rel.copy()
            side[:, 2] = 0.0
            cap = np.zeros_like(rel)
            cap[:, 2] = np.sign(rel[:, 2])
            n[sel] = np.where(on_cap[:, None], cap, side)
        else:  # BOX: the face whose slab the point is closest to
            rel = _rot_z(points[sel] - scene.center[s], -float(scene.yaw[s]))
            ratio = np.abs(rel) / scene.half[s]
            face = np.argmax(ratio, axis=1)
            local = np.zeros_like(rel)
            local[np.arange(len(rel)), face] = np.sign(rel[np.arange(len(rel)), face])
            n[sel] = _rot_z(local, float(scene.yaw[s]))
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.maximum(norm, 1e-12)


def _texture(scene: Scene, surface: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Solid-texture albedo ``[N, 3]`` at world ``points`` of ``surface`` (indices >= 0)."""
    freq = scene.frequency[surface][:, None]
    pat = scene.pattern[surface]
    axis = scene.direction[surface]
    # A small offset keeps checker cell borders off the room's planes (x=0 etc.).
    p = points * freq + 0.37
    checker = (np.floor(p).sum(axis=1).astype(np.int64) % 2).astype(np.float32)
    phase = np.einsum("ij,ij->i", points, axis) * scene.frequency[surface] * 2.0 * np.pi
    stripes = (np.sin(phase) > 0).astype(np.float32)
    waves = 0.5 + 0.25 * np.sin(phase) + 0.25 * np.sin(1.7 * p[:, 0] + 2.3 * p[:, 1] + 0.9 * p[:, 2])
    mix = np.select([pat == CHECKER, pat == STRIPES, pat == WAVES], [checker, stripes, waves], 0.0)
    a = scene.color_a[surface]
    b = scene.color_b[surface]
    return a + (b - a) * mix[:, None].astype(np.float32)


def render(scene: Scene, camera: Camera) -> Rendered:
    """Ray-cast every pixel of ``camera`` against ``scene``; see :class:`Rendered` for the outputs."""
    p = style_params(scene.style)
    h, w = camera.height, camera.width
    dirs_cam = camera.ray_directions().reshape(-1, 3)
    rot = camera.rotation.astype(np.float32)
    d = dirs_cam @ rot.T  # world directions, still with unit camera-z component
    o = camera.position.astype(np.float32)

    t_best, surface = _intersect_room(scene, o, d)
    for i in range(6, len(scene.kind)):
        kind = scene.kind[i]
        if kind == BOX:
            t = _intersect_box(o, d, scene.center[i], scene.half[i], float(scene.yaw[i]))
        elif kind == SPHERE:
            t = _intersect_sphere(o, d, scene.center[i], float(scene.half[i, 0]))
        else:
            t = _intersect_cylinder(o, d, scene.center[i], float(scene.half[i, 0]), float(scene.half[i, 2]))
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        surface = np.where(closer, i, surface).astype(np.int32)

    valid = surface >= 0
    idx = np.flatnonzero(valid)
    surf = surface[idx]
    points = o[None, :] + t_best[idx, None] * d[idx]
    n_world = _normals(scene, surf, points).astype(np.float32)
    # Face the camera: flip normals that point away from the viewer.
    facing = np.einsum("ij,ij->i", n_world, d[idx])
    n_world[facing > 0] *= -1.0
    n_cam = n_world @ rot  # world -> camera: R^T n, done row-wise

    normal = np.zeros((h * w, 3), np.float32)
    normal[idx] = n_cam
    view_dir = dirs_cam[idx] / np.linalg.norm(dirs_cam[idx], axis=1, keepdims=True)
    shading = np.zeros(h * w, np.float32)
    # Reshading: Lambertian shading under a light at the camera (independent of albedo).
    shading[idx] = np.clip(-np.einsum("ij,ij->i", n_cam, view_dir), 0.0, 1.0)

    albedo = _texture(scene, surf, points)
    to_light = scene.light_position[None, :] - points
    dist = np.linalg.norm(to_light, axis=1, keepdims=True)
    lambert = np.clip(np.einsum("ij,ij->i", n_world, to_light / dist), 0.0, 1.0)[:, None]
    falloff = 1.0 / (1.0 + 0.04 * dist**2)
    light = p.ambient + (1.0 - p.ambient) * (0.7 * lambert * falloff + 0.3 * shading[idx, None])
    color = np.zeros((h * w, 3), np.float32)
    color[idx] = albedo * light * scene.light_color[None, :]
    # No surface: a bright sky gradient seen through the openings.
    rows = np.repeat(np.arange(h, dtype=np.float32) / max(h - 1, 1), w)
    sky = np.stack([0.55 + 0.2 * rows, 0.7 + 0.15 * rows, 0.95 + 0.0 * rows], axis=1)
    color[~valid] = sky[~valid]
    color = np.clip(color, 0.0, 1.0) ** p.gamma
    if p.posterize:
        color = np.round(color * (p.posterize - 1)) / (p.posterize - 1)
    color = color.reshape(h, w, 3)
    if p.noise:
        # Deterministic sensor noise: seeded from the camera pose, so a view renders identically.
        seed = zlib.crc32(camera.position.tobytes() + camera.rotation.tobytes())
        color = color + np.random.default_rng(seed).normal(scale=p.noise, size=color.shape)
    rgb = (np.clip(color, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    surface_img = surface.reshape(h, w)
    return Rendered(
        depth=t_best.reshape(h, w).astype(np.float32),
        normal=normal.reshape(h, w, 3),
        semantic=np.where(valid, scene.semantic[np.maximum(surface, 0)], 0).reshape(h, w).astype(np.uint8),
        instance=np.where(valid, scene.instance[np.maximum(surface, 0)], 0).reshape(h, w).astype(np.int32),
        rgb=rgb,
        shading=shading.reshape(h, w),
        edges=edge_response(gray),
        keypoints=keypoint_response(gray),
        surface=surface_img,
    )


# ------------------------------------------------------------------------------------------------
# 2D responses, in Taskonomy's raw units.
# ------------------------------------------------------------------------------------------------
EDGE_SCALE = 12000.0  # a unit step gives Sobel magnitude 4; blurred, its peak lands near 10k
KEYPOINT_SCALE = 30000.0


def edge_response(gray: np.ndarray) -> np.ndarray:
    """Texture edges: blurred Sobel magnitude of ``gray [H, W]`` in [0, 1], raw units (0..~10k)."""
    sigma = max(gray.shape[1] / 512.0, 0.5)
    smooth = cv2.GaussianBlur(gray, (0, 0), sigma)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    mag = cv2.GaussianBlur(np.sqrt(gx * gx + gy * gy), (0, 0), 2.0 * sigma)
    return np.clip(mag * EDGE_SCALE, 0.0, 65535.0).astype(np.float32)


def keypoint_response(gray: np.ndarray) -> np.ndarray:
    """Blob/corner response (determinant of Hessian, as SURF uses) of ``gray [H, W]``, raw units."""
    sigma = max(2.0 * gray.shape[1] / 512.0, 0.7)
    smooth = cv2.GaussianBlur(gray, (0, 0), sigma)
    dxx = cv2.Sobel(smooth, cv2.CV_32F, 2, 0, ksize=3)
    dyy = cv2.Sobel(smooth, cv2.CV_32F, 0, 2, ksize=3)
    dxy = cv2.Sobel(smooth, cv2.CV_32F, 1, 1, ksize=3)
    det = np.abs(dxx * dyy - dxy * dxy)
    resp = cv2.GaussianBlur(np.sqrt(det), (0, 0), sigma)
    return np.clip(resp * KEYPOINT_SCALE, 0.0, 65535.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Rotations: Blender's XYZ Euler convention (R = Rz @ Ry @ Rx).
# ------------------------------------------------------------------------------------------------
def _euler_xyz_to_matrix(euler: np.ndarray) -> np.ndarray:
    rx, ry, rz = euler
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def _matrix_to_euler_xyz(m: np.ndarray) -> np.ndarray:
    ry = math.asin(max(-1.0, min(1.0, -float(m[2, 0]))))
    if abs(math.cos(ry)) > 1e-6:
        rx = math.atan2(float(m[2, 1]), float(m[2, 2]))
        rz = math.atan2(float(m[1, 0]), float(m[0, 0]))
    else:  # gimbal lock: fold everything into rx
        rx = math.atan2(-float(m[1, 2]), float(m[1, 1]))
        rz = 0.0
    return np.array([rx, ry, rz])
