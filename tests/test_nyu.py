"""NYUv2 labeled: label maps, the reader on hand-built files with known values, bad inputs, and
the generated tree (formats, splits, and the label/depth round trip against the renderer)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.io import loadmat, savemat
from scipy.io.matlab import matfile_version

from mult.data import label_maps
from mult.data.label_maps import (
    NYU40_CLASSES,
    NYU40_TO_TASKONOMY,
    load_class_map_40,
    mapping_markdown,
    nyu40_to_taskonomy,
)
from mult.data.nyu import NYUReader, depth_to_raw, nyu_to_raw, read_splits
from mult.data.png import CorruptFileError, decode_png, encode_png
from mult.data.datasets import DATASETS, get_dataset
from mult.data.synth.nyu import KINECT_FOV_RAD, synthetic_map_class
from mult.encodings import SEMANTIC_CLASSES
from mult.tasks import TASKS

W, H = 4, 3  # hand-built frames: 3 rows x 4 columns


# ------------------------------------------------------------------------------------------------
# Hand-built fixtures.
# ------------------------------------------------------------------------------------------------
def _class_map(path: Path, map_class: np.ndarray | None = None) -> np.ndarray:
    if map_class is None:
        map_class = 40 - np.arange(894) % 40  # fine k -> 40 - (k - 1) % 40
    names = np.empty((1, 40), dtype=object)
    for i in range(40):
        names[0, i] = NYU40_CLASSES[i + 1]
    savemat(path, {"mapClass": map_class.astype(np.float64).reshape(1, -1), "className": names})
    return map_class


def _upright(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per view: rgb [H, W, 3] with rgb[r, c] = (10 r + c + 100 n, 1, 2), depth, labels."""
    rows, cols = np.mgrid[0:H, 0:W]
    rgb = np.stack([10 * rows + cols + 100 * n, np.ones_like(rows), 2 * np.ones_like(rows)], -1)
    depth = np.full((H, W), 1.0, np.float32)
    depth[0, 0], depth[0, 1], depth[0, 2], depth[0, 3] = 0.0, np.nan, 2.5, 0.001
    labels = np.zeros((H, W), np.uint16)
    labels[1, :] = [1, 2, 894, 40]
    return rgb.astype(np.uint8), depth, labels


def _labeled_mat(path: Path, n: int = 2, *, depths: bool = True, labels: bool = True) -> None:
    """Write what MATLAB v7.3 writes: arrays with reversed axes as h5py sees them."""
    with h5py.File(path, "w") as f:
        views = [_upright(i) for i in range(n)]
        f["images"] = np.stack([v[0].transpose(2, 1, 0) for v in views])  # (N, 3, W, H)
        if depths:
            f["depths"] = np.stack([v[1].T for v in views])  # (N, W, H)
        if labels:
            f["labels"] = np.stack([v[2].T for v in views])


@pytest.fixture
def nyu_root(tmp_path: Path) -> Path:
    _labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat")
    savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[2.0]]), "testNdxs": np.array([[1.0]])})
    _class_map(tmp_path / "classMapping40.mat")
    return tmp_path


def _all_views(reader: NYUReader) -> list:
    return [v for g in reader.groups() for v in reader.views(g)]


def _raw(view) -> dict[str, np.ndarray]:
    return nyu_to_raw({k: m.read() for k, m in view.members.items()}, view.key)


# ------------------------------------------------------------------------------------------------
# Label maps.
# ------------------------------------------------------------------------------------------------
def test_nyu40_table_is_complete_and_maps_known_classes():
    assert len(NYU40_TO_TASKONOMY) == 41 and [r.nyu40_id for r in NYU40_TO_TASKONOMY] == list(range(41))
    by_name = {r.nyu40_name: r.taskonomy_name for r in NYU40_TO_TASKONOMY}
    assert by_name["wall"] == by_name["floor"] == by_name["ceiling"] == "background"
    assert by_name["sofa"] == "couch" and by_name["television"] == "tv" and by_name["books"] == "book"
    assert by_name["refridgerator"] == "refrigerator" and by_name["chair"] == "chair"
    assert by_name["bookshelf"] == by_name["otherprop"] == by_name["person"] == "uncertain"
    for r in NYU40_TO_TASKONOMY:
        assert SEMANTIC_CLASSES[r.taskonomy_id] == r.taskonomy_name
    labels = np.array([[0, 1, 5, 6], [24, 25, 38, 40]])
    expected = np.array([[0, 1, 3, 4], [14, 9, 0, 0]])
    np.testing.assert_array_equal(nyu40_to_taskonomy(labels), expected)


