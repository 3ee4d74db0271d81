"""(Shifted) window attention whose map can be shared by several value streams.

A :class:`WindowAttentionMap` owns what defines a Swin attention map: the q/k projection, the
relative-position bias table, and (through the block's geometry) the window and the cyclic
shift with its mask. One call computes the map once, from one *source* stream, and applies it
to the values of any number of tasks at once. MulT's decoders use it in four ways (see
:mod:`mult.model.decoder`): the source is the reference task's stream, that stream beside the
encoder skip of the block's scale, the skip alone, or (no sharing) each task's own stream.

How the map is applied to every task in one pass: the tasks' values are concatenated along the
per-head feature axis, so that ``softmax(q k^T / sqrt(d) + bias + mask) @ [v_1 | ... | v_T]``
equals ``[A v_1 | ... | A v_T]`` for the one map ``A``. ``scaled_dot_product_attention`` allows a
value head dim that differs from the query's (its scale stays ``1/sqrt(d_qk)``), so the map is
formed once per block inside one fused call and never materialised per task. The alternatives
are worse: folding tasks into the batch would recompute ``q k^T`` and the softmax T times, and an
explicit softmax followed by an einsum keeps a full ``[windows, heads, N, N]`` map per block
for backward and cannot use the fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The original Swin fills cross-region pairs of a shifted window with -100 rather than -inf.
SHIFT_MASK_VALUE = -100.0


def window_geometry(resolution: tuple[int, int], window_size: int, shifted: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """Swin's rule: a window never exceeds the feature map, and a map that fits in one window
    is not shifted. Returns ``(window, shift)``, each ``(h, w)``."""
    window = tuple(min(window_size, r) for r in resolution)
    shift = tuple(w // 2 if shifted and r > w else 0 for r, w in zip(resolution, window))
    return window, shift  # type: ignore[return-value]


def pad_to_windows(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Zero-pad ``[B, H, W, C]`` at the bottom and right to a multiple of the window.

    Swin pads the *normalised input* of the attention, before any projection, so a padded
    position's q, k and v are the projections' biases and it takes part in every window like
    any other position (Swin's segmentation backbone, timm and MulT's released head all do
    this); callers pad here, before their value and q/k layers, and crop the output.
    """
    pad_h, pad_w = -x.shape[1] % window[0], -x.shape[2] % window[1]
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * nW, wh * ww, C]``; H and W must be multiples of the window."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """``[B * nW, wh * ww, C]`` -> ``[B, H, W, C]`` (the inverse of :func:`window_partition`)."""
    wh, ww = window
    c = windows.shape[-1]
    x = windows.view(-1, height // wh, width // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """``[N, N]`` index into a ``[(2wh-1)(2ww-1), heads]`` bias table, ``N = wh * ww``."""
    wh, ww = window
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N], query minus key
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def _regions(length: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Which of the three bands of a shifted axis each position falls in (0, 1 or 2)."""
    pos = torch.arange(length, device=device)
    return (pos >= length - window).long() + (pos >= length - shift).long()


