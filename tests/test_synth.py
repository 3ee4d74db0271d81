"""The synthetic renderer and writers: geometry agrees across domains, files match the real
encodings, output is deterministic, and ``python -m pipelines.synth`` works as a command."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mult.data.png import decode_png, read_png
from mult.data.datasets import DATASET_NAMES, DATASETS, get_dataset
from mult.data.synth.camera import Camera
from mult.data.synth.render import render
from mult.data.synth.scene import look_at, make_scene, sample_camera
from mult.data.synth.taskonomy import encode_depth, encode_normal, encode_view
from mult.data.taskonomy import read_split_csv
from mult.encodings import NUM_SEMANTIC_CLASSES

REPO = Path(__file__).resolve().parents[1]


def normals_from_depth(depth: np.ndarray, fov: float) -> tuple[np.ndarray, np.ndarray]:
    """Back-project a z-buffer (pixel centres, f = (W/2)/tan(fov/2)) and take n = -(dP/du x dP/dv).

    Written independently of the renderer. Returns unit normals ``[H-2, W-2, 3]`` for interior
    pixels and a mask of pixels whose 3x3 neighbourhood has finite depth.
    """
    h, w = depth.shape
    f = (w / 2.0) / math.tan(fov / 2.0)
    u = (np.arange(w) + 0.5 - w / 2.0) / f
    v = (np.arange(h) + 0.5 - h / 2.0) / f
    z = np.where(np.isfinite(depth), depth, np.nan).astype(np.float64)
    points = np.stack([u[None, :] * z, v[:, None] * z, z], axis=-1)
    du = points[1:-1, 2:] - points[1:-1, :-2]
    dv = points[2:, 1:-1] - points[:-2, 1:-1]
    n = -np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    ok = np.isfinite(n).all(axis=-1)
    return n, ok


def _interior(surface: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood lies on one surface (no depth discontinuity), [H-2, W-2]."""
    centre = surface[1:-1, 1:-1]
    same = centre >= 0
    h, w = surface.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= surface[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] == centre
    return same


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.clip((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1), -1, 1)
    return np.degrees(np.arccos(cos))


def _view(style: str, seed: int, width: int = 48, height: int = 40):
    rng = np.random.default_rng(seed)
    scene = make_scene(rng, DATASETS[style].style)
    camera = sample_camera(scene, rng, fov_rad=1.0, width=width, height=height)
    return scene, camera, render(scene, camera)


# ------------------------------------------------------------------------------------------------
# The renderer.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", DATASET_NAMES)
def test_render_domains_agree(style: str) -> None:
    _, camera, r = _view(style, seed=3)
    h, w = 40, 48  # non-square catches width/height mix-ups
    assert r.depth.shape == (h, w) and r.normal.shape == (h, w, 3) and r.rgb.shape == (h, w, 3)
    assert r.rgb.dtype == np.uint8 and r.semantic.dtype == np.uint8 and r.instance.dtype == np.int32
    valid = r.valid
    assert valid.mean() > 0.5
    assert np.all(np.isfinite(r.depth[valid]) & (r.depth[valid] > 0)) and np.all(np.isinf(r.depth[~valid]))
    np.testing.assert_allclose(np.linalg.norm(r.normal[valid], axis=-1), 1.0, atol=1e-4)
    assert np.all(r.normal[~valid] == 0)
    # Normals face the camera: n . (ray direction) < 0.
    rays = camera.ray_directions()
    assert np.all((r.normal * rays).sum(-1)[valid] < 1e-5)
    assert np.all((r.semantic == 0) == ~valid) and r.semantic.max() < NUM_SEMANTIC_CLASSES
    room = r.surface < 6
    assert np.all(r.semantic[room & valid] == 1) and np.all(r.instance[room] == 0)
    assert np.all(r.instance[~room] > 0) and np.all(r.semantic[~room] >= 2)
    assert r.shading.min() >= 0 and r.shading.max() <= 1 and np.all(r.shading[~valid] == 0)
    assert r.edges.min() >= 0 and r.keypoints.min() >= 0