def test_nyu40_rejects_out_of_range():
    with pytest.raises(ValueError, match="41 outside 0..40"):
        nyu40_to_taskonomy(np.array([[3, 41]]))


def test_mapping_markdown_lists_every_class():
    md = mapping_markdown()
    lines = md.strip().splitlines()
    assert lines[0].startswith("| NYU40 id") and len(lines) == 2 + 41
    assert "| 6 | sofa | 4 | couch |" in md


def test_load_class_map_40(tmp_path: Path):
    map_class = _class_map(tmp_path / "cm.mat")
    cm = load_class_map_40(tmp_path / "cm.mat")
    assert cm.class_names == NYU40_CLASSES[1:]
    np.testing.assert_array_equal(cm.lut[1:], map_class)
    np.testing.assert_array_equal(cm.apply(np.array([[0, 1, 894]])), [[0, map_class[0], map_class[893]]])
    with pytest.raises(ValueError, match="895 outside"):
        cm.apply(np.array([895]))


@pytest.mark.parametrize(
    "content, match",
    [
        ({"className": np.zeros((1, 40))}, "lacks mapClass"),
        ({"mapClass": np.ones((1, 10)), "className": np.zeros((1, 40))}, "10 entries"),
        ({"mapClass": np.full((1, 894), 41.0), "className": np.zeros((1, 40))}, "outside 0..40"),
    ],
)
def test_load_class_map_40_rejects_bad_files(tmp_path: Path, content, match):
    savemat(tmp_path / "bad.mat", content)
    with pytest.raises(CorruptFileError, match=match) as info:
        load_class_map_40(tmp_path / "bad.mat")
    assert "bad.mat" in str(info.value)


def test_load_class_map_40_rejects_non_mat(tmp_path: Path):
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(CorruptFileError, match="junk.mat"):
        load_class_map_40(tmp_path / "junk.mat")


# ------------------------------------------------------------------------------------------------
# Reader on hand-built files.
# ------------------------------------------------------------------------------------------------
def test_orientation_survives_the_matlab_transpose(nyu_root: Path):
    views = _all_views(NYUReader(nyu_root))
    assert [v.key for v in views] == ["nyu-00001", "nyu-00002"]
    for n, view in enumerate(views):
        rgb = _raw(view)["rgb"]
        assert rgb.shape == (H, W, 3)  # 3 rows x 4 columns, upright
        rows, cols = np.mgrid[0:H, 0:W]
        np.testing.assert_array_equal(rgb[..., 0], 10 * rows + cols + 100 * n)
        np.testing.assert_array_equal(rgb[..., 1:], np.broadcast_to([1, 2], (H, W, 2)))


def test_depth_and_labels_exact(nyu_root: Path):
    view = _all_views(NYUReader(nyu_root))[0]
    assert view.missing == [] and set(view.members) == {"rgb", "depth_zbuffer", "segment_nyu40"}
    depth = decode_png(view.members["depth_zbuffer"].read())
    assert depth.dtype == np.uint16
    np.testing.assert_array_equal(depth[0], [65535, 65535, 1280, 1])  # 0, NaN, 2.5 m, 1 mm
    np.testing.assert_array_equal(depth[1:], 512)
    nyu40 = decode_png(view.members["segment_nyu40"].read())
    # Fixture map: fine k -> 40 - (k - 1) % 40: 1 -> 40, 2 -> 39, 894 -> 27 (towel), 40 -> 1 (wall).
    np.testing.assert_array_equal(nyu40[1], [40, 39, 27, 1])
    raw = _raw(view)
    np.testing.assert_array_equal(raw["segment_semantic"][1], [0, 0, 0, 1])
    np.testing.assert_array_equal(raw["depth_zbuffer"], depth)
    assert TASKS["depth_zbuffer"].to_physical(raw["depth_zbuffer"])[0, 2] == 2.5


