"""The shared encoder: a timm Swin transformer with ``features_only``, made exact, and normed.

Stage channels and strides come from timm's feature info, never from hard-coded tables, so any
timm Swin name (tiny, small, base, large; 224 or 384 variants; with a pretrained tag such as
``.ms_in22k``) works, as do the shrunk test models that override ``embed_dim``/``depths``/
``num_heads``. Two things differ from timm's ``features_only`` model, both as in Swin's own
segmentation backbone (the one MulT's released code uses):

* **exact shifted windows**: timm shifts a stage map and then pads it to a multiple of the
  window, building the shift mask on the padded size (timm issue #2438), so wherever a map is
  not a multiple of the window (64, 32, 16 and 8 with window 7 at 256²) the rows that wrap
  around attend to each other. :class:`PadThenShiftBlock` pads first, then shifts, as Swin does;
  every timm block of the encoder is switched to it;
* **a LayerNorm on each stage's output** before the decoders see it (timm returns raw stage
  outputs).

``stem="conv"`` swaps the patch projection for :func:`conv_stem` (a CPU-recipe option for
training from scratch; the paper's model keeps Swin's patch projection).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import nn

log = logging.getLogger(__name__)


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but could not be loaded."""


class PadThenShiftBlock(SwinTransformerBlock):
    """timm's Swin block with Swin's order in the attention: pad, then cyclic shift.

    Only :meth:`_attn` differs. timm's shift mask is already built for the padded size (a
    static mask on ``ceil(H / window) * window``, or a dynamic one on the padded tensor), which
    is what padding first needs.
    """

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, c = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, -w % ww, 0, -h % wh))
        _, hp, wp, _ = x.shape
        if any(self.shift_size):
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_area, c)
        mask = self.get_attn_mask(x) if getattr(self, "dynamic_mask", False) else self.attn_mask
        windows = self.attn(windows, mask=mask).view(-1, wh, ww, c)
        x = window_reverse(windows, self.window_size, hp, wp)
        if any(self.shift_size):
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


def make_windows_exact(model: nn.Module) -> int:
    """Switch every timm Swin block inside ``model`` to :class:`PadThenShiftBlock` (same
    parameters and buffers; only the order of padding and shifting changes). Returns how many."""
    blocks = [m for m in model.modules() if type(m) is SwinTransformerBlock]
    for block in blocks:
        block.__class__ = PadThenShiftBlock
    return len(blocks)


