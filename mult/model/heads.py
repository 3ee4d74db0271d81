"""Task heads: the last decoder stage (stride of the encoder's patch size) -> each task's output
at input resolution, with the task's channel count from the task table (logits for
segmentation, target units for regression)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mult.model.decoder import pixel_shuffle_nhwc
from mult.tasks import get_task


class TaskHead(nn.Module):
    """``[B, h, w, in_dim]`` (NHWC) -> ``[B, out_channels, h * scale, w * scale]`` (NCHW).

    A light head: a linear patch expansion to full resolution (as Swin-Unet's final ×4 expand),
    then a 3×3 convolution to smooth the patch seams and a 1×1 to the task's channels.
    """

    def __init__(self, *, in_dim: int, out_channels: int, scale: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(16, in_dim // 4)
        self.scale = scale
        self.expand = nn.Linear(in_dim, scale * scale * hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        self.conv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.out = nn.Conv2d(hidden, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(pixel_shuffle_nhwc(self.expand(x), self.scale))
        x = x.permute(0, 3, 1, 2)
        return self.out(self.act(self.conv(x)))


def build_heads(tasks: Sequence[str], *, in_dim: int, scale: int, hidden: int | None = None) -> nn.ModuleDict:
    """One :class:`TaskHead` per task, sized by ``TASKS[task].channels``."""
    return nn.ModuleDict(
        {t: TaskHead(in_dim=in_dim, out_channels=get_task(t).channels, scale=scale, hidden=hidden) for t in tasks}
    )
