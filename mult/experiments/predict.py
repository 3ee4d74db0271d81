"""Predictions for images of any size: letterbox to the model's input, predict, map back.

Each image is scaled so that its longer side is the model's input size, padded to a square
(with the ImageNet mean, i.e. zeros after normalisation), predicted, cropped and resized back
to its original size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from mult.experiments.viz import normalize_image


class PredictError(ValueError):
    """Bad input to predict (unreadable image, bad size); the message names it."""


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
    model: torch.nn.Module, image: np.ndarray, size: int, device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> dict[str, np.ndarray]:
    """Predictions at the image's own size: ``{task: float32 [C, H, W]}`` in target units
    (segmentation: logits)."""
    from mult.training.step import predict

    device = torch.device(device)
    x, (nh, nw) = letterbox(image, size)
    out = predict(model, x.to(device), device, precision)
    h, w = image.shape[:2]
    preds = {}
    for task, y in out.items():
        y = y[:, :, :nh, :nw].float()
        preds[task] = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)[0].cpu().numpy()
    return preds


def output_names(paths: Sequence[str]) -> list[str]:
    """File stems, made unique when two images share one (``a/x.png``, ``b/x.jpg``)."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{i:03d}_{s}" for i, s in enumerate(stems)]
