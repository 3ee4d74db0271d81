"""Per-task Swin decoders that share one attention map per block.

Each task has its own :class:`SwinDecoder` (own parameters): four stages of ``depth`` Swin
blocks (window, then shifted window), ×2 patch expansion with channels halved between stages
(the encoder's channels in reverse), and skip connections from the encoder stage of the same
scale (already LayerNormed by the encoder), concatenated and projected (an hourglass, as
Swin-Unet). Stochastic depth rises from 0 at the first (deepest) block to ``drop_path`` at the
last, along the data path, as in Swin and the released MulT head.

:class:`MultiTaskDecoder` runs all tasks' decoders side by side, block by block, because block
``(stage, j)`` of every task uses one attention map (``shared_attention``):

- ``reference`` (the paper): q, k from the reference task's own stream (after its ``norm1``);
  that task's block owns the map's parameters and uses the map itself, like any other task.
- ``official`` (the released code's DEA4 head, for N tasks): q, k from one linear layer over
  ``[reference stream ‖ encoder skip]`` of the block's scale, and each task's values from a
  linear layer over ``[its stream ‖ skip]``.
- ``encoder``: q, k from the encoder skip of the block's scale alone, through a map module of
  the decoder's own.
- ``none``: every task's block owns a map and attends with its own q, k.

Each task keeps its own values, output projection, MLP and norms in every mode.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from timm.layers import DropPath, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from mult.config import SHARED_ATTENTION_MODES
from mult.model.attention import WindowAttentionMap, pad_to_windows, window_geometry

SharedAttention = Literal[SHARED_ATTENTION_MODES]  # type: ignore[valid-type]


def pixel_shuffle_nhwc(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, H, W, f*f*C]`` -> ``[B, f*H, f*W, C]``."""
    b, h, w, c = x.shape
    out = c // (factor * factor)
    x = x.view(b, h, w, factor, factor, out).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * factor, w * factor, out)


