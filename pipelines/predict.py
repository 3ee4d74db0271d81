"""Run a MulT checkpoint on images of any size and write one PNG per task.

    python -m pipelines.predict --checkpoint s3://runs/mult/ckpt photo.jpg room.png --out preds/

Each image is letterboxed to the model's input size, predicted, and mapped back to its own size
(:mod:`mult.experiments.predict`). Writes ``{out}/{stem}_{task}.png``: depth colour-mapped,
normals as RGB, segmentation through the class palette, other tasks colour-mapped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from mult.experiments.predict import PredictError, output_names, predict_image, read_image
from mult.experiments.viz import draw_task, save_png

log = logging.getLogger("pipelines.predict")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or file, local or s3://")
    p.add_argument("images", nargs="+", help="image files (any size, any format Pillow reads)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--smoke-test", action="store_true", help="predict only the first image")
    return p


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

    from mult.training.checkpoint import load_model

    model, cfg = load_model(args.checkpoint, map_location="cpu")
    model = model.to(device).eval()
    written = []
    for path, name, image in zip(paths, output_names(paths), images):
        preds = predict_image(model, image, cfg.model.img_size, device, cfg.train.precision)
        for task, values in preds.items():
            written.append(save_png(Path(args.out) / f"{name}_{task}.png", draw_task(task, values)))
        log.info("%s (%dx%d): %s", path, image.shape[1], image.shape[0], ", ".join(sorted(preds)))
    return written


if __name__ == "__main__":
    try:
        main()
    except PredictError as exc:
        sys.exit(f"error: {exc}")