@pytest.mark.parametrize("style, seed", [(s, k) for s in DATASET_NAMES for k in (0, 1)])
def test_normals_agree_with_depth(style: str, seed: int) -> None:
    _, camera, r = _view(style, seed, width=96, height=80)
    n_depth, ok = normals_from_depth(r.depth, camera.fov)
    inside = _interior(r.surface) & ok
    assert inside.sum() > 1000
    errors = _angles(n_depth[inside], r.normal[1:-1, 1:-1][inside])
    assert np.median(errors) < 3.0
    assert np.percentile(errors, 90) < 10.0


def test_normals_agree_with_depth_after_encoding() -> None:
    # The files, decoded, keep the agreement: 2 mm depth steps and 8-bit normals.
    _, camera, r = _view("taskonomy", seed=4, width=128, height=128)
    depth = decode_png(encode_view(r, camera, {})["depth_zbuffer"]).astype(np.float64) / 512.0
    normal = decode_png(encode_view(r, camera, {})["normal"]).astype(np.float64) / 255.0 * 2.0 - 1.0
    n_depth, ok = normals_from_depth(depth, camera.fov)
    inside = _interior(r.surface) & ok
    assert np.median(_angles(n_depth[inside], normal[1:-1, 1:-1][inside])) < 3.0


def test_known_geometry_wall_straight_ahead() -> None:
    scene = make_scene(np.random.default_rng(0), DATASETS["taskonomy"].style)
    scene.kind, scene.center = scene.kind[:6], scene.center[:6]  # the bare room
    scene.windows = []
    _, ly, lz = (float(x) for x in scene.size)
    position = np.array([1.25, ly / 2.0, lz / 2.0])
    # Looking along -x at the wall x = 0: a fronto-parallel plane 1.25 m away.
    camera = Camera(0.4, 9, 7, position, look_at(position, position - [1.0, 0.0, 0.0]), position - [1, 0, 0])
    r = render(scene, camera)
    np.testing.assert_allclose(r.depth, 1.25, rtol=1e-5)
    np.testing.assert_allclose(r.normal.reshape(-1, 3), np.tile([0.0, 0.0, -1.0], (63, 1)), atol=1e-5)
    assert np.all(r.semantic == 1) and np.all(r.surface == 2)
    # Reshading with the light at the camera: n . view direction; 1 at the centre pixel.
    assert r.shading[3, 4] == pytest.approx(1.0, abs=1e-4)
    assert r.shading[0, 0] < r.shading[3, 4]


def test_window_gives_holes_in_every_domain() -> None:
    scene = make_scene(np.random.default_rng(0), DATASETS["taskonomy"].style)
    scene.kind, scene.center = scene.kind[:6], scene.center[:6]
    lx, ly, lz = (float(x) for x in scene.size)
    scene.windows = [(2, 0.1, ly - 0.1, 0.1, lz - 0.1)]  # wall x = 0 almost all open
    position = np.array([lx - 0.5, ly / 2.0, lz / 2.0])
    camera = Camera(0.5, 8, 8, position, look_at(position, position - [1.0, 0.0, 0.0]), position - [1, 0, 0])
    r = render(scene, camera)
    assert not r.valid[4, 4] and np.isinf(r.depth[4, 4])
    files = encode_view(r, camera, {})
    assert decode_png(files["depth_zbuffer"])[4, 4] == 65535
    assert tuple(decode_png(files["normal"])[4, 4]) == (128, 128, 128)
    assert decode_png(files["segment_semantic"])[4, 4] == 0
    assert decode_png(files["mask_valid"])[4, 4] == 0


def test_texture_edges_follow_rgb_edges() -> None:
    _, _, r = _view("cocodoom", seed=2, width=96, height=96)
    gray = r.rgb.astype(np.float32).mean(-1)
    grad = np.abs(np.diff(gray, axis=1))[:-1, :] + np.abs(np.diff(gray, axis=0))[:, :-1]
    edges = r.edges[:-1, :-1]
    assert edges[grad > 20].mean() > 3 * edges[grad < 1].mean()
    assert 500 < r.edges.max() < 65535 and r.keypoints.max() > 10


