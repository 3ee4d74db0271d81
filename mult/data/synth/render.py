"""An analytic ray caster that renders every domain of a view, and the 2D responses.

``render(scene, camera)`` hits every pixel's ray against the room and its objects and reads
depth, normals, shading, labels and colour off the same hits; texture edges and keypoints are
image operators on the rendered gray image, in Taskonomy's raw units.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from mult.data.synth.camera import Camera
from mult.data.synth.scene import BOX, CHECKER, CYLINDER, PLANE, SPHERE, STRIPES, WAVES, Scene

_EPS = 1e-4


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
    p = scene.style
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
