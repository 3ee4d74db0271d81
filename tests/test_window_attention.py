"""Shifted-window attention is exact at any map size, in the decoder and in the encoder.

Two oracles, neither of them this package's own code:

* ``reference_attention`` below, written from Swin's definition (its segmentation backbone, the
  one MulT's released code uses): zero-pad the (normalised) input to a multiple of the window,
  project it to q, k, v, *then* shift cyclically, split into windows, attend inside each window
  with the relative-position bias, and with -100 between positions of different bands of the
  shifted map (bands built on the padded size), shift back, crop. Explicit loops, float64.
* timm's ``SwinTransformerBlock`` with the same weights, where the window divides the map (there
  timm is right; elsewhere it shifts before padding, its open issue #2438).
"""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from mult.model.attention import WindowAttentionMap, pad_to_windows, window_geometry
from mult.model.decoder import MultiTaskDecoder
from mult.model.encoder import PadThenShiftBlock, SwinEncoder, make_windows_exact

SHIFT_MASK = -100.0


def reference_attention(source: torch.Tensor, values: torch.Tensor, qk_weight: torch.Tensor, qk_bias: torch.Tensor,
                        table: torch.Tensor, heads: int, window: int, shift: int,
                        v_weight: torch.Tensor | None = None, v_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One image. ``source`` ``[H, W, C]`` gives q, k through ``qk`` (q rows first, then k);
    ``values`` ``[H, W, D]`` gives v through ``v`` (given already projected when ``v_weight``
    is None). Both are zero-padded before their projections. Returns ``[H, W, heads * dv]``."""
    h, w, _ = source.shape
    hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window
    pad_src = torch.zeros(hp, wp, source.shape[-1], dtype=source.dtype)
    pad_src[:h, :w] = source
    pad_val = torch.zeros(hp, wp, values.shape[-1], dtype=values.dtype)
    pad_val[:h, :w] = values
    if v_weight is not None:
        pad_val = pad_val @ v_weight.T + v_bias
    # the shifted map: position (i, j) holds the padded map's ((i + shift) % hp, (j + shift) % wp)
    rows = [(i + shift) % hp for i in range(hp)]
    cols = [(j + shift) % wp for j in range(wp)]
    src = pad_src[rows][:, cols]
    val = pad_val[rows][:, cols]

    def band(i: int, length: int) -> int:
        if shift == 0:
            return 0
        return 0 if i < length - window else (1 if i < length - shift else 2)

    qk = src @ qk_weight.T + qk_bias
    dim = qk.shape[-1] // 2
    hd, dv = dim // heads, val.shape[-1] // heads
    q, k = qk[..., :dim], qk[..., dim:]
    out = torch.zeros_like(val)
    for wi in range(hp // window):
        for wj in range(wp // window):
            cells = [(wi * window + a, wj * window + b) for a in range(window) for b in range(window)]
            for head in range(heads):
                qs = torch.stack([q[i, j, head * hd:(head + 1) * hd] for i, j in cells])
                ks = torch.stack([k[i, j, head * hd:(head + 1) * hd] for i, j in cells])
                vs = torch.stack([val[i, j, head * dv:(head + 1) * dv] for i, j in cells])
                logits = qs @ ks.T / math.sqrt(hd)
                for n, (i1, j1) in enumerate(cells):
                    for m, (i2, j2) in enumerate(cells):
                        dy, dx = (i1 - wi * window) - (i2 - wi * window), (j1 - wj * window) - (j2 - wj * window)
                        logits[n, m] += table[(dy + window - 1) * (2 * window - 1) + (dx + window - 1), head]
                        if (band(i1, hp), band(j1, wp)) != (band(i2, hp), band(j2, wp)):
                            logits[n, m] += SHIFT_MASK
                mixed = torch.softmax(logits, dim=-1) @ vs
                for n, (i, j) in enumerate(cells):
                    out[i, j, head * dv:(head + 1) * dv] = mixed[n]
    back = torch.zeros_like(out)  # undo the shift, then crop the padding
    for i in range(hp):
        for j in range(wp):
            back[rows[i], cols[j]] = out[i, j]
    return back[:h, :w]


def _random_map(size: int, dim: int = 8, heads: int = 2, window: int = 7, shift: int = 0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    attn = WindowAttentionMap(in_dim=dim, num_heads=heads, head_dim=dim // heads, window=(window, window),
                              shift=(shift, shift)).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    source = torch.randn(2, size, size, dim, generator=gen, dtype=torch.float64)
    values = torch.randn(2, size, size, 3 * dim, generator=gen, dtype=torch.float64)  # three tasks' values
    return attn, source, values


CASES = [(8, 7, 3), (9, 7, 3), (14, 7, 3), (64, 7, 3), (9, 8, 4), (14, 8, 4), (8, 8, 4), (8, 7, 0), (9, 8, 0)]


@pytest.mark.parametrize("size, window, shift", CASES)
def test_window_attention_map_matches_swin_definition(size: int, window: int, shift: int) -> None:
    """Sizes that are and are not multiples of the window, shifted and not; three tasks' values
    through one map (inputs padded first, as the decoder does). Fails on the shift-then-pad
    order at 9 or 64 with window 7."""
    attn, source, values = _random_map(size, window=window, shift=shift)
    with torch.no_grad():
        got = attn(pad_to_windows(source, attn.window), pad_to_windows(values, attn.window))[:, :size, :size]
        for b in range(source.shape[0]):
            for t in range(3):  # each task's values: the same map, applied separately
                expected = reference_attention(source[b], values[b, ..., t * 8:(t + 1) * 8], attn.qk.weight,
                                               attn.qk.bias, attn.relative_position_bias_table, heads=2,
                                               window=window, shift=shift)
                # values and outputs are task-major: task t's heads at channels t * 8 .. t * 8 + 7
                torch.testing.assert_close(got[b, ..., t * 8:(t + 1) * 8], expected, rtol=1e-9, atol=1e-9)


def _timm_block_as_reference(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The reference attention with a timm block's own weights, then its output projection."""
    dim = x.shape[-1]
    qkv_w, qkv_b = block.attn.qkv.weight, block.attn.qkv.bias
    out = torch.stack([reference_attention(x[b], x[b], qkv_w[:2 * dim], qkv_b[:2 * dim],
                                           block.attn.relative_position_bias_table, heads=block.attn.num_heads,
                                           window=block.window_size[0], shift=block.shift_size[0],
                                           v_weight=qkv_w[2 * dim:], v_bias=qkv_b[2 * dim:])
                       for b in range(x.shape[0])])
    return block.attn.proj(out)


@pytest.mark.parametrize("size, window", [(9, 7), (16, 7), (10, 8), (14, 7)])
def test_encoder_blocks_are_exact(size: int, window: int) -> None:
    """timm's block after make_windows_exact computes the reference at every size; unpatched
    timm agrees with it only where the window divides the map (at these sizes: where the
    padding happens to equal the shift, 12 with window 8, the two orders coincide)."""
    gen = torch.Generator().manual_seed(1)
    block = SwinTransformerBlock(dim=8, input_resolution=(size, size), num_heads=2, window_size=window,
                                 shift_size=window // 2).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    x = torch.randn(2, size, size, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = _timm_block_as_reference(block, x)
        timm_out = block._attn(x)
        assert make_windows_exact(torch.nn.Sequential(block)) == 1
        exact_out = block._attn(x)
    torch.testing.assert_close(exact_out, expected, rtol=1e-9, atol=1e-9)
    assert torch.allclose(timm_out, expected, rtol=1e-9, atol=1e-9) == (size % window == 0)


def test_encoder_switches_every_block_and_runs_the_paper_window() -> None:
    """A tiny encoder at 256 px with window 7, every stage map (64, 32, 16, 8) padded."""
    encoder = SwinEncoder("swin_tiny_patch4_window7_224", img_size=256, window_size=7, embed_dim=8,
                          depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2))
    blocks = [m for m in encoder.modules() if isinstance(m, SwinTransformerBlock)]
    assert blocks and all(type(b) is PadThenShiftBlock for b in blocks)
    assert [r for r, _ in encoder.resolutions] == [64, 32, 16, 8]
    assert all(r % 7 for r, _ in encoder.resolutions)
    feats = encoder(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape[1:3]) for f in feats] == encoder.resolutions
    for f in feats:  # each stage's output is LayerNormed (unit variance over channels)
        torch.testing.assert_close(f.var(dim=-1, unbiased=False).mean(), torch.tensor(1.0), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------
# timm's block as the oracle where the window divides the map: forward and gradients, fp64.
# ---------------------------------------------------------------------------------------------
def _decoder(mode: str, size: int, window: int, dim: int = 16, heads: int = 2) -> MultiTaskDecoder:
    return MultiTaskDecoder(tasks=["normal"], encoder_channels=[dim], resolutions=[(size, size)], num_heads=[heads],
                            window_size=window, depth=2, shared_attention=mode, reference_task="normal").double()


def _load_from_timm(src: SwinTransformerBlock, blk, qk_module: WindowAttentionMap, context: bool) -> None:
    """Copy a timm block into one of ours; with a context (official mode), its half of the q, k
    and value layers is zero, so the block computes what the plain one does."""
    dim = blk.dim
    qkv_w, qkv_b = src.attn.qkv.weight, src.attn.qkv.bias
    with torch.no_grad():
        for module, rows in ((qk_module.qk, slice(0, 2 * dim)), (blk.v, slice(2 * dim, 3 * dim))):
            module.weight.zero_()
            module.weight[:, :dim].copy_(qkv_w[rows])
            module.bias.copy_(qkv_b[rows])
        qk_module.relative_position_bias_table.copy_(src.attn.relative_position_bias_table)
        blk.norm1.load_state_dict(src.norm1.state_dict())
        blk.proj.load_state_dict(src.attn.proj.state_dict())
        blk.norm2.load_state_dict(src.norm2.state_dict())
        blk.mlp.load_state_dict(src.mlp.state_dict())
    assert blk.v.in_features == (2 * dim if context else dim)


@pytest.mark.parametrize("mode", ["none", "reference", "official", "encoder"])
@pytest.mark.parametrize("size, window", [(8, 4), (14, 7), (16, 8)])
def test_one_task_matches_timm_forward_and_gradients(mode: str, size: int, window: int) -> None:
    """Every mode with one task and the q, k it shares supplied is timm's Swin block pair (W-MSA,
    SW-MSA): ``none`` and ``reference`` directly, ``official`` with its skip halves zeroed,
    ``encoder`` with the skip equal to the block's normalised input."""
    gen = torch.Generator().manual_seed(2)
    geometry = [window_geometry((size, size), window, shifted=j == 1) for j in range(2)]
    plain = [SwinTransformerBlock(dim=16, input_resolution=(size, size), num_heads=2, window_size=w[0],
                                  shift_size=s[0]).double().eval() for w, s in geometry]
    with torch.no_grad():
        for blk in plain:
            for p in blk.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    decoder = _decoder(mode, size, window).eval()
    ours = decoder.decoders["normal"].stages[0]
    for j, src in enumerate(plain):
        qk_module = decoder.encoder_maps[0][j] if mode == "encoder" else ours[j].map
        _load_from_timm(src, ours[j], qk_module, context=mode == "official")
    x = torch.randn(2, size, size, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(2, size, size, 16, generator=gen, dtype=torch.float64)
    got_in, want_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = got_in, want_in
    for j, src in enumerate(plain):
        skip = src.norm1(got) if mode == "encoder" else torch.randn_like(got)  # official: its weights are zero
        (got,) = decoder.block(0, j, skip, got)
        want = src(want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (got * weight).sum().backward()
    (want * weight).sum().backward()
    torch.testing.assert_close(got_in.grad, want_in.grad, rtol=1e-6, atol=1e-6)
    for j, src in enumerate(plain):  # parameter gradients: the output projection and the MLP
        torch.testing.assert_close(ours[j].proj.weight.grad, src.attn.proj.weight.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours[j].mlp.fc1.weight.grad, src.mlp.fc1.weight.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours[j].v.weight.grad[:, :16], src.attn.qkv.weight.grad[32:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [9, 64])
def test_decoder_blocks_at_the_paper_window_match_the_reference(size: int) -> None:
    """A decoder stage (W-MSA then SW-MSA) at window 7 on maps that are not multiples of it:
    the whole block, norm to MLP, against the reference attention with the block's weights."""
    gen = torch.Generator().manual_seed(3)
    decoder = _decoder("none", size, 7, dim=8, heads=2).eval()
    blocks = decoder.decoders["normal"].stages[0]
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    x = torch.randn(2, size, size, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for j, blk in enumerate(blocks):
            assert blk.map.shift == ((3, 3) if j else (0, 0)) and blk.map.window == (7, 7)
            (got,) = decoder.block(0, j, x, x)
            h = blk.norm1(x)
            attn = torch.stack([reference_attention(h[b], h[b], blk.map.qk.weight, blk.map.qk.bias,
                                                    blk.map.relative_position_bias_table, heads=2, window=7,
                                                    shift=blk.map.shift[0], v_weight=blk.v.weight, v_bias=blk.v.bias)
                                for b in range(2)])
            expected = x + blk.proj(attn)
            expected = expected + blk.mlp(blk.norm2(expected))
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
            x = got