class SwinEncoder(nn.Module):
    """A timm Swin that returns one LayerNormed feature map per stage, with exact windows.

    Args:
        name: a timm Swin model name, with or without a pretrained tag, e.g.
            ``swin_large_patch4_window7_224.ms_in22k``.
        img_size: input height and width (a multiple of 32).
        window_size: attention window (timm resizes pretrained relative-position tables).
        pretrained: load timm's pretrained weights of ``name``, from ``pretrained_path`` if given,
            else timm's hub (which needs network access).
        embed_dim, depths, num_heads, mlp_ratio: override the variant's architecture (tiny
            test models).
        drop_path: the encoder's stochastic depth rate (rising along its blocks, timm's rule).
        stem: ``"patch"`` (Swin's strided patch projection) or ``"conv"`` (:func:`conv_stem`,
            same output shape; not with ``pretrained``).

    Attributes published for the decoders, shallow to deep: ``channels``, ``reductions``
    (stride of each stage w.r.t. the input), ``num_heads`` and ``resolutions`` ``(h, w)``.
    """

    def __init__(
        self,
        name: str,
        *,
        img_size: int,
        window_size: int,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        embed_dim: int | None = None,
        depths: Sequence[int] | None = None,
        num_heads: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        stem: str = "patch",
    ) -> None:
        super().__init__()
        if stem not in ("patch", "conv"):
            raise ValueError(f"model.stem: {stem!r} is not allowed; choose 'patch' or 'conv'")
        if stem == "conv" and pretrained:
            raise ValueError("model.stem: 'conv' would discard the pretrained patch projection; "
                             "use 'patch' with pretrained weights")
        known = timm.list_models(module="swin_transformer")
        if name.partition(".")[0] not in known:
            raise ValueError(f"model.encoder: {name!r} is not a timm Swin model; choose one of {known} "
                             "(optionally with a pretrained tag, e.g. swin_large_patch4_window7_224.ms_in22k)")
        kwargs: dict = dict(img_size=img_size, window_size=window_size, mlp_ratio=mlp_ratio, drop_path_rate=drop_path)
        for key, value in (("embed_dim", embed_dim), ("depths", depths), ("num_heads", num_heads)):
            if value is not None:
                kwargs[key] = tuple(value) if key != "embed_dim" else value
        self.model = _create(name, pretrained=pretrained, pretrained_path=pretrained_path, **kwargs)
        make_windows_exact(self.model)
        if stem == "conv":
            proj = self.model.patch_embed.proj
            self.model.patch_embed.proj = conv_stem(proj.out_channels, proj.stride[0])
        self.img_size = img_size
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())
        self.resolutions: list[tuple[int, int]] = [(img_size // r, img_size // r) for r in self.reductions]
        self.num_heads: list[int] = _heads_per_stage(self.model, self.channels)
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each Swin stage in backward instead of storing its activations."""
        self.model.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` (ImageNet-normalised) -> per stage ``[B, H / r_i, W / r_i, C_i]`` (NHWC)."""
        return [norm(x) for norm, x in zip(self.norms, self.model(images))]


def conv_stem(out_channels: int, stride: int) -> nn.Sequential:
    """A convolutional stem with the patch projection's output shape (Xiao et al. 2021, "Early
    convolutions help transformers see better"): a 3x3 conv at full resolution, one stride-2 3x3
    conv per factor 2 of ``stride`` (each with batch norm and GELU), then a 1x1 conv to
    ``out_channels``. ``[B, 3, H, W]`` -> ``[B, out_channels, H / stride, W / stride]``."""
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"conv_stem: stride must be a power of two, got {stride}")
    width = max(16, out_channels // 2)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.GELU()]
    channels = width
    for _ in range(stride.bit_length() - 1):
        wider = max(out_channels, channels)
        layers += [nn.Conv2d(channels, wider, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(wider), nn.GELU()]
        channels = wider
    layers.append(nn.Conv2d(channels, out_channels, 1))
    return nn.Sequential(*layers)


def _create(name: str, *, pretrained: bool, pretrained_path: str | None, **kwargs) -> nn.Module:
    if not pretrained:
        return timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    if pretrained_path is not None:
        path = Path(pretrained_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.pretrained_path: {str(path)!r} is not a file; give a timm/Swin checkpoint "
                f"(.pth, .bin or .safetensors state dict) for {name}"
            )
        log.info("loading %s weights from %s", name, path)
        return timm.create_model(
            name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
        )
    try:
        return timm.create_model(name, features_only=True, pretrained=True, **kwargs)
    except OSError as exc:  # hub and URL downloads both fail with OSError subclasses
        tag = name if "." in name else f"{name}.<tag>"
        raise PretrainedWeightsError(
            f"could not fetch the pretrained weights of timm's {tag} from its hub "
            f"({type(exc).__name__}: {exc}). On a machine without network access, download them "
            f"elsewhere (huggingface.co/timm/{tag}, model.safetensors) and set model.pretrained_path "
            "to the local file, or set model.pretrained=false"
        ) from exc


def _heads_per_stage(model: nn.Module, channels: list[int]) -> list[int]:
    """Read each stage's head count off timm's attention modules (feature info lacks it)."""
    heads_by_dim: dict[int, int] = {}
    for module in model.modules():
        if hasattr(module, "relative_position_bias_table") and hasattr(module, "num_heads"):
            heads_by_dim.setdefault(module.qkv.in_features, module.num_heads)
    missing = [c for c in channels if c not in heads_by_dim]
    if missing:
        raise ValueError(f"could not find attention heads for encoder stages with {missing} channels")
    return [heads_by_dim[c] for c in channels]
