"""MulT: shared Swin encoder -> per-task Swin decoders with a shared attention map -> heads."""

from __future__ import annotations

import torch
from torch import nn

from mult.model.decoder import MultiTaskDecoder
from mult.model.encoder import SwinEncoder

class MulT(nn.Module):
    """The multitask model.

    Args:
        encoder: the shared :class:`SwinEncoder`.
        decoder: the tasks' :class:`MultiTaskDecoder`, sized from the encoder.
        heads: one head per decoder task (``nn.ModuleDict``).

    The model never chooses a precision: the step that runs it does
    (:func:`mult.training.step.autocast`).

    ``forward(images [B, 3, H, W])`` (ImageNet-normalised, H = W = ``img_size``) returns
    ``{task: [B, C_task, H, W]}`` in target units (segmentation: logits).
    """

    def __init__(
        self, *, encoder: SwinEncoder, decoder: MultiTaskDecoder, heads: nn.ModuleDict
    ) -> None:
        super().__init__()
        if list(heads.keys()) != decoder.tasks:
            raise ValueError(f"heads {list(heads.keys())} must match the decoder's tasks {decoder.tasks}")
        self.encoder = encoder
        self.decoder = decoder
        self.heads = heads
        self._init_new_weights()

    @property
    def tasks(self) -> list[str]:
        return list(self.decoder.tasks)

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    def _init_new_weights(self) -> None:
        """Swin's initialisation for the layers MulT adds (the encoder keeps timm's or its weights)."""
        for module in (*self.decoder.modules(), *self.heads.modules()):
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, 3, H, W]`` -> ``{task: [B, C_task, H, W]}`` (the input's dtype, or autocast's)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"MulT expects images [B, 3, {self.img_size}, {self.img_size}] (model.img_size), "
                f"got {tuple(images.shape)}"
            )
        streams = self.decoder(self.encoder(images))
        return {t: self.heads[t](x) for t, x in streams.items()}