def test_styles_shift_the_distribution() -> None:
    def stats(style: str) -> tuple[float, float]:
        depths, sats = [], []
        for seed in range(4):
            _, _, r = _view(style, seed, 32, 32)
            depths.append(np.median(r.depth[r.valid]))
            rgb = r.rgb.astype(np.float32)
            sats.append(float((rgb.max(-1) - rgb.min(-1)).mean()))
        return float(np.mean(depths)), float(np.mean(sats))

    depth_t, sat_t = stats("taskonomy")
    depth_c, sat_c = stats("cocodoom")
    assert depth_c > 1.3 * depth_t  # bigger rooms and objects
    assert sat_c > 1.5 * sat_t  # saturated colours


def test_point_info_round_trip() -> None:
    _, camera, _ = _view("replica", seed=6)
    info = json.loads(json.dumps(camera.point_info(building="b", point=0, view=1)))
    assert info["field_of_view_rads"] == pytest.approx(1.0) and info["resolution"] == 48
    back = Camera.from_point_info(info, height=40)
    np.testing.assert_allclose(back.rotation, camera.rotation, atol=1e-9)
    np.testing.assert_allclose(back.position, camera.position)
    assert back.focal == pytest.approx(24.0 / math.tan(0.5))
    with pytest.raises(ValueError, match="field_of_view_rads"):
        Camera.from_point_info({"resolution": 4})


def test_render_is_deterministic() -> None:
    for style in ("nyu", "taskonomy"):  # nyu adds sensor noise
        a, b = _view(style, seed=9)[2], _view(style, seed=9)[2]
        np.testing.assert_array_equal(a.rgb, b.rgb)
        np.testing.assert_array_equal(a.depth, b.depth)


def test_scene_and_camera_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="valid datasets: taskonomy"):
        get_dataset("scannet")
    scene = make_scene(rng, DATASETS["taskonomy"].style)
    with pytest.raises(ValueError, match="fov_rad"):
        sample_camera(scene, rng, fov_rad=3.2, width=8, height=8)
    with pytest.raises(ValueError, match="at least 2x2"):
        sample_camera(scene, rng, fov_rad=1.0, width=1, height=8)
    with pytest.raises(ValueError, match="coincides"):
        look_at(np.zeros(3), np.zeros(3))