def test_splits_are_one_based(nyu_root: Path):
    train = _all_views(NYUReader(nyu_root, "train"))
    test = _all_views(NYUReader(nyu_root, "test"))
    assert [v.key for v in train] == ["nyu-00002"] and [v.key for v in test] == ["nyu-00001"]
    assert _raw(train[0])["rgb"][0, 0, 0] == 100  # the second view's content
    other = nyu_root / "other_splits.mat"
    savemat(other, {"trainNdxs": np.array([[1.0], [2.0]]), "testNdxs": np.zeros((0, 1))})
    assert NYUReader(nyu_root, "train", split_file=other).indices == [1, 2]
    assert NYUReader(nyu_root, "test", split_file=other).groups() == []


def test_groups_chunk_views(tmp_path: Path):
    _labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat", n=5)
    reader = NYUReader(tmp_path, group_size=2)
    assert reader.groups() == ["chunk0000", "chunk0001", "chunk0002"]
    assert [v.key for v in reader.views("chunk0002")] == ["nyu-00005"]
    assert all(v.group == "chunk0001" for v in reader.views("chunk0001"))
    with pytest.raises(KeyError, match="chunk0000..chunk0002"):
        list(reader.views("chunk0007"))


def test_without_class_map_keeps_fine_labels(tmp_path: Path, caplog):
    _labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat")
    reader = NYUReader(tmp_path)
    assert "classMapping40.mat" in caplog.text
    view = _all_views(reader)[0]
    fine = decode_png(view.members["label_nyu894"].read())
    assert fine.dtype == np.uint16
    np.testing.assert_array_equal(fine[1], [1, 2, 894, 40])
    assert "segment_semantic" not in _raw(view)


@pytest.mark.parametrize("depths, labels, missing", [(False, True, ["depth_zbuffer"]), (True, False, ["segment_nyu40"])])
def test_missing_domain_is_reported(tmp_path: Path, depths, labels, missing):
    _labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat", depths=depths, labels=labels)
    _class_map(tmp_path / "classMapping40.mat")
    views = _all_views(NYUReader(tmp_path))
    assert len(views) == 2 and all(v.missing == missing for v in views)
    raw = _raw(views[0])
    assert ("depth_zbuffer" in raw) == depths and ("segment_semantic" in raw) == labels


def test_get_format_finds_nyu():
    spec = get_dataset("nyu")
    assert spec.load_reader() is NYUReader and spec.load_to_raw() is nyu_to_raw


# ------------------------------------------------------------------------------------------------
# Bad inputs.
# ------------------------------------------------------------------------------------------------
def test_missing_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nyu_depth_v2_labeled.mat"):
        NYUReader(tmp_path)
    _labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat")
    with pytest.raises(FileNotFoundError, match="splits.mat"):
        NYUReader(tmp_path, "train")


def test_bad_arguments(nyu_root: Path):
    with pytest.raises(ValueError, match="valid splits: train, test"):
        NYUReader(nyu_root, "val")
    with pytest.raises(ValueError, match="split_file given without split"):
        NYUReader(nyu_root, split_file=nyu_root / "splits.mat")
    with pytest.raises(ValueError, match="group_size"):
        NYUReader(nyu_root, group_size=0)


def test_corrupt_mat_names_the_file(tmp_path: Path):
    (tmp_path / "nyu_depth_v2_labeled.mat").write_bytes(b"\x89HDF garbage" * 100)
    with pytest.raises(CorruptFileError, match="nyu_depth_v2_labeled.mat"):
        NYUReader(tmp_path)


