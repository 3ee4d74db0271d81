"""A small conv U-Net: the reference network of ``bench.learn``, known to learn on generated data.

It lives in ``bench/``, not in the product package: it is a yardstick for MulT, not a model the
pipeline trains. Like MulT, ``forward`` returns ``{task: [B, C_task, H, W]}`` in target units
(segmentation: logits), so the same losses, metrics and training step apply to it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU (no conv bias: the norm has one)."""
    layers: list[nn.Module] = []
    for c_in in (in_ch, out_ch):
        layers += [nn.Conv2d(c_in, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net over ``len(widths)`` levels (default 24-48-96: about 0.26 M parameters, six tasks).

    Down: a :func:`conv_block` per level, 2x2 max-pool between levels. Up: a 2x2 stride-2
    transposed conv, concatenation with the skip of the same level, a :func:`conv_block`. One
    1x1 conv to the sum of the tasks' channels, split per task.

    ``forward(images [B, 3, H, W])`` with H and W divisible by ``2 ** (len(widths) - 1)``
    returns ``{task: [B, C_task, H, W]}``.
    """

    def __init__(self, tasks: Sequence[str], widths: Sequence[int] = (24, 48, 96), in_channels: int = 3) -> None:
        super().__init__()
        from mult.tasks import get_task

        if len(widths) < 2 or any(w < 1 for w in widths):
            raise ValueError(f"widths: need at least two positive level widths, got {list(widths)}")
        self.tasks = [get_task(t).name for t in tasks]
        if not self.tasks:
            raise ValueError("UNet needs at least one task")
        self.channels = [get_task(t).channels for t in self.tasks]
        self.down = nn.ModuleList(conv_block(c_in, c_out) for c_in, c_out in zip((in_channels, *widths), widths))
        self.pool = nn.MaxPool2d(2)
        deep_to_shallow = list(widths[::-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
                                for c_in, c_out in zip(deep_to_shallow, deep_to_shallow[1:]))
        self.merge = nn.ModuleList(conv_block(2 * c, c) for c in deep_to_shallow[1:])
        self.head = nn.Conv2d(widths[0], sum(self.channels), 1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        factor = 2 ** (len(self.down) - 1)
        if images.ndim != 4 or images.shape[-1] % factor or images.shape[-2] % factor:
            raise ValueError(f"UNet expects images [B, C, H, W] with H, W divisible by {factor}, "
                             f"got {tuple(images.shape)}")
        skips = []
        x = images
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return dict(zip(self.tasks, self.head(x).split(self.channels, dim=1)))