def test_encodings() -> None:
    depth = np.array([[1.0, np.inf, 0.5, 200.0]], np.float32)
    np.testing.assert_array_equal(encode_depth(depth), [[512, 65535, 256, 65534]])
    normal = np.array([[[0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]], np.float32)
    raw = encode_normal(normal, np.array([[True, False]]))
    np.testing.assert_array_equal(raw, [[[128, 128, 0], [128, 128, 128]]])


# ------------------------------------------------------------------------------------------------
# Writers.
# ------------------------------------------------------------------------------------------------
def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_taskonomy_files_and_encodings(tmp_path: Path) -> None:
    summary = DATASETS["taskonomy"].generate(tmp_path, scenes=3, views=4, size=24, seed=0, layout="plain", workers=1)
    assert summary["views"] == 12 and len(summary["groups"]) == 3
    building = summary["groups"][0]
    base = tmp_path / "{}" / building
    expect = {  # folder -> (file domain, dtype, channels)
        "rgb": ("rgb", np.uint8, 3), "depth_zbuffer": ("depth_zbuffer", np.uint16, 1),
        "normal": ("normal", np.uint8, 3), "segment_semantic": ("segmentsemantic", np.uint8, 1),
        "keypoints2d": ("keypoints2d", np.uint16, 1), "edge_texture": ("edge_texture", np.uint16, 1),
        "reshading": ("reshading", np.uint8, 3), "mask_valid": ("mask_valid", np.uint8, 1),
    }
    for folder, (domain, dtype, channels) in expect.items():
        arr = read_png(Path(str(base).format(folder)) / f"point_0_view_0_domain_{domain}.png")
        assert arr.dtype == dtype and (arr.shape[2] if arr.ndim == 3 else 1) == channels, folder
    reshading = read_png(Path(str(base).format("reshading")) / "point_0_view_0_domain_reshading.png")
    assert np.all(reshading[..., 0] == reshading[..., 1]) and np.all(reshading[..., 1] == reshading[..., 2])
    info = json.loads((Path(str(base).format("point_info")) / "point_0_view_0_domain_point_info.json").read_text())
    for key in ("field_of_view_rads", "resolution", "camera_location", "camera_rotation_final", "point", "view",
                "building"):
        assert key in info
    assert info["building"] == building and info["resolution"] == 24
    # Views of one point fixate the same 3D point.
    infos = [json.loads(p.read_text()) for p in Path(str(base).format("point_info")).glob("point_0_view_*")]
    assert all(i["point_location"] == infos[0]["point_location"] for i in infos)
    csv_bytes = (tmp_path / "splits" / "train_val_test_full.csv").read_bytes()
    assert b"\r" in csv_bytes and b"\n" not in csv_bytes
    splits = read_split_csv(tmp_path / "splits" / "train_val_test_full.csv")
    assert sorted(sum(splits.values(), [])) == sorted(summary["groups"]) and all(splits.values())


def test_write_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    DATASETS["replica"].generate(tmp_path / "a", scenes=2, views=2, size=16, seed=3, workers=1)
    DATASETS["replica"].generate(tmp_path / "b", scenes=2, views=2, size=16, seed=3, workers=2)  # parallel: same bytes
    DATASETS["replica"].generate(tmp_path / "c", scenes=2, views=2, size=16, seed=4, workers=1)
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c
    assert all(k.split("/")[1] == "replica" for k in a)


def test_writer_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scenes"):
        DATASETS["taskonomy"].generate(tmp_path, scenes=0, views=1, size=16, seed=0)
    with pytest.raises(ValueError, match="size"):
        DATASETS["taskonomy"].generate(tmp_path, scenes=1, views=1, size=4, seed=0)
    with pytest.raises(ValueError, match="valid layouts"):
        DATASETS["taskonomy"].generate(tmp_path, scenes=1, views=1, size=16, seed=0, layout="flat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['layout'\]"):
        DATASETS["replica"].generate(tmp_path, scenes=1, views=1, size=16, seed=0, layout="plain")


# ------------------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------------------
def test_cli_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "tk"
    cmd = [sys.executable, "-m", "pipelines.synth", "--format", "taskonomy", "--out", str(out),
           "--scenes", "2", "--views", "2", "--size", "16", "--seed", "1", "--layout", "plain", "--workers", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "taskonomy dataset written" in proc.stderr
    from mult.data.taskonomy import TaskonomyReader

    reader = TaskonomyReader(out)
    assert reader.layout == "plain" and sum(1 for g in reader.groups() for _ in reader.views(g)) == 4


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    from pipelines.synth import main

    with pytest.raises(SystemExit):
        main(["--format", "scannet", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--format", "taskonomy", "--out", str(tmp_path), "--views", "0"])
    with pytest.raises(SystemExit, match=r"replica: the generator takes no option\(s\) \['layout'\]"):
        main(["--format", "replica", "--out", str(tmp_path), "--layout", "plain"])
    with pytest.raises(SystemExit, match=r"nyu: the generator takes no option\(s\) \['workers'\]"):
        main(["--format", "nyu", "--out", str(tmp_path), "--workers", "2"])


@pytest.mark.parametrize("fmt", ["nyu", "cocodoom"])
def test_cli_dispatches_transfer_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    # The NYU and CocoDoom writers belong to another module; a stand-in records the call so this
    # test checks only the dispatch through the dataset table and the arguments passed.
    calls = []
    fake = types.ModuleType(f"mult.data.synth.{fmt}")
    setattr(fake, f"write_{fmt}", lambda out, **kw: calls.append((out, kw)) or {"views": 1})
    monkeypatch.setitem(sys.modules, f"mult.data.synth.{fmt}", fake)
    from pipelines.synth import main

    main(["--format", fmt, "--out", str(tmp_path), "--scenes", "2", "--views", "3", "--size", "32", "--seed", "7"])
    assert calls == [(tmp_path, {"scenes": 2, "views": 3, "size": 32, "seed": 7, "style": DATASETS[fmt].style})]


def test_cli_smoke_test(tmp_path: Path) -> None:
    from pipelines.synth import main

    summary = main(["--format", "replica", "--out", str(tmp_path), "--smoke-test", "--workers", "1"])
    assert summary["views"] == 4
