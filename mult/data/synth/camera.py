"""A pinhole camera in the generator's frames, and its Taskonomy ``point_info``.

* **world**: metres, ``z`` up.
* **camera**: ``x`` right, ``y`` down, ``z`` forward (Taskonomy's normal-map frame). The
  rotation ``Camera.rotation`` maps camera vectors to world vectors (its columns are the
  camera axes in world coordinates).

Pixel ``(u, v)`` (column, row) looks along ``((u + 0.5 - W/2) / f, (v + 0.5 - H/2) / f, 1)``
with ``f = (W/2) / tan(fov/2)``: that ray has unit ``z``, so the ray parameter of a hit *is*
its z-buffer depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