def test_truncated_mat_names_the_file(tmp_path: Path):
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    _labeled_mat(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="nyu_depth_v2_labeled.mat"):
        _all_views(NYUReader(tmp_path))


@pytest.mark.parametrize(
    "datasets, match",
    [
        ({"depths": np.zeros((2, W, H), np.float32)}, "lacks the 'images'"),
        ({"images": np.zeros((2, 4, W, H), np.uint8)}, "expected \\(N, 3, W, H\\)"),
        ({"images": np.zeros((2, 3, W, H), np.uint8), "depths": np.zeros((2, H, W), np.float32)}, "depths has shape"),
    ],
)
def test_bad_mat_layout(tmp_path: Path, datasets, match):
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat", "w") as f:
        for k, v in datasets.items():
            f[k] = v
    with pytest.raises(CorruptFileError, match=match):
        NYUReader(tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        ({"trainNdxs": np.array([[1.0]])}, "lacks 'testNdxs'"),
        ({"trainNdxs": np.array([[0.0]]), "testNdxs": np.array([[1.0]])}, "1-based"),
        ({"trainNdxs": np.array([[1.5]]), "testNdxs": np.array([[1.0]])}, "1-based"),
        ({"trainNdxs": np.array([[3.0]]), "testNdxs": np.array([[1.0]])}, "refers to view 3"),
    ],
)
def test_bad_splits(nyu_root: Path, content, match):
    savemat(nyu_root / "splits.mat", content)
    with pytest.raises(CorruptFileError, match=match) as info:
        NYUReader(nyu_root, "train")
    assert "splits.mat" in str(info.value)


def test_unreadable_splits(nyu_root: Path):
    (nyu_root / "splits.mat").write_bytes(b"\x00" * 50)
    with pytest.raises(CorruptFileError, match="splits.mat"):
        read_splits(nyu_root / "splits.mat")
    with pytest.raises(CorruptFileError, match="nyu_depth_v2_labeled.mat"):  # v7.3, not v5
        NYUReader(nyu_root, "train", split_file=nyu_root / "nyu_depth_v2_labeled.mat")


def test_to_raw_bad_members():
    rgb = encode_png(np.zeros((H, W, 3), np.uint8))
    with pytest.raises(CorruptFileError, match="nyu-00007.depth_zbuffer.png"):
        nyu_to_raw({"rgb": rgb, "depth_zbuffer": b"\x89PNG\r\n\x1a\n truncated"}, "nyu-00007")
    with pytest.raises(CorruptFileError, match="expected uint16"):
        nyu_to_raw({"rgb": rgb, "depth_zbuffer": encode_png(np.zeros((H, W), np.uint8))}, "k")
    with pytest.raises(CorruptFileError, match="expected uint8 with 3 axes"):
        nyu_to_raw({"rgb": encode_png(np.zeros((H, W), np.uint16))}, "k")
    with pytest.raises(CorruptFileError, match="outside 0..40"):
        nyu_to_raw({"rgb": rgb, "segment_nyu40": encode_png(np.full((H, W), 41, np.uint8))}, "k")
    with pytest.raises(CorruptFileError, match="disagree on size"):
        nyu_to_raw({"rgb": rgb, "depth_zbuffer": encode_png(np.zeros((2, 2), np.uint16))}, "k")
    with pytest.raises(KeyError, match="no rgb member"):
        nyu_to_raw({"depth_zbuffer": encode_png(np.zeros((2, 2), np.uint16))}, "k")


def test_depth_to_raw_clips_far_values():
    np.testing.assert_array_equal(depth_to_raw(np.array([[-1.0, np.inf, 200.0, 0.0005]])), [[65535, 65535, 65534, 1]])


# ------------------------------------------------------------------------------------------------
# Generated tree.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nyu")
    DATASETS["nyu"].generate(out, scenes=3, views=2, size=32, seed=5)
    return out


