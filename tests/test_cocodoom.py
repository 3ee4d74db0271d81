"""CocoDoom: the reader and conversion on hand-built files with known values, bad inputs, and the
generated tree (formats, splits, COCO JSON, and the depth/label round trip against the renderer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mult.data.cocodoom import (
    ID_FLOOR_CEILING,
    ID_SKY,
    ID_WALL,
    SPLIT_NAMES,
    CocoDoomReader,
    cocodoom_to_raw,
    decode_object_ids,
    depth_to_raw,
    encode_object_ids,
    image_id,
    parse_file_name,
)
from mult.data.png import CorruptFileError, decode_png, encode_png
from mult.data.datasets import DATASETS, get_dataset
from mult.data.synth.cocodoom import DOOM_FOV_RAD, doom_palette, quantize
from mult.tasks import TASKS

H, W = 2, 3
PALETTE = np.zeros((256, 3), np.uint8)
PALETTE[:4] = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [7, 8, 9]]
INDICES = np.array([[0, 1, 2], [3, 3, 0]], np.uint8)
DEPTH = np.array([[0, 6, 2048], [65534, 65535, 5]], np.uint16)
OBJECT_ID = 0x123456  # spread over all three channels: R 0x56, G 0x34, B 0x12
IDS = np.array([[OBJECT_ID, ID_SKY, ID_FLOOR_CEILING], [ID_WALL, 7, ID_WALL]])


def _objects_png(ids: np.ndarray = IDS) -> bytes:
    """Hand-encoded objects image: R = id & 255, G = (id >> 8) & 255, B = id >> 16."""
    rgb = np.zeros(ids.shape + (3,), np.uint8)
    for (r, c), v in np.ndenumerate(ids):
        rgb[r, c] = [v % 256, (v // 256) % 256, v // 65536]
    return encode_png(rgb)


def _frame(root: Path, run: int, map_number: int, tic: int, domains=("rgb", "depth", "objects")) -> None:
    folder = root / f"run{run}" / f"map{map_number:02d}"
    data = {
        "rgb": encode_png(INDICES, palette=PALETTE),
        "depth": encode_png(DEPTH),
        "objects": _objects_png(),
    }
    for d in domains:
        (folder / d).mkdir(parents=True, exist_ok=True)
        (folder / d / f"{tic:06d}.png").write_bytes(data[d])


def _coco(path: Path, file_names: list[str]) -> None:
    images = [{"id": i, "file_name": n, "width": W, "height": H} for i, n in enumerate(file_names)]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))


@pytest.fixture
def doom_root(tmp_path: Path) -> Path:
    _frame(tmp_path, 1, 1, 123)
    _frame(tmp_path, 1, 1, 130)
    _frame(tmp_path, 2, 3, 7, domains=("rgb", "objects"))  # no depth
    _coco(tmp_path / "run-train.json", ["run1/map01/rgb/000130.png"])
    _coco(tmp_path / "map-val.json", ["run2/map03/rgb/000007.png", "run2/map03/rgb/000008.png"])
    return tmp_path


def _views(reader: CocoDoomReader) -> list:
    return [v for g in reader.groups() for v in reader.views(g)]


def _raw(view) -> dict[str, np.ndarray]:
    return cocodoom_to_raw({k: m.read() for k, m in view.members.items()}, view.key)


# ------------------------------------------------------------------------------------------------
# Hand-built values.
# ------------------------------------------------------------------------------------------------
def test_object_id_over_three_channels():
    rgb = decode_png(_objects_png())
    assert rgb.shape == (H, W, 3) and tuple(rgb[0, 0]) == (0x56, 0x34, 0x12)
    assert tuple(rgb[0, 1]) == (0, 0, 128) and tuple(rgb[0, 2]) == (1, 0, 128)
    ids = decode_object_ids(rgb)
    assert ids.dtype == np.uint32
    np.testing.assert_array_equal(ids, IDS)
    np.testing.assert_array_equal(encode_object_ids(IDS), rgb)
    with pytest.raises(ValueError, match="uint8 \\[H, W, 3\\]"):
        decode_object_ids(rgb[..., 0])
    with pytest.raises(ValueError, match="0..2\\*\\*24 - 1"):
        encode_object_ids(np.array([[2**24]]))


def test_to_raw_exact_values(doom_root: Path):
    view = next(CocoDoomReader(doom_root).views("run1/map01"))
    assert view.key == "cocodoom-run1-map01-000123" and view.missing == []
    raw = _raw(view)
    np.testing.assert_array_equal(raw["rgb"], PALETTE[INDICES])  # palette expanded
    # Taskonomy raw = round(v / 4): 0 -> 0, 6 -> 2 (halves up), 2048 (32 map units = 1 m) -> 512,
    # 65534 -> 16384, sky 65535 stays 65535, 5 -> 1.
    np.testing.assert_array_equal(raw["depth_zbuffer"], [[0, 2, 512], [16384, 65535, 1]])
    assert TASKS["depth_zbuffer"].to_physical(raw["depth_zbuffer"])[0, 2] == 1.0
    assert np.isnan(TASKS["depth_zbuffer"].to_physical(raw["depth_zbuffer"])[1, 1])
    # floor/ceiling and wall -> 1 (background); sky and objects -> 0 (ignored).
    np.testing.assert_array_equal(raw["segment_semantic"], [[0, 0, 1], [1, 0, 1]])
    assert raw["depth_zbuffer"].dtype == np.uint16 and raw["segment_semantic"].dtype == np.uint8


def test_members_are_original_bytes(doom_root: Path):
    view = next(CocoDoomReader(doom_root).views("run1/map01"))
    for domain in ("rgb", "depth", "objects"):
        path = doom_root / "run1" / "map01" / domain / "000123.png"
        assert view.members[domain].read() == path.read_bytes()
    assert Image.open(doom_root / "run1/map01/rgb/000123.png").mode == "P"
    assert decode_png(view.members["depth"].read()).dtype == np.uint16


def test_depth_to_raw_rejects_8_bit():
    with pytest.raises(ValueError, match="uint16"):
        depth_to_raw(np.zeros((2, 2), np.uint8))


# ------------------------------------------------------------------------------------------------
# Reader: scanning, splits, missing domains.
# ------------------------------------------------------------------------------------------------
def test_scan_without_split(doom_root: Path):
    reader = CocoDoomReader(doom_root)
    assert reader.groups() == ["run1/map01", "run2/map03"]
    views = _views(reader)
    assert [v.key for v in views] == [
        "cocodoom-run1-map01-000123", "cocodoom-run1-map01-000130", "cocodoom-run2-map03-000007",
    ]
    assert views[2].missing == ["depth"] and set(views[2].members) == {"rgb", "objects"}
    raw = _raw(views[2])
    assert "depth_zbuffer" not in raw and "segment_semantic" in raw


def test_split_by_name_and_by_file(doom_root: Path, tmp_path_factory):
    assert [v.key for v in _views(CocoDoomReader(doom_root, "run-train"))] == ["cocodoom-run1-map01-000130"]
    views = _views(CocoDoomReader(doom_root, "map-val.json"))
    # Listed but absent on disk: reported, not crashed on.
    assert [(v.key, v.missing) for v in views] == [
        ("cocodoom-run2-map03-000007", ["depth"]),
        ("cocodoom-run2-map03-000008", ["rgb", "depth", "objects"]),
    ]
    elsewhere = tmp_path_factory.mktemp("splits") / "mine.json"
    _coco(elsewhere, ["run1/map01/rgb/000123.png"])
    reader = CocoDoomReader(doom_root, "run-test", split_file=elsewhere)  # split_file wins
    assert [v.key for v in _views(reader)] == ["cocodoom-run1-map01-000123"]


def test_split_names_follow_the_release():
    assert set(SPLIT_NAMES) == {
        f"{by}{full}-{part}" for by in ("run", "map") for full in ("", "-full") for part in ("train", "val", "test")
    }
    assert parse_file_name("run3/map12/rgb/004567.png") == (3, 12, 4567)
    assert image_id(3, 12, 4567) == 3_120_004_567


def test_get_format_finds_cocodoom():
    spec = get_dataset("cocodoom")
    assert spec.load_reader() is CocoDoomReader and spec.load_to_raw() is cocodoom_to_raw


# ------------------------------------------------------------------------------------------------
# Bad inputs.
# ------------------------------------------------------------------------------------------------
def test_bad_roots_and_splits(doom_root: Path, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        CocoDoomReader(doom_root / "nope")
    with pytest.raises(FileNotFoundError, match="no CocoDoom frames"):
        CocoDoomReader(tmp_path_factory.mktemp("empty"))
    with pytest.raises(ValueError, match="valid: run-train"):
        CocoDoomReader(doom_root, "train")
    with pytest.raises(FileNotFoundError, match="run-val.json"):
        CocoDoomReader(doom_root, "run-val")
    _coco(doom_root / "run-test.json", [])
    with pytest.raises(FileNotFoundError, match="for run-test.json"):
        CocoDoomReader(doom_root, "run-test")
    with pytest.raises(KeyError, match="run1/map01"):
        list(CocoDoomReader(doom_root).views("run9/map01"))


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"annotations": []}), "no 'images' list"),
        (json.dumps([1, 2]), "no 'images' list"),
        (json.dumps({"images": [{"id": 1}]}), "lacks a file_name"),
        (json.dumps({"images": [{"file_name": "run1/map1/rgb/000001.png"}]}), "not of the form"),
        (json.dumps({"images": [{"file_name": "COCO_val2014_000000000042.jpg"}]}), "not of the form"),
    ],
)
def test_corrupt_json_names_the_file(doom_root: Path, text: str, match: str):
    (doom_root / "map-test.json").write_text(text)
    with pytest.raises(CorruptFileError, match=match) as info:
        CocoDoomReader(doom_root, "map-test")
    assert "map-test.json" in str(info.value)


def test_binary_json_names_the_file(doom_root: Path):
    (doom_root / "map-test.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CorruptFileError, match="map-test.json"):
        CocoDoomReader(doom_root, "map-test")


def test_corrupt_png_names_the_view_and_domain(doom_root: Path):
    path = doom_root / "run1/map01/depth/000123.png"
    path.write_bytes(path.read_bytes()[:40])
    view = next(CocoDoomReader(doom_root).views("run1/map01"))
    with pytest.raises(CorruptFileError, match="cocodoom-run1-map01-000123.depth.png"):
        _raw(view)


@pytest.mark.parametrize(
    "domain, array, match",
    [
        ("depth", np.zeros((H, W), np.uint8), "expected uint16"),
        ("objects", np.zeros((H, W), np.uint8), "expected uint8 with 3 axes"),
        ("rgb", np.zeros((H, W), np.uint16), "expected uint8 with 3 axes"),
        ("depth", np.zeros((H + 1, W), np.uint16), "disagree on size"),
    ],
)
def test_wrong_png_types(domain: str, array: np.ndarray, match: str):
    members = {"rgb": encode_png(INDICES, palette=PALETTE), "depth": encode_png(DEPTH), "objects": _objects_png()}
    members[domain] = encode_png(array)
    with pytest.raises(CorruptFileError, match=match):
        cocodoom_to_raw(members, "k")


def test_to_raw_needs_rgb():
    with pytest.raises(KeyError, match="no rgb member"):
        cocodoom_to_raw({"depth": encode_png(DEPTH)}, "k")


# ------------------------------------------------------------------------------------------------
# Generated tree.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cocodoom")
    DATASETS["cocodoom"].generate(out, scenes=4, views=2, size=32, seed=3)
    return out


def test_generated_layout_and_png_modes(generated: Path):
    assert {p.name for p in generated.glob("*.json")} == {f"{s}.json" for s in SPLIT_NAMES}
    files = sorted(generated.glob("run*/map*/rgb/*.png"))
    assert len(files) == 3 * 4 * 2
    for rgb in files[:3]:
        folder, name = rgb.parent.parent, rgb.name
        assert Image.open(rgb).mode == "P" and Image.open(rgb).size == (32, 20)
        depth = Image.open(folder / "depth" / name)
        assert depth.mode == "I;16" and depth.info.get("transparency") is None
        assert Image.open(folder / "objects" / name).mode == "RGB"


def test_generated_splits(generated: Path):
    def groups(split: str) -> set[str]:
        return set(CocoDoomReader(generated, split).groups())

    assert groups("run-full-train") == {f"run1/map{m:02d}" for m in range(1, 5)}
    assert groups("run-full-test") == {f"run3/map{m:02d}" for m in range(1, 5)}
    assert groups("map-full-train") == {f"run{r}/map{m:02d}" for r in (1, 2, 3) for m in (1, 2)}
    assert groups("map-full-val") == {f"run{r}/map03" for r in (1, 2, 3)}
    assert groups("map-full-test") == {f"run{r}/map04" for r in (1, 2, 3)}
    full = _views(CocoDoomReader(generated, "run-full-train"))
    sub = _views(CocoDoomReader(generated, "run-train"))
    assert len(full) == 8 and len(sub) == 4 and {v.key for v in sub} < {v.key for v in full}
    assert all(v.missing == [] for v in full)


def test_generated_coco_json(generated: Path):
    doc = json.loads((generated / "run-full-val.json").read_text())
    assert set(doc) >= {"images", "annotations", "categories", "info", "licenses"}
    ids = {im["id"] for im in doc["images"]}
    for im in doc["images"]:
        run, m, tic = parse_file_name(im["file_name"])
        assert run == 2 and im["id"] == image_id(run, m, tic) and (generated / im["file_name"]).is_file()
        assert (im["width"], im["height"]) == (32, 20)
    assert doc["annotations"], "the generated frames should show objects"
    cats = {c["id"] for c in doc["categories"]}
    for ann in doc["annotations"]:
        assert ann["image_id"] in ids and ann["category_id"] in cats and ann["iscrowd"] == 0
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
        im = next(i for i in doc["images"] if i["id"] == ann["image_id"])
        objects = decode_object_ids(decode_png((generated / im["file_name"].replace("/rgb/", "/objects/")).read_bytes()))
        mask = objects == ann["id"] - ann["image_id"] * 10**6
        ys, xs = np.nonzero(mask)
        assert ann["area"] == mask.sum()
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_generated_round_trip_against_the_renderer(tmp_path: Path):
    """One map, one frame per run: rebuild run1's render from the seed and compare."""
    from mult.data.synth.render import render
    from mult.data.synth.scene import make_scene, sample_camera

    DATASETS["cocodoom"].generate(tmp_path, scenes=1, views=1, size=64, seed=9)
    rng = np.random.default_rng(9)
    room = make_scene(rng, DATASETS["cocodoom"].style)
    rng.integers(3, 10)  # run1's first tic
    r = render(room, sample_camera(room, rng, fov_rad=DOOM_FOV_RAD, width=64, height=40))
    view = _views(CocoDoomReader(tmp_path, "run-full-train"))[0]
    raw = _raw(view)
    np.testing.assert_array_equal(raw["rgb"], doom_palette()[quantize(r.rgb)])
    finite = np.isfinite(r.depth)
    np.testing.assert_array_equal(raw["depth_zbuffer"][~finite], 65535)
    # Doom raw is 1/2048 m, Taskonomy raw 1/512 m: two roundings, each at most half a step.
    np.testing.assert_allclose(raw["depth_zbuffer"][finite] / 512.0, r.depth[finite], atol=1 / 1024 + 1 / 4096 + 1e-6)
    expected = ((r.surface >= 0) & (r.surface <= 5)).astype(np.uint8)
    np.testing.assert_array_equal(raw["segment_semantic"], expected)
    ids = decode_object_ids(decode_png(view.members["objects"].read()))
    np.testing.assert_array_equal(ids == ID_SKY, ~finite)


def test_generator_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="multiple of 8"):
        DATASETS["cocodoom"].generate(tmp_path, scenes=1, views=1, size=36, seed=0)
    with pytest.raises(ValueError, match="<= 32"):
        DATASETS["cocodoom"].generate(tmp_path, scenes=33, views=1, size=32, seed=0)
    with pytest.raises(ValueError, match="scenes and views"):
        DATASETS["cocodoom"].generate(tmp_path, scenes=1, views=0, size=32, seed=0)


def test_same_seed_same_bytes(tmp_path: Path):
    for name in ("a", "b"):
        DATASETS["cocodoom"].generate(tmp_path / name, scenes=1, views=1, size=16, seed=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 12 + 9
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
