"""The shared encoder: a timm Swin transformer with ``features_only``.

Stage channels and strides come from timm's feature info, never from hard-coded tables, so any
timm Swin name (tiny, small, base, large; 224 or 384 variants) works, as do the shrunk test
models that override ``embed_dim``/``depths``/``num_heads``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but could not be loaded."""


class SwinEncoder(nn.Module):
    """A timm Swin that returns one feature map per stage.

    Args:
        name: a timm Swin model name, e.g. ``swin_large_patch4_window7_224``.
        img_size: input height and width (a multiple of 32).
        window_size: attention window (timm rescales pretrained relative-position tables).
        pretrained: load timm's ImageNet weights, from ``pretrained_path`` if given, else timm's
            hub (which needs network access).
        embed_dim, depths, num_heads, mlp_ratio: override the variant's architecture (tiny
            test models).
        drop_path: stochastic depth rate.

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
    ) -> None:
        super().__init__()
        known = timm.list_models(module="swin_transformer")
        if name not in known:
            raise ValueError(f"model.encoder: {name!r} is not a timm Swin model; choose one of {known}")
        kwargs: dict = dict(img_size=img_size, window_size=window_size, mlp_ratio=mlp_ratio, drop_path_rate=drop_path)
        for key, value in (("embed_dim", embed_dim), ("depths", depths), ("num_heads", num_heads)):
            if value is not None:
                kwargs[key] = tuple(value) if key != "embed_dim" else value
        self.model = _create(name, pretrained=pretrained, pretrained_path=pretrained_path, **kwargs)
        self.img_size = img_size
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())
        self.resolutions: list[tuple[int, int]] = [(img_size // r, img_size // r) for r in self.reductions]
        self.num_heads: list[int] = _heads_per_stage(self.model, self.channels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each Swin stage in backward instead of storing its activations."""
        self.model.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` (ImageNet-normalised) -> per stage ``[B, H / r_i, W / r_i, C_i]`` (NHWC)."""
        return list(self.model(images))


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
        raise PretrainedWeightsError(
            f"could not fetch pretrained weights for {name} from timm's hub ({type(exc).__name__}: {exc}). "
            "On a machine without network access, download the checkpoint elsewhere (e.g. "
            f"huggingface.co/timm/{name}.ms_in1k, model.safetensors) and set model.pretrained_path "
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