def test_generated_files_match_the_real_formats(generated: Path):
    mat = generated / "nyu_depth_v2_labeled.mat"
    assert mat.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    assert matfile_version(str(mat)) == (2, 0)  # scipy recognises a v7.3 MAT-file
    with h5py.File(mat, "r") as f:
        assert f["images"].shape == (6, 3, 32, 24) and f["images"].dtype == np.uint8
        assert f["depths"].shape == (6, 32, 24) and f["depths"].dtype == np.float32
        assert f["labels"].shape == (6, 32, 24) and f["labels"].dtype == np.uint16
        assert f["labels"][()].max() <= 894
        assert f["depths"].attrs["MATLAB_class"] == b"single"
        names = ["".join(map(chr, f[ref][:, 0])) for ref in f["names"][0]]
        assert len(names) == 894
    splits = loadmat(generated / "splits.mat")
    assert splits["trainNdxs"].shape[1] == 1 and splits["trainNdxs"].dtype == np.float64
    train, test = splits["trainNdxs"].ravel(), splits["testNdxs"].ravel()
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1, 7))
    assert set(train) & set(test) == set()
    cm = load_class_map_40(generated / "classMapping40.mat")
    np.testing.assert_array_equal(cm.lut[1:], synthetic_map_class())
    assert np.mean(cm.lut[1:] != np.arange(1, 895)) > 0.9  # fine ids differ from NYU40 ids


def test_generated_splits_keep_scenes_together(generated: Path):
    train = NYUReader(generated, "train").indices
    test = NYUReader(generated, "test").indices
    scene = lambda i: (i - 1) // 2  # noqa: E731
    assert {scene(i) for i in train}.isdisjoint({scene(i) for i in test})
    assert train and test


def test_generated_round_trip_against_the_renderer(tmp_path: Path):
    """One scene, one view: rebuild the render from the seed and compare what the reader gives."""
    from mult.data.synth.render import render
    from mult.data.synth.scene import make_scene, sample_camera

    DATASETS["nyu"].generate(tmp_path, scenes=1, views=1, size=64, seed=11)
    rng = np.random.default_rng(11)
    scene = make_scene(rng, DATASETS["nyu"].style)
    r = render(scene, sample_camera(scene, rng, fov_rad=KINECT_FOV_RAD, width=64, height=48))
    raw = _raw(_all_views(NYUReader(tmp_path))[0])
    np.testing.assert_array_equal(raw["rgb"], r.rgb)
    finite = np.isfinite(r.depth)
    np.testing.assert_array_equal(raw["depth_zbuffer"][~finite], 65535)
    np.testing.assert_allclose(raw["depth_zbuffer"][finite] / 512.0, r.depth[finite], atol=1 / 1024 + 1e-6)
    # Expected Taskonomy labels: room surfaces -> background, classes NYU40 has -> themselves,
    # the rest -> ignored.
    nyu40_has = {row.taskonomy_id for row in NYU40_TO_TASKONOMY if row.taskonomy_id >= 2}
    expected = np.where(np.isin(r.semantic, list(nyu40_has)), r.semantic, 0)
    expected[(r.surface >= 0) & (r.surface <= 5)] = 1
    expected[r.surface < 0] = 0
    np.testing.assert_array_equal(raw["segment_semantic"], expected)
    assert (expected >= 2).any() or (r.semantic <= 1).all()


def test_generator_rejects_bad_sizes(tmp_path: Path):
    with pytest.raises(ValueError, match="multiple of 4"):
        DATASETS["nyu"].generate(tmp_path, scenes=1, views=1, size=30, seed=0)
    with pytest.raises(ValueError, match="scenes and views"):
        DATASETS["nyu"].generate(tmp_path, scenes=0, views=1, size=32, seed=0)


def test_label_maps_module_has_no_mutable_lut():
    with pytest.raises(ValueError):
        label_maps.NYU40_TO_TASKONOMY_LUT[0] = 5


def test_same_seed_same_bytes(tmp_path: Path):
    for name in ("a", "b"):
        DATASETS["nyu"].generate(tmp_path / name, scenes=2, views=1, size=16, seed=4)
    for f in ("nyu_depth_v2_labeled.mat", "splits.mat", "classMapping40.mat"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
