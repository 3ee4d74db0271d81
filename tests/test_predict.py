"""pipelines.predict: any-size images in, one PNG per task out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mult.encodings import NUM_SEMANTIC_CLASSES
from mult.experiments.viz import draw_task, normalize_image
from mult.experiments import predict as lib
from pipelines import predict as pr


class EchoModel(torch.nn.Module):
    """Stands in for a trained MulT: 'normal' echoes the input, 'depth_zbuffer' is its first
    channel and 'segment_semantic' puts class 1 left of the centre column and class 2 right of
    it. Known outputs make the letterbox / crop / resize-back path checkable."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = x.shape
        logits = torch.zeros(b, NUM_SEMANTIC_CLASSES, h, w)
        logits[:, 1, :, : w // 2] = 5.0
        logits[:, 2, :, w // 2 :] = 5.0
        return {"normal": x.clone(), "depth_zbuffer": x[:, :1].clone(), "segment_semantic": logits}


def _smooth_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), 0.5 + 0 * xx], axis=-1)
    return (img * 255).round().astype(np.uint8)


def test_letterbox_geometry():
    x, (nh, nw) = lib.letterbox(_smooth_image(30, 50), 32)
    assert x.shape == (1, 3, 32, 32) and (nh, nw) == (19, 32)
    assert torch.all(x[:, :, nh:, :] == 0)  # padding is the ImageNet mean
    x, (nh, nw) = lib.letterbox(_smooth_image(100, 7), 32)
    assert (nh, nw) == (32, 2) and torch.all(x[:, :, :, nw:] == 0)


@pytest.mark.parametrize("h, w", [(30, 50), (77, 41), (16, 16), (200, 120)])
def test_predict_image_maps_back_to_original_size(h, w):
    image = _smooth_image(h, w)
    preds = lib.predict_image(EchoModel(), image, 32)
    assert preds["normal"].shape == (3, h, w)
    assert preds["depth_zbuffer"].shape == (1, h, w)
    assert preds["segment_semantic"].shape == (NUM_SEMANTIC_CLASSES, h, w)
    # The echoed input comes back where it was: a wrong crop or flip would be off by ~1.
    err = np.abs(preds["normal"] - normalize_image(image))
    assert np.median(err) < 0.1, np.median(err)
    labels = preds["segment_semantic"].argmax(0)
    content_w = round(w * 32 / max(h, w))
    assert (labels[:, : w // 4] == 1).all()
    if content_w == 32:  # the model's centre column is the image's when the width fills it
        assert (labels[:, -(w // 4) :] == 2).all()


def test_read_image_modes_and_errors(tmp_path):
    Image.new("RGBA", (9, 5), (10, 20, 30, 40)).save(tmp_path / "a.png")
    Image.new("L", (4, 6), 77).save(tmp_path / "b.jpg")
    assert lib.read_image(tmp_path / "a.png").shape == (5, 9, 3)
    assert lib.read_image(tmp_path / "b.jpg").shape == (6, 4, 3)
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(lib.PredictError, match="cannot be read"):
        lib.read_image(tmp_path / "c.png")
    with pytest.raises(lib.PredictError, match="does not exist"):
        lib.read_image(tmp_path / "missing.png")


def test_out_names_unique():
    assert lib.output_names(["a/x.png", "b/x.jpg", "y.png"]) == ["000_x", "001_x", "y"]


def test_main_writes_one_png_per_task(tmp_path, monkeypatch):
    """The entry point with ``load_model`` replaced by the echo model (the CLI path, not the
    checkpoint format, is under test here; test_main_with_real_checkpoint covers that)."""
    from mult.config import Config
    from mult.training import checkpoint

    cfg = Config(tasks=["normal", "depth_zbuffer", "segment_semantic"])
    cfg.model.img_size = 32
    monkeypatch.setattr(checkpoint, "load_model", lambda url, map_location="cpu": (EchoModel(), cfg))
    Image.fromarray(_smooth_image(21, 35)).save(tmp_path / "room.png")
    Image.fromarray(_smooth_image(40, 12)).convert("L").save(tmp_path / "hall.jpg")
    out = tmp_path / "out"
    written = pr.main(["--checkpoint", "unused", str(tmp_path / "room.png"), str(tmp_path / "hall.jpg"), "--out", str(out)])
    names = sorted(p.name for p in written)
    assert names == sorted(f"{s}_{t}.png" for s in ("room", "hall") for t in ("normal", "depth_zbuffer", "segment_semantic"))
    with Image.open(out / "room_segment_semantic.png") as img:
        assert img.size == (35, 21) and img.mode == "RGB"
        seg = np.asarray(img)
    np.testing.assert_array_equal(seg[:, :5], np.broadcast_to(draw_task("segment_semantic", np.ones((21, 5), int)), (21, 5, 3)))
    with Image.open(out / "hall_depth_zbuffer.png") as img:
        assert img.size == (12, 40)


def test_main_bad_image_fails_before_loading(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(lib.PredictError, match="x.png"):
        pr.main(["--checkpoint", "/nonexistent", str(tmp_path / "x.png"), "--out", str(tmp_path)])


def test_main_with_real_checkpoint(tmp_path):
    """A real (untrained) tiny MulT checkpoint, written by the trainer's code, on odd sizes."""
    from pathlib import Path

    from mult import load_config
    from mult.model import build_model
    from mult.training.checkpoint import save_checkpoint

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "cpu-small.yaml", ["tasks=[segment_semantic,depth_zbuffer,normal]"])
    ckpt = save_checkpoint(tmp_path / "ckpt", model=build_model(cfg), config=cfg, step=0)
    Image.fromarray(_smooth_image(37, 90)).save(tmp_path / "wide.png")
    Image.fromarray(_smooth_image(130, 20)).save(tmp_path / "tall.jpg")
    out = tmp_path / "out"
    written = pr.main(["--checkpoint", str(ckpt), str(tmp_path / "wide.png"), str(tmp_path / "tall.jpg"), "--out", str(out)])
    assert len(written) == 6
    for stem, size in (("wide", (90, 37)), ("tall", (20, 130))):
        for task in ("segment_semantic", "depth_zbuffer", "normal"):
            with Image.open(out / f"{stem}_{task}.png") as img:
                assert img.size == size and img.mode == "RGB"


def test_bad_device(tmp_path):
    Image.fromarray(_smooth_image(8, 8)).save(tmp_path / "a.png")
    with pytest.raises(lib.PredictError, match="--device 'gpu0'"):
        pr.main(["--checkpoint", "x", str(tmp_path / "a.png"), "--out", str(tmp_path), "--device", "gpu0"])
