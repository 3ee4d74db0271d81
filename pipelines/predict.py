"""Run a MulT checkpoint on images of any size and write one PNG per task.

    python -m pipelines.predict --checkpoint s3://runs/mult/ckpt photo.jpg room.png --out preds/

Each image is scaled so that its longer side is the model's input size, padded to a square
(with the ImageNet mean, i.e. zeros after normalisation), predicted, cropped and resized back
to its original size. Writes ``{out}/{stem}_{task}.png``: depth colour-mapped, normals as RGB,
segmentation through the class palette, other tasks colour-mapped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from mult.viz import draw_task, normalize_image, save_png

log = logging.getLogger("pipelines.predict")


class PredictError(ValueError):
    """Bad input to predict (unreadable image, bad size); the message names it."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or file, local or s3://")
    p.add_argument("images", nargs="+", help="image files (any size, any format Pillow reads)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--smoke-test", action="store_true", help="predict only the first image")
    return p


def read_image(path: str | Path) -> np.ndarray:
    """Any Pillow-readable image -> ``uint8 [H, W, 3]`` RGB."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise PredictError(f"image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise PredictError(f"image {str(path)!r} cannot be read as an image ({exc})") from exc


def letterbox(image: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``uint8 [H, W, 3]`` -> (``float32 [1, 3, size, size]`` normalised, (h, w) of the
    content in the top-left corner; the rest is zero padding)."""
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise PredictError(f"image of size {w}x{h} is empty")
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = torch.from_numpy(normalize_image(image))[None]
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    return F.pad(x, (0, size - nw, 0, size - nh)), (nh, nw)


@torch.no_grad()
def predict_image(
    model: torch.nn.Module, image: np.ndarray, size: int, device: torch.device | str = "cpu"
) -> dict[str, np.ndarray]:
    """Predictions at the image's own size: ``{task: float32 [C, H, W]}`` in target units
    (segmentation: logits)."""
    x, (nh, nw) = letterbox(image, size)
    out = model(x.to(device))
    h, w = image.shape[:2]
    preds = {}
    for task, y in out.items():
        y = y[:, :, :nh, :nw].float()
        preds[task] = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)[0].cpu().numpy()
    return preds


def _out_names(paths: Sequence[str]) -> list[str]:
    """File stems, made unique when two images share one (``a/x.png``, ``b/x.jpg``)."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{i:03d}_{s}" for i, s in enumerate(stems)]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise PredictError(f"--device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    paths = args.images[:1] if args.smoke_test else args.images
    images = [read_image(p) for p in paths]  # fail on a bad image before loading the model

    from mult.checkpoint import load_model

    model, cfg = load_model(args.checkpoint, map_location="cpu")
    model = model.to(device).eval()
    written = []
    for path, name, image in zip(paths, _out_names(paths), images):
        preds = predict_image(model, image, cfg.model.img_size, device)
        for task, values in preds.items():
            written.append(save_png(Path(args.out) / f"{name}_{task}.png", draw_task(task, values)))
        log.info("%s (%dx%d): %s", path, image.shape[1], image.shape[0], ", ".join(sorted(preds)))
    return written


if __name__ == "__main__":
    try:
        main()
    except PredictError as exc:
        sys.exit(f"error: {exc}")
