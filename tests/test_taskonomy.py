"""Taskonomy / Replica readers: hand-built fixtures with known values, every bad-input path, and
generated trees."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from mult.data.png import CorruptFileError, encode_png
from mult.data.taskonomy import (
    DOMAINS,
    ReplicaReader,
    TaskonomyReader,
    find_split_file,
    read_split_csv,
    taskonomy_to_raw,
)
from mult.data.datasets import DATASETS, get_dataset
from mult.data.views import MissingDomainError
from mult.tasks import TASKS

H, W = 4, 6


def _fixture_files() -> dict[str, bytes]:
    """One view with known values in every domain, keyed by folder."""
    depth = np.full((H, W), 512, np.uint16)  # 1.0 m
    depth[0, 0] = 65535  # no surface
    depth[0, 1] = 1024  # 2.0 m
    normal = np.zeros((H, W, 3), np.uint8)
    normal[...] = (128, 128, 255)  # about (0, 0, 1)
    normal[0, 0] = (128, 128, 128)  # hole
    semantic = np.ones((H, W), np.uint8)
    semantic[0, 0] = 0
    semantic[2, 3] = 17
    keypoints = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 60
    edges = np.full((H, W), 10000, np.uint16)
    reshading = np.full((H, W), 200, np.uint8)  # older files: gray
    mask = np.full((H, W), 255, np.uint8)
    mask[0, 0] = 0
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return {
        "rgb": encode_png(rgb),
        "depth_zbuffer": encode_png(depth),
        "normal": encode_png(normal),
        "segment_semantic": encode_png(semantic),
        "keypoints2d": encode_png(keypoints),
        "edge_texture": encode_png(edges),
        "reshading": encode_png(reshading),
        "mask_valid": encode_png(mask),
        "point_info": b'{"field_of_view_rads": 1.0, "resolution": 6}',
    }


def _file_name(folder: str, point: int, view: int, quirk: bool = True) -> str:
    domain = TASKS[folder].file_domain if (folder in TASKS and quirk) else folder
    ext = "json" if folder == "point_info" else "png"
    return f"point_{point}_view_{view}_domain_{domain}.{ext}"


def _build_tree(
    root: Path,
    layout: str,
    buildings: dict[str, list[tuple[int, int]]],
    component: str = "taskonomy",
    skip: dict[tuple[str, int, int], set[str]] | None = None,
) -> None:
    files = _fixture_files()
    for building, views in buildings.items():
        for point, view in views:
            for folder, data in files.items():
                if folder in (skip or {}).get((building, point, view), set()):
                    continue
                base = root / folder / component if layout == "omnidata" else root / folder
                directory = base / building
                directory.mkdir(parents=True, exist_ok=True)
                (directory / _file_name(folder, point, view)).write_bytes(data)


def _members(view) -> dict[str, bytes]:
    return {domain: member.read() for domain, member in view.members.items()}


# ------------------------------------------------------------------------------------------------
# Known values.
# ------------------------------------------------------------------------------------------------
def test_to_raw_decodes_exact_values() -> None:
    raw = taskonomy_to_raw(_fixture_files(), "b-p0-v0")
    depth = raw["depth_zbuffer"]
    assert depth.dtype == np.uint16 and depth[0, 0] == 65535 and depth[1, 1] == 512
    metres = TASKS["depth_zbuffer"].to_physical(depth)
    assert metres[1, 1] == pytest.approx(1.0) and metres[0, 1] == pytest.approx(2.0)
    assert np.isnan(metres[0, 0]) and not TASKS["depth_zbuffer"].raw_valid(depth)[0, 0]
    normals = TASKS["normal"].to_physical(raw["normal"])
    np.testing.assert_allclose(normals[1, 1], (0.0, 0.0, 1.0), atol=0.01)
    assert not TASKS["normal"].raw_valid(raw["normal"])[0, 0]
    assert raw["segment_semantic"][2, 3] == 17 and raw["segment_semantic"].ndim == 2
    np.testing.assert_array_equal(raw["keypoints2d"], np.arange(H * W).reshape(H, W) * 60)
    assert raw["edge_texture"].max() == 10000
    assert raw["mask_valid"].dtype == bool and not raw["mask_valid"][0, 0] and raw["mask_valid"][1, 1]
    assert TASKS["reshading"].to_physical(raw["reshading"])[0, 0] == pytest.approx(200 / 255)
    assert raw["rgb"].shape == (H, W, 3) and "point_info" not in raw


def test_dataset_table_finds_both_with_one_decoding() -> None:
    assert get_dataset("taskonomy").load_reader() is TaskonomyReader
    assert get_dataset("replica").load_reader() is ReplicaReader
    assert get_dataset("replica").load_to_raw() is taskonomy_to_raw is get_dataset("taskonomy").load_to_raw()


def test_reshading_rgb_and_gray_rgb_members() -> None:
    files = _fixture_files()
    files["reshading"] = encode_png(np.full((H, W, 3), 90, np.uint8))
    files["segment_semantic"] = encode_png(np.full((H, W, 3), 4, np.uint8))  # gray stored as RGB
    raw = taskonomy_to_raw(files, "k")
    assert raw["reshading"].shape == (H, W, 3)
    assert raw["segment_semantic"].shape == (H, W) and raw["segment_semantic"][0, 0] == 4


# ------------------------------------------------------------------------------------------------
# Bad members.
# ------------------------------------------------------------------------------------------------
def test_corrupt_member_names_key_and_domain() -> None:
    files = _fixture_files()
    files["normal"] = files["normal"][:30]
    with pytest.raises(CorruptFileError, match=r"bldg-p3-v1\.normal"):
        taskonomy_to_raw(files, "bldg-p3-v1")


def test_missing_rgb_raises() -> None:
    files = _fixture_files()
    del files["rgb"]
    with pytest.raises(MissingDomainError, match="k7"):
        taskonomy_to_raw(files, "k7")


def test_missing_task_member_is_left_out() -> None:
    files = _fixture_files()
    del files["keypoints2d"], files["mask_valid"]
    raw = taskonomy_to_raw(files, "k")
    assert "keypoints2d" not in raw and "mask_valid" not in raw and "depth_zbuffer" in raw


@pytest.mark.parametrize(
    "domain, array, message",
    [
        ("depth_zbuffer", np.zeros((H, W), np.uint8), "16-bit"),
        ("segment_semantic", np.zeros((H, W), np.uint16), "8-bit"),
        ("normal", np.zeros((H, W), np.uint8), "RGB"),
        ("rgb", np.zeros((H, W), np.uint8), "RGB"),
        ("depth_zbuffer", np.zeros((H + 1, W), np.uint16), "differs"),
        ("segment_semantic", np.dstack([np.zeros((H, W), np.uint8)] * 2 + [np.ones((H, W), np.uint8)]), "gray"),
    ],
)
def test_mistyped_member_raises(domain: str, array: np.ndarray, message: str) -> None:
    files = _fixture_files()
    files[domain] = encode_png(array)
    with pytest.raises(CorruptFileError, match=message) as info:
        taskonomy_to_raw(files, "kk")
    assert f"kk.{domain}" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Layouts.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["plain", "omnidata"])
def test_reader_layouts_and_keys(tmp_path: Path, layout: str) -> None:
    _build_tree(tmp_path, layout, {"allensville": [(0, 0), (0, 1), (10, 2)], "beach": [(1, 0)]})
    reader = TaskonomyReader(tmp_path)
    assert reader.layout == layout
    assert reader.groups() == ["allensville", "beach"]
    views = list(reader.views("allensville"))
    # Numeric order: point 10 after point 0.
    assert [v.key for v in views] == ["allensville-p0-v0", "allensville-p0-v1", "allensville-p10-v2"]
    assert all(v.missing == [] and set(v.members) == set(DOMAINS) for v in views)
    assert views[0].members["segment_semantic"].path.endswith("domain_segmentsemantic.png")
    raw = taskonomy_to_raw(_members(views[0]), views[0].key)
    assert raw["depth_zbuffer"][1, 1] == 512


def test_segment_semantic_spelled_out_is_also_accepted(tmp_path: Path) -> None:
    _build_tree(tmp_path, "plain", {"b": [(0, 0)]}, skip={("b", 0, 0): {"segment_semantic"}})
    directory = tmp_path / "segment_semantic" / "b"
    directory.mkdir(parents=True)
    (directory / _file_name("segment_semantic", 0, 0, quirk=False)).write_bytes(_fixture_files()["segment_semantic"])
    (view,) = TaskonomyReader(tmp_path).views("b")
    assert "segment_semantic" in view.members and view.missing == []


def test_stray_files_are_ignored(tmp_path: Path) -> None:
    _build_tree(tmp_path, "plain", {"b": [(0, 0)]})
    (tmp_path / "rgb" / "b" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "rgb" / "b" / "point_0_view_0_domain_depth_zbuffer.png").write_bytes(b"x")  # wrong folder
    (tmp_path / "normal" / "b" / "point_1_view_0_domain_normal.jpg").write_bytes(b"x")
    (view,) = TaskonomyReader(tmp_path).views("b")
    assert view.key == "b-p0-v0"


def test_missing_domain_is_reported_not_crashed_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _build_tree(tmp_path, "omnidata", {"b": [(0, 0), (0, 1)]}, skip={("b", 0, 1): {"normal", "keypoints2d"}})
    with caplog.at_level(logging.WARNING, logger="mult.data.taskonomy"):
        views = list(TaskonomyReader(tmp_path).views("b"))
    assert views[0].missing == []
    assert views[1].missing == ["normal", "keypoints2d"]
    assert "normal" not in views[1].members
    assert "keypoints2d (1)" in caplog.text and "normal (1)" in caplog.text
    raw = taskonomy_to_raw(_members(views[1]), views[1].key)
    assert "normal" not in raw


def test_domains_argument_narrows_expectations(tmp_path: Path) -> None:
    _build_tree(tmp_path, "plain", {"b": [(0, 0)]}, skip={("b", 0, 0): {"keypoints2d"}})
    (view,) = TaskonomyReader(tmp_path, domains=["rgb", "depth_zbuffer"]).views("b")
    assert set(view.members) == {"rgb", "depth_zbuffer"} and view.missing == []
    with pytest.raises(ValueError, match="valid domains"):
        TaskonomyReader(tmp_path, domains=["rgb", "depth"])


def test_omnidata_tree_with_both_components(tmp_path: Path) -> None:
    _build_tree(tmp_path, "omnidata", {"allensville": [(0, 0)]}, component="taskonomy")
    _build_tree(tmp_path, "omnidata", {"apartment_0": [(0, 0), (1, 0)]}, component="replica")
    assert TaskonomyReader(tmp_path).groups() == ["allensville"]
    replica = ReplicaReader(tmp_path)
    assert replica.format == "replica" and replica.layout == "omnidata"
    assert replica.groups() == ["apartment_0"]
    assert [v.key for v in replica.views("apartment_0")] == ["apartment_0-p0-v0", "apartment_0-p1-v0"]


def test_replica_reader_refuses_a_taskonomy_only_tree(tmp_path: Path) -> None:
    _build_tree(tmp_path, "omnidata", {"allensville": [(0, 0)]}, component="taskonomy")
    with pytest.raises(FileNotFoundError, match="replica"):
        ReplicaReader(tmp_path)


def test_bad_roots_and_groups(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TaskonomyReader(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no taskonomy domain folders"):
        TaskonomyReader(tmp_path)
    _build_tree(tmp_path, "plain", {"b": [(0, 0)]})
    with pytest.raises(KeyError, match="zz"):
        next(TaskonomyReader(tmp_path).views("zz"))


def test_dotted_building_gives_dotless_key(tmp_path: Path) -> None:
    _build_tree(tmp_path, "plain", {"v1.2": [(0, 0)]})
    (view,) = TaskonomyReader(tmp_path).views("v1.2")
    assert view.key == "v1_2-p0-v0" and view.group == "v1.2"


# ------------------------------------------------------------------------------------------------
# Split tables.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("newline", ["\r", "\r\n", "\n"])
def test_split_csv_line_endings(tmp_path: Path, newline: str) -> None:
    text = newline.join(["id,train,val,test", "allensville,1,0,0", "beach,0,1,0", "", "cove,0,0,1"]) + newline
    path = tmp_path / "train_val_test_tiny.csv"
    path.write_bytes(text.encode())
    assert read_split_csv(path) == {"train": ["allensville"], "val": ["beach"], "test": ["cove"]}


def test_split_csv_column_order_bom_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_bytes("\ufefftest,id,val,train\r1.0,a,0,0\rfalse,b,0,true\r".encode())
    assert read_split_csv(path) == {"train": ["b"], "val": [], "test": ["a"]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("id,train,val\ra,1,0\r", "lacks column"),
        ("id,train,val,test\ra,1,0\r", "3 fields"),
        ("id,train,val,test\ra,yes,0,0\r", "not 0 or 1"),
        ("id,train,val,test\r,1,0,0\r", "empty building id"),
    ],
)
def test_split_csv_bad_input(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "s.csv"
    path.write_bytes(text.encode())
    with pytest.raises(ValueError, match=message):
        read_split_csv(path)


def test_split_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        read_split_csv(tmp_path / "nothere.csv")


def test_reader_split_selection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _build_tree(tmp_path, "omnidata", {"a": [(0, 0)], "b": [(0, 0)], "c": [(0, 0)]})
    with pytest.raises(FileNotFoundError, match="no split file"):
        TaskonomyReader(tmp_path, split="train")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train_val_test_full.csv").write_bytes(
        b"id,train,val,test\ra,1,0,0\rb,1,0,0\rc,0,0,1\rgone,1,0,0\r"
    )
    with caplog.at_level(logging.INFO, logger="mult.data.taskonomy"):
        assert TaskonomyReader(tmp_path, split="train").groups() == ["a", "b"]
    assert "not on disk" in caplog.text
    assert TaskonomyReader(tmp_path, split="test").groups() == ["c"]
    assert TaskonomyReader(tmp_path, split="val").groups() == []
    assert TaskonomyReader(tmp_path).groups() == ["a", "b", "c"]
    other = tmp_path / "elsewhere.csv"
    other.write_bytes(b"id,train,val,test\nc,1,0,0\n")
    assert TaskonomyReader(tmp_path, split="train", split_file=other).groups() == ["c"]
    with pytest.raises(ValueError, match="valid splits"):
        TaskonomyReader(tmp_path, split="training")


def test_find_split_file_ambiguity(tmp_path: Path) -> None:
    assert find_split_file(tmp_path) is None
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train_val_test_tiny.csv").write_bytes(b"id,train,val,test\n")
    assert find_split_file(tmp_path).name == "train_val_test_tiny.csv"
    (tmp_path / "splits" / "train_val_test_medium.csv").write_bytes(b"id,train,val,test\n")
    with pytest.raises(ValueError, match="several split files"):
        find_split_file(tmp_path)


# ------------------------------------------------------------------------------------------------
# Generated trees.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["plain", "omnidata"])
def test_reader_on_generated_taskonomy(tmp_path: Path, layout: str) -> None:
    summary = DATASETS["taskonomy"].generate(tmp_path, scenes=3, views=3, size=32, seed=5, layout=layout, workers=1)
    reader = TaskonomyReader(tmp_path)
    assert reader.layout == layout and reader.groups() == sorted(summary["groups"])
    per_split = {s: TaskonomyReader(tmp_path, split=s).groups() for s in ("train", "val", "test")}
    assert sorted(sum(per_split.values(), [])) == reader.groups()
    assert all(per_split.values())
    count = 0
    for group in reader.groups():
        for view in reader.views(group):
            assert view.missing == []
            raw = taskonomy_to_raw(_members(view), view.key)
            valid = raw["depth_zbuffer"] < 64500
            np.testing.assert_array_equal(raw["mask_valid"], valid)
            np.testing.assert_array_equal(TASKS["normal"].raw_valid(raw["normal"]), valid)
            np.testing.assert_array_equal(raw["segment_semantic"] != 0, valid)
            count += 1
    assert count == 9


def test_reader_on_generated_replica(tmp_path: Path) -> None:
    DATASETS["replica"].generate(tmp_path, scenes=2, views=2, size=32, seed=1, workers=1)
    reader = get_dataset("replica").load_reader()(tmp_path)
    assert reader.groups() == ["apartment_0", "frl_apartment_0"]
    views = [v for g in reader.groups() for v in reader.views(g)]
    assert len(views) == 4 and all(v.missing == [] for v in views)
    raw = taskonomy_to_raw(_members(views[0]), views[0].key)
    assert raw["depth_zbuffer"].dtype == np.uint16 and raw["rgb"].shape == (32, 32, 3)
