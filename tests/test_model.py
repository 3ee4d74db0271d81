"""MulT: shapes, gradients, the shared attention map, equivalence with a plain Swin block,
checkpoints, autocast, activation checkpointing, torch.compile and pretrained loading.

Everything runs on CPU with tiny widths and 64-px inputs; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from mult import TASK_NAMES, TASKS, load_config
from mult.model import (
    SHARED_ATTENTION_MODES,
    MulT,
    MultiTaskDecoder,
    PretrainedWeightsError,
    SwinEncoder,
    WindowAttentionMap,
    build_model,
)
from mult.model.encoder import conv_stem

CPU_SMALL = Path(__file__).resolve().parents[1] / "configs" / "cpu-small.yaml"
VARIANTS = [
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
    "swin_large_patch4_window7_224",
]


def tiny_cfg(*overrides: str):
    return load_config(CPU_SMALL, list(overrides))


def images(batch: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", SHARED_ATTENTION_MODES)
def test_output_shapes_every_task(mode):
    model = build_model(tiny_cfg(f"model.shared_attention={mode}"))
    out = model(images(batch=2))
    assert list(out) == list(TASK_NAMES)
    for task, y in out.items():
        assert y.shape == (2, TASKS[task].channels, 64, 64), task
        assert y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_variant_publishes_feature_info(variant):
    """The real architecture of each variant (64 px, window 4): channels and strides come from
    timm's feature info and match the features it returns."""
    enc = SwinEncoder(variant, img_size=64, window_size=4)
    embed = {"tiny": 96, "small": 96, "base": 128, "large": 192}[variant.split("_")[1]]
    assert enc.channels == [embed, 2 * embed, 4 * embed, 8 * embed]
    assert enc.reductions == [4, 8, 16, 32]
    assert enc.num_heads == [c // 32 for c in enc.channels]  # Swin's head width is 32
    with torch.no_grad():
        feats = enc(images())
    assert [tuple(f.shape) for f in feats] == [(1, 64 // r, 64 // r, c) for r, c in zip(enc.reductions, enc.channels)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_variant_shapes(variant):
    """Every variant name builds MulT end to end (widths shrunk, depths 1, so it stays fast)."""
    cfg = tiny_cfg(f"model.encoder={variant}", "tasks=[normal,segment_semantic]")
    out = build_model(cfg)(images())
    assert out["normal"].shape == (1, 3, 64, 64)
    assert out["segment_semantic"].shape == (1, TASKS["segment_semantic"].channels, 64, 64)


@pytest.mark.parametrize(("size", "window"), [(32, 4), (64, 4), (96, 4), (128, 8), (256, 8)])
def test_input_sizes_and_windows(size, window):
    """224 is not special: 256 with window 8, and small test sizes; 96 needs padded windows."""
    cfg = tiny_cfg(f"model.img_size={size}", f"model.window_size={window}", "tasks=[depth_zbuffer]",
                   "model.shared_attention=none")
    with torch.no_grad():
        out = build_model(cfg)(images(size=size))
    assert out["depth_zbuffer"].shape == (1, 1, size, size)


def test_wrong_input_size_is_refused():
    model = build_model(tiny_cfg())
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        model(images(size=96))


def test_bad_decoder_arguments_are_refused():
    kwargs = dict(tasks=["normal"], encoder_channels=[8, 16], resolutions=[(8, 8), (4, 4)], num_heads=[2, 1],
                  window_size=4)
    with pytest.raises(ValueError, match="choose one of"):
        MultiTaskDecoder(**kwargs, shared_attention="sometimes")
    with pytest.raises(ValueError, match="reference_task"):
        MultiTaskDecoder(**kwargs, shared_attention="reference", reference_task="depth_zbuffer")
    with pytest.raises(ValueError, match="must divide"):
        MultiTaskDecoder(**{**kwargs, "num_heads": [3, 1]}, shared_attention="none")


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", SHARED_ATTENTION_MODES)
def test_every_parameter_gets_a_gradient(mode, checkpointing):
    cfg = tiny_cfg(f"model.shared_attention={mode}", f"model.activation_checkpointing={str(checkpointing).lower()}")
    model = build_model(cfg)
    out = model(images())
    sum(y.square().mean() for y in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_activation_checkpointing_gives_the_same_gradients():
    plain = build_model(tiny_cfg("model.shared_attention=encoder"))
    ckpt = build_model(tiny_cfg("model.shared_attention=encoder", "model.activation_checkpointing=true"))
    ckpt.load_state_dict(plain.state_dict())
    x = images(batch=2)
    for model in (plain, ckpt):
        sum(y.mean() for y in model(x).values()).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# The shared map
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", SHARED_ATTENTION_MODES)
def test_map_is_computed_once_per_block(mode, monkeypatch):
    """Observed two ways: forward calls of the map modules, and calls of the attention kernel."""
    cfg = tiny_cfg(f"model.shared_attention={mode}")
    model = build_model(cfg).eval()
    with torch.no_grad():
        feats = model.encoder(images())
    map_calls = []
    for module in model.decoder.modules():
        if isinstance(module, WindowAttentionMap):
            module.register_forward_hook(lambda m, args, out: map_calls.append(m))
    kernel_calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        kernel_calls.append(args[2].shape[-1])  # the value head width: T tasks x head_dim
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        model.decoder(feats)
    blocks = len(model.decoder.dims) * cfg.model.decoder_depth
    per_block = len(cfg.tasks) if mode == "none" else 1
    assert len(map_calls) == blocks * per_block
    assert len(kernel_calls) == blocks * per_block
    if mode != "none":  # one kernel call per block carries every task's values
        assert len(set(map_calls)) == blocks
        assert kernel_calls == [len(cfg.tasks) * m.head_dim for m in map_calls]


def _decoder_and_input(mode: str, tasks: list[str]):
    """A one-stage decoder (two blocks: window, shifted window) on an 8x8 map, 16 wide, 2 heads."""
    decoder = MultiTaskDecoder(tasks=tasks, encoder_channels=[16], resolutions=[(8, 8)], num_heads=[2],
                               window_size=4, depth=2, shared_attention=mode, reference_task=tasks[0])
    x = torch.randn(2, 8, 8, 16)
    return decoder.eval(), x


@pytest.mark.parametrize("mode", ["reference", "official", "encoder"])
def test_shared_map_is_applied_to_every_task(mode):
    """The second task's output follows the shared map's q/k and the tasks stay separable: with
    identical per-task weights both tasks agree, and changing q/k changes both."""
    decoder, x = _decoder_and_input(mode, ["normal", "depth_zbuffer"])
    a, b = decoder.decoders["normal"], decoder.decoders["depth_zbuffer"]
    with torch.no_grad():
        b_state = {k: v for k, v in a.state_dict().items() if ".map." not in k}
        b.load_state_dict(b_state)
        out = decoder([x])
        torch.testing.assert_close(out["depth_zbuffer"], out["normal"])
        maps = [m for m in decoder.modules() if isinstance(m, WindowAttentionMap)]
        assert len(maps) == 2  # one per block, however many tasks
        maps[0].qk.weight.mul_(3.0)
        changed = decoder([x])
    for task in ("normal", "depth_zbuffer"):
        assert not torch.allclose(changed[task], out[task])


def test_drop_path_rises_along_the_data_path():
    """Stochastic depth from 0 at the first (deepest) decoder block to model.drop_path at the
    last, linearly, as Swin's rule and the released head do."""
    model = build_model(tiny_cfg("tasks=[normal]", "model.drop_path=0.2"))
    blocks = [blk for stage in model.decoder.decoders["normal"].stages for blk in stage]
    rates = [blk.drop_path.drop_prob if hasattr(blk.drop_path, "drop_prob") else 0.0 for blk in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == pytest.approx(torch.linspace(0, 0.2, len(blocks)).tolist())


def test_official_mode_sees_the_skip_in_values_and_queries():
    """``official``: q, k from [reference ‖ skip] (one map per block, owned by the reference
    task), every task's values from [its stream ‖ skip]; changing only the skip changes every
    task's output, and the other tasks own no map."""
    decoder = MultiTaskDecoder(tasks=["normal", "depth_zbuffer"], encoder_channels=[16], resolutions=[(8, 8)],
                               num_heads=[2], window_size=4, depth=2, shared_attention="official",
                               reference_task="depth_zbuffer").eval()
    ref, other = decoder.decoders["depth_zbuffer"].stages[0], decoder.decoders["normal"].stages[0]
    assert all(b.map is not None and b.map.qk.in_features == 32 for b in ref)
    assert all(b.map is None and b.v.in_features == 32 for b in other)
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        a = decoder.block(0, 0, x, x, x)
        b = decoder.block(0, 0, x + 1.0, x, x)
    for got, changed in zip(a, b):
        assert not torch.allclose(got, changed)


def test_encoder_features_are_layer_normed_per_stage():
    model = build_model(tiny_cfg("tasks=[normal]"))
    assert len(model.encoder.norms) == len(model.encoder.channels)
    with torch.no_grad():
        feats = model.encoder(images())
    for f, norm in zip(feats, model.encoder.norms):
        torch.testing.assert_close(f.mean(dim=-1), torch.zeros(f.shape[:-1]), rtol=0, atol=1e-4)
        assert norm.normalized_shape == (f.shape[-1],)


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_conv_stem_has_the_patch_projections_shape(stride):
    stem = conv_stem(24, stride)
    strided = [m for m in stem if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == stride.bit_length() - 1
    assert stem(images(batch=2, size=64)).shape == (2, 24, 64 // stride, 64 // stride)


def test_conv_stem_replaces_only_the_patch_projection():
    """Same stage shapes as the patch stem; the stem trains; a pretrained stem is refused."""
    patch = build_model(tiny_cfg("tasks=[normal]", "model.stem=patch"))
    conv = build_model(tiny_cfg("tasks=[normal]", "model.stem=conv"))
    assert isinstance(patch.encoder.model.patch_embed.proj, torch.nn.Conv2d)
    assert isinstance(conv.encoder.model.patch_embed.proj, torch.nn.Sequential)
    x = images(batch=2)
    assert [f.shape for f in conv.encoder(x)] == [f.shape for f in patch.encoder(x)]
    conv(x)["normal"].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.encoder.model.patch_embed.parameters())
    with pytest.raises(ValueError, match="model.stem"):
        SwinEncoder("swin_tiny_patch4_window7_224", img_size=64, window_size=4, pretrained=True, stem="conv")
    with pytest.raises(ValueError, match="model.stem"):
        SwinEncoder("swin_tiny_patch4_window7_224", img_size=64, window_size=4, stem="pixels")


def test_reference_task_is_independent_of_the_others():
    """In ``reference`` mode the reference stream is a plain single-task decoder."""
    multi, x = _decoder_and_input("reference", ["normal", "depth_zbuffer", "reshading"])
    single, _ = _decoder_and_input("reference", ["normal"])
    single.decoders["normal"].load_state_dict(multi.decoders["normal"].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(multi([x])["normal"], single([x])["normal"])


# ---------------------------------------------------------------------------------------------
# Checkpoints, precision, compile
# ---------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    model = build_model(tiny_cfg("tasks=[normal,depth_zbuffer]")).eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    restored = build_model(tiny_cfg("tasks=[normal,depth_zbuffer]")).eval()
    restored.load_state_dict(state, strict=True)
    x = images()
    with torch.no_grad():
        a, b = model(x), restored(x)
    for task in a:
        torch.testing.assert_close(a[task], b[task], rtol=0, atol=0)


@pytest.mark.parametrize("mode", SHARED_ATTENTION_MODES)
def test_runs_under_bf16_autocast(mode):
    """The training step wraps the model in autocast; CPU autocast stands in for CUDA here."""
    model = build_model(tiny_cfg(f"model.shared_attention={mode}", "tasks=[normal,segment_semantic]"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
    assert all(y.dtype == torch.bfloat16 and torch.isfinite(y).all() for y in out.values())
    sum(y.float().mean() for y in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_precision_is_the_steps_choice_not_the_models():
    """A config trained in bf16 on GPUs builds a model without any cast of its own; run by the
    step's rule on a CPU, it computes in fp32 (bit for bit the plain forward)."""
    from mult.training.step import predict

    model = build_model(tiny_cfg("tasks=[normal]", "train.precision=bf16", "scaling.use_gpu=true")).eval()
    x = images()
    with torch.no_grad():
        plain = model(x)["normal"]
        on_cpu = predict(model, x, torch.device("cpu"), "bf16")["normal"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)["normal"]
    assert plain.dtype == torch.float32
    torch.testing.assert_close(on_cpu, plain, rtol=0, atol=0)
    assert low.dtype == torch.bfloat16 and not torch.equal(low.float(), plain)  # autocast does reach it


def test_runs_under_torch_compile():
    """``torch.compile`` with the ``aot_eager`` backend: it traces through dynamo and AOT autograd
    like the default backend but skips Inductor's C++ code generation, which takes minutes on
    this 2-core machine (measured: about 250 s for the tiny model). ``model.compile=true`` uses
    the default backend; that it switches compilation on is checked separately."""
    model = build_model(tiny_cfg("tasks=[normal,depth_zbuffer]"))
    x = images()
    expected = model(x)
    torch._dynamo.reset()
    model.compile(backend="aot_eager", fullgraph=True)
    out = model(x)
    for task in expected:
        torch.testing.assert_close(out[task], expected[task], rtol=1e-5, atol=1e-5)
    sum(y.mean() for y in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    torch._dynamo.reset()


def test_compile_switch_keeps_state_dict_keys():
    plain = build_model(tiny_cfg("tasks=[normal]"))
    compiled = build_model(tiny_cfg("tasks=[normal]", "model.compile=true"))
    assert compiled._compiled_call_impl is not None and plain._compiled_call_impl is None
    assert isinstance(compiled, MulT)
    assert list(compiled.state_dict()) == list(plain.state_dict())


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------
TINY_ARCH = dict(img_size=64, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def test_pretrained_weights_from_a_local_file(tmp_path):
    reference = timm.create_model("swin_tiny_patch4_window7_224", **TINY_ARCH)
    path = tmp_path / "swin.pth"
    torch.save(reference.state_dict(), path)
    cfg = tiny_cfg("tasks=[normal]", "model.stem=patch", "model.pretrained=true", f"model.pretrained_path={path}",
                   "model.mlp_ratio=4.0")
    model = build_model(cfg)
    got = model.encoder.model.layers_2.blocks[0].attn.qkv.weight
    torch.testing.assert_close(got, reference.layers[2].blocks[0].attn.qkv.weight, rtol=0, atol=0)


def test_missing_local_weights_file_is_named(tmp_path):
    cfg = tiny_cfg("model.stem=patch", "model.pretrained=true", f"model.pretrained_path={tmp_path / 'nope.pth'}")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(cfg)


def test_unreachable_hub_says_how_to_give_a_local_file(monkeypatch):
    """Hugging Face's own offline switch makes the download fail at once, as it does without
    network (where it would first retry for about a minute). The message names the exact timm
    tag of paper.yaml's encoder and the config key."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    paper = load_config(Path(CPU_SMALL).parent / "paper.yaml")
    assert paper.model.pretrained and paper.model.encoder == "swin_large_patch4_window7_224.ms_in22k"
    with pytest.raises(PretrainedWeightsError, match=r"swin_large_patch4_window7_224\.ms_in22k.*model\.pretrained_path"):
        SwinEncoder(paper.model.encoder, img_size=64, window_size=4, pretrained=True, embed_dim=16,
                    depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def test_pretrained_file_loads_at_another_window_and_size(tmp_path):
    """A checkpoint trained at window 4 and 64 px loads into a window-6, 96-px encoder (its
    stage maps 24, 12, 6, 3 are not all multiples of 6): timm resizes the relative-position
    tables, every other weight is copied as it is."""
    reference = timm.create_model("swin_tiny_patch4_window7_224", **TINY_ARCH)
    path = tmp_path / "swin-w4.pth"
    torch.save(reference.state_dict(), path)
    arch = {k: v for k, v in TINY_ARCH.items() if k not in ("img_size", "window_size")}
    encoder = SwinEncoder("swin_tiny_patch4_window7_224", img_size=96, window_size=6, pretrained=True,
                          pretrained_path=str(path), **arch)
    table = encoder.model.layers_0.blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 6 - 1) ** 2, 1)
    assert reference.layers[0].blocks[0].attn.relative_position_bias_table.shape == ((2 * 4 - 1) ** 2, 1)
    torch.testing.assert_close(encoder.model.layers_2.blocks[0].attn.qkv.weight,
                               reference.layers[2].blocks[0].attn.qkv.weight, rtol=0, atol=0)
    feats = encoder(torch.randn(1, 3, 96, 96))
    assert [tuple(f.shape[1:3]) for f in feats] == [(24, 24), (12, 12), (6, 6), (3, 3)]


def test_unknown_encoder_is_refused():
    with pytest.raises(ValueError, match="swin_tiny_patch4_window7_224"):
        SwinEncoder("resnet50", img_size=64, window_size=4)
