"""The MulT model: build it from a config with :func:`build_model`.

Pieces, one file each: ``encoder`` (timm Swin, ``features_only``), ``attention`` (window
attention whose map is computed once and applied to several tasks), ``decoder`` (per-task Swin
decoders run block by block), ``heads`` (per-task output layers), ``mult`` (the assembled model).
"""

from __future__ import annotations

import logging

import torch

from mult.config import Config
from mult.model.attention import WindowAttentionMap
from mult.model.decoder import SHARED_ATTENTION_MODES, MultiTaskDecoder, SwinDecoder, SwinDecoderBlock
from mult.model.encoder import PretrainedWeightsError, SwinEncoder
from mult.model.heads import TaskHead, build_heads
from mult.model.mult import MulT

log = logging.getLogger(__name__)

__all__ = [
    "build_model", "MulT", "SwinEncoder", "MultiTaskDecoder", "SwinDecoder", "SwinDecoderBlock",
    "WindowAttentionMap", "TaskHead", "build_heads", "PretrainedWeightsError", "SHARED_ATTENTION_MODES",
    "count_parameters",
]


def build_model(cfg: Config) -> MulT:
    """MulT for ``cfg.tasks`` from ``cfg.model``.

    ``model.compile`` compiles the forward in place (``nn.Module.compile``), so the state-dict
    keys stay those of the plain model. Precision is not the model's business: the step that
    runs it decides (:func:`mult.training.step.autocast`).
    """
    m = cfg.model
    encoder = SwinEncoder(
        m.encoder,
        img_size=m.img_size,
        window_size=m.window_size,
        pretrained=m.pretrained,
        pretrained_path=m.pretrained_path,
        embed_dim=m.embed_dim,
        depths=m.depths,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        drop_path=m.drop_path,
        stem=m.stem,
    )
    decoder_heads = m.decoder_heads if m.decoder_heads is not None else encoder.num_heads[::-1]
    if len(decoder_heads) != len(encoder.channels):
        raise ValueError(
            f"model.decoder_heads: need one head count per stage ({len(encoder.channels)}, deepest first), "
            f"got {decoder_heads}"
        )
    decoder = MultiTaskDecoder(
        tasks=cfg.tasks,
        encoder_channels=encoder.channels,
        resolutions=encoder.resolutions,
        num_heads=decoder_heads,
        window_size=m.window_size,
        depth=m.decoder_depth,
        shared_attention=m.shared_attention,
        reference_task=m.reference_task,
        mlp_ratio=m.mlp_ratio,
        drop_path=m.drop_path,
        checkpointing=m.activation_checkpointing,
    )
    if m.activation_checkpointing:
        encoder.set_grad_checkpointing(True)
    heads = build_heads(cfg.tasks, in_dim=decoder.out_dim, scale=encoder.reductions[0], hidden=m.head_channels)
    model = MulT(encoder=encoder, decoder=decoder, heads=heads)
    log.info(
        "MulT: %s encoder, %d tasks, shared_attention=%s, %.1f M parameters",
        m.encoder, len(cfg.tasks), m.shared_attention, count_parameters(model) / 1e6,
    )
    if m.compile:
        model.compile()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