def shift_mask(
    size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> torch.Tensor | None:
    """Additive mask ``[nW, N, N]`` that stops attention across the seams a cyclic shift creates.

    ``size`` is the (padded) feature size. ``None`` when there is no shift.
    """
    if not any(shift):
        return None
    rows = _regions(size[0], window[0], shift[0], device)
    cols = _regions(size[1], window[1], shift[1], device)
    region = (rows[:, None] * 3 + cols[None, :]).float()[None, :, :, None]  # [1, H, W, 1]
    region = window_partition(region, window).squeeze(-1)  # [nW, N]
    different = region[:, :, None] != region[:, None, :]
    return different.float() * SHIFT_MASK_VALUE


class WindowAttentionMap(nn.Module):
    """Computes one (shifted) window attention map and applies it to several value streams.

    Args:
        in_dim: channels of the source stream (the stream that provides q and k).
        num_heads: attention heads.
        head_dim: channels per head, for q/k and for each task's values.
        window: window ``(h, w)``; shift: cyclic shift ``(h, w)`` (``(0, 0)`` for W-MSA).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_heads: int,
        head_dim: int,
        window: tuple[int, int],
        shift: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window = tuple(window)
        self.shift = tuple(shift)
        self.qk = nn.Linear(in_dim, 2 * num_heads * head_dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)

    def _bias(self) -> torch.Tensor:
        """``[heads, N, N]`` relative-position bias."""
        n = self.window[0] * self.window[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def _to_windows(self, x: torch.Tensor) -> torch.Tensor:
        """Shift, then partition a padded map: ``[B, Hp, Wp, C]`` -> ``[B * nW, N, C]``.

        Swin's order: pad first (the caller, :func:`pad_to_windows`), then shift, with the shift
        mask built on the padded size, so the rows and columns that wrap around are exactly the
        ones it separates. Shifting first and padding after (timm's order, its issue #2438)
        lets the first and last rows of the map attend to each other whenever the map is not a
        multiple of the window.
        """
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        return window_partition(x, self.window)

    def forward(self, source: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attend within windows with q, k from ``source`` and the given values.

        Args:
            source: ``[B, Hp, Wp, in_dim]``, the stream that defines the map, padded to whole
                windows (:func:`pad_to_windows`, before any projection).
            values: ``[B, Hp, Wp, T * heads * head_dim]``, T tasks' values computed from their
                padded streams, task-major (task t's head h sits at channels
                ``(t * heads + h) * head_dim`` onwards).

        Returns:
            ``[B, Hp, Wp, T * heads * head_dim]``, each task's values mixed by the same map;
            crop it to the unpadded size.
        """
        b, hp, wp, _ = source.shape
        heads, hd = self.num_heads, self.head_dim
        tasks = values.shape[-1] // (heads * hd)
        if values.shape[:3] != source.shape[:3] or tasks * heads * hd != values.shape[-1]:
            raise ValueError(
                f"values {tuple(values.shape)} must be [B, H, W, T * {heads} * {hd}] over the source's "
                f"[B, H, W] = {tuple(source.shape[:3])}"
            )
        if hp % self.window[0] or wp % self.window[1]:
            raise ValueError(f"a [{hp}, {wp}] map is not whole {self.window} windows; pad it first (pad_to_windows)")
        qk = self._to_windows(self.qk(source))  # [B*nW, N, 2*heads*hd]
        v = self._to_windows(values)  # [B*nW, N, T*heads*hd]
        n = qk.shape[1]
        n_win = qk.shape[0] // b
        # Windows and heads share one axis so that the per-window mask broadcasts over the batch.
        qk = qk.view(b, n_win, n, 2, heads, hd).permute(3, 0, 1, 4, 2, 5).reshape(2, b, n_win * heads, n, hd)
        v = v.view(b, n_win, n, tasks, heads, hd).permute(0, 1, 4, 2, 3, 5).reshape(b, n_win * heads, n, tasks * hd)
        mask = self._bias()[None]  # [1, heads, N, N]
        seams = shift_mask((hp, wp), self.window, self.shift, source.device)
        if seams is not None:
            mask = mask + seams[:, None]  # [nW, heads, N, N]
        mask = mask.expand(n_win, heads, n, n).reshape(1, n_win * heads, n, n).to(qk.dtype)
        out = F.scaled_dot_product_attention(qk[0], qk[1], v.to(qk.dtype), attn_mask=mask)
        out = out.view(b, n_win, heads, n, tasks, hd).permute(0, 1, 3, 4, 2, 5).reshape(b * n_win, n, -1)
        out = window_reverse(out, self.window, hp, wp)
        if any(self.shift):
            out = torch.roll(out, shifts=self.shift, dims=(1, 2))
        return out