class PatchExpand(nn.Module):
    """Upsample by ``factor`` and change width: ``[B, H, W, in_dim]`` -> ``[B, fH, fW, out_dim]``."""

    def __init__(self, *, in_dim: int, out_dim: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.expand = nn.Linear(in_dim, factor * factor * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(pixel_shuffle_nhwc(self.expand(x), self.factor))


class SwinDecoderBlock(nn.Module):
    """One task's Swin block. Its attention map comes from its own ``map`` (when it owns one)
    or from outside (:meth:`MultiTaskDecoder.block`); values, projection, MLP and norms are its own.

    ``context``: the block's values and (if it owns a map) q, k also see a context stream of the
    same width (``official`` mode's encoder skip): their layers take ``[stream ‖ context]``.
    Called alone (it must own a map and take no context), it is a plain Swin block on
    ``[B, H, W, dim]``.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        window: tuple[int, int],
        shift: tuple[int, int] = (0, 0),
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        owns_map: bool = True,
        context: bool = False,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} attention heads")
        self.dim = dim
        self.window = tuple(window)
        self.context = context
        in_dim = 2 * dim if context else dim
        self.norm1 = nn.LayerNorm(dim)
        self.v = nn.Linear(in_dim, dim)
        self.map = (
            WindowAttentionMap(in_dim=in_dim, num_heads=num_heads, head_dim=dim // num_heads, window=window,
                               shift=shift)
            if owns_map
            else None
        )
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def residual(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """Finish the block from the attention output: ``x``, ``mixed`` ``[B, H, W, dim]``."""
        x = x + self.drop_path(self.proj(mixed))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.map is None or self.context:
            raise RuntimeError("this block borrows its attention map or needs a context; run it through "
                               "MultiTaskDecoder")
        h = pad_to_windows(self.norm1(x), self.window)
        return self.residual(x, self.map(h, self.v(h))[:, : x.shape[1], : x.shape[2]])


class SwinDecoder(nn.Module):
    """One task's decoder parameters, deepest stage first (run by :class:`MultiTaskDecoder`).

    Args:
        dims: width of each stage, deepest first (the encoder's channels reversed).
        resolutions: ``(h, w)`` of each stage, deepest first.
        num_heads: heads of each stage, deepest first.
        drop_path: one rate per block, in execution order.
        owns_map: whether this task's blocks compute attention maps themselves.
        context: whether its blocks also see the encoder skip (``official`` mode).
    """

    def __init__(
        self,
        *,
        dims: Sequence[int],
        resolutions: Sequence[tuple[int, int]],
        num_heads: Sequence[int],
        window_size: int,
        depth: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        owns_map: bool,
        context: bool = False,
    ) -> None:
        super().__init__()
        rates = iter(drop_path)
        self.stages = nn.ModuleList()
        for dim, res, heads in zip(dims, resolutions, num_heads):
            blocks = nn.ModuleList()
            for j in range(depth):
                window, shift = window_geometry(res, window_size, shifted=j % 2 == 1)
                blocks.append(
                    SwinDecoderBlock(
                        dim=dim, num_heads=heads, window=window, shift=shift, mlp_ratio=mlp_ratio,
                        drop_path=next(rates), owns_map=owns_map, context=context,
                    )
                )
            self.stages.append(blocks)
        self.upsamples = nn.ModuleList(
            PatchExpand(in_dim=dims[s - 1], out_dim=dims[s], factor=resolutions[s][0] // resolutions[s - 1][0])
            for s in range(1, len(dims))
        )
        # The skip of a stage has the stage's width (the encoder's channels at that scale).
        self.fuse = nn.ModuleList(nn.Linear(2 * dims[s], dims[s]) for s in range(1, len(dims)))
        self.norm = nn.LayerNorm(dims[-1])

    def enter_stage(self, stage: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample the previous stage's output and fuse the skip: -> ``[B, h_s, w_s, dim_s]``."""
        up = self.upsamples[stage - 1](x)
        return self.fuse[stage - 1](torch.cat([up, skip.to(up.dtype)], dim=-1))


class MultiTaskDecoder(nn.Module):
    """All tasks' decoders, run block by block with a shared attention map.

    Args:
        tasks: task names, in output order.
        encoder_channels: encoder stage widths, shallow to deep (as timm's feature info).
        resolutions: encoder stage ``(h, w)``, shallow to deep.
        num_heads: attention heads per decoder stage, deepest first.
        window_size: attention window (clipped to small maps, as Swin does).
        depth: Swin blocks per stage (alternating window and shifted window).
        shared_attention: ``reference``, ``official``, ``encoder`` or ``none`` (see the module docstring).
        reference_task: the task whose stream provides q, k in ``reference`` and ``official`` modes.
        drop_path: the highest stochastic-depth rate (the last block; 0 at the first, deepest one).
        checkpointing: recompute each block in backward (activation checkpointing).

    Example: ``MultiTaskDecoder(tasks=["normal", "depth_zbuffer"], encoder_channels=[8, 16],
    resolutions=[(8, 8), (4, 4)], num_heads=[2, 1], window_size=4)``.
    """

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        encoder_channels: Sequence[int],
        resolutions: Sequence[tuple[int, int]],
        num_heads: Sequence[int],
        window_size: int,
        depth: int = 2,
        shared_attention: SharedAttention = "reference",
        reference_task: str | None = None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _check_args(tasks, encoder_channels, resolutions, num_heads, depth, shared_attention, reference_task)
        self.tasks = list(tasks)
        self.shared_attention = shared_attention
        uses_reference = shared_attention in ("reference", "official")
        self.reference_index = self.tasks.index(reference_task) if uses_reference else None
        self.checkpointing = checkpointing
        self.dims = list(encoder_channels)[::-1]
        res = [tuple(r) for r in resolutions][::-1]
        rates = torch.linspace(0.0, drop_path, len(self.dims) * depth).tolist()
        self.decoders = nn.ModuleDict(
            {
                task: SwinDecoder(
                    dims=self.dims, resolutions=res, num_heads=num_heads, window_size=window_size, depth=depth,
                    mlp_ratio=mlp_ratio, drop_path=rates,
                    owns_map=shared_attention == "none" or i == self.reference_index,
                    context=shared_attention == "official",
                )
                for i, task in enumerate(self.tasks)
            }
        )
        self.encoder_maps = nn.ModuleList()
        if shared_attention == "encoder":
            for dim, r, heads in zip(self.dims, res, num_heads):
                maps = nn.ModuleList()
                for j in range(depth):
                    window, shift = window_geometry(r, window_size, shifted=j % 2 == 1)
                    maps.append(
                        WindowAttentionMap(in_dim=dim, num_heads=heads, head_dim=dim // heads, window=window, shift=shift)
                    )
                self.encoder_maps.append(maps)

    @property
    def out_dim(self) -> int:
        """Width of the last (shallowest) stage."""
        return self.dims[-1]

    def block(self, stage: int, j: int, skip: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
        """Block ``j`` of ``stage`` for every task: ``xs[t]`` ``[B, h, w, dim]`` -> same shapes;
        ``skip`` ``[B, h, w, dim]`` is the (normalised) encoder feature of that scale: the source
        in ``encoder`` mode, the context of every stream in ``official`` mode."""
        blocks = [self.decoders[t].stages[stage][j] for t in self.tasks]
        window = blocks[0].window
        hs = [pad_to_windows(blk.norm1(x), window) for blk, x in zip(blocks, xs)]
        skip = pad_to_windows(skip, window)
        if self.shared_attention == "official":
            hs = [torch.cat([h, skip.to(h.dtype)], dim=-1) for h in hs]
        if self.shared_attention == "none":
            mixed = [blk.map(h, blk.v(h)) for blk, h in zip(blocks, hs)]
        else:
            values = torch.cat([blk.v(h) for blk, h in zip(blocks, hs)], dim=-1)  # [B, h, w, T*dim]
            if self.reference_index is not None:
                ref = self.reference_index
                shared = blocks[ref].map(hs[ref], values)
            else:
                shared = self.encoder_maps[stage][j](skip, values)
            mixed = list(shared.split(self.dims[stage], dim=-1))
        height, width = xs[0].shape[1:3]
        return [blk.residual(x, m[:, :height, :width]) for blk, x, m in zip(blocks, xs, mixed)]

    def forward(self, features: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoder features, shallow to deep, ``[B, h_i, w_i, C_i]`` (NHWC) -> per task the
        normalised last stage ``[B, h_0, w_0, C_0]``."""
        if len(features) != len(self.dims):
            raise ValueError(f"expected {len(self.dims)} encoder feature maps, got {len(features)}")
        skips = list(features)[::-1]
        xs = [skips[0]] * len(self.tasks)
        for stage, skip in enumerate(skips):
            if stage > 0:
                xs = [self.decoders[t].enter_stage(stage, x, skip) for t, x in zip(self.tasks, xs)]
            for j in range(len(self.decoders[self.tasks[0]].stages[stage])):
                if self.checkpointing and torch.is_grad_enabled():
                    xs = checkpoint(self.block, stage, j, skip, *xs, use_reentrant=False)
                else:
                    xs = self.block(stage, j, skip, *xs)
        return {t: self.decoders[t].norm(x) for t, x in zip(self.tasks, xs)}


def _check_args(
    tasks: Sequence[str],
    channels: Sequence[int],
    resolutions: Sequence[tuple[int, int]],
    num_heads: Sequence[int],
    depth: int,
    mode: str,
    reference_task: str | None,
) -> None:
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be a non-empty list of distinct names, got {list(tasks)}")
    if mode not in SHARED_ATTENTION_MODES:
        raise ValueError(f"shared_attention: {mode!r} is not allowed; choose one of {list(SHARED_ATTENTION_MODES)}")
    if mode in ("reference", "official") and reference_task not in tasks:
        raise ValueError(f"reference_task {reference_task!r} is not among the tasks {list(tasks)}")
    if not (len(channels) == len(resolutions) == len(num_heads)) or not channels:
        raise ValueError(
            f"encoder_channels ({len(channels)}), resolutions ({len(resolutions)}) and num_heads "
            f"({len(num_heads)}) need one entry per stage"
        )
    if depth < 1:
        raise ValueError(f"decoder depth must be >= 1, got {depth}")
    deep_first = list(channels)[::-1]
    for dim, heads in zip(deep_first, num_heads):
        if heads < 1 or dim % heads:
            raise ValueError(f"decoder num_heads {list(num_heads)} (deepest first) must divide the widths {deep_first}")
