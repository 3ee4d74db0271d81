"""mult.training.checkpoint: contents, weights_only loading, RNG round trip, picking and load_model (local, S3)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mult.model import build_model
from mult.config import load_config
from mult.training import checkpoint
from mult.training.optim import build_optimizer, build_scheduler
from mult.weighting import build_loss_combiner

TINY = ["tasks=[normal,depth_zbuffer]", "model.img_size=32",
        "model.embed_dim=12", "model.num_heads=[1,1,1,1]", "model.shared_attention=reference"]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("configs/cpu-small.yaml", TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    combiner = build_loss_combiner(cfg)
    optimizer = build_optimizer(model, cfg.optim, combiner)
    scheduler = build_scheduler(optimizer, cfg.optim, max_steps=10)
    # one real step so the optimizer has state worth saving
    out = model(torch.rand(2, 3, 32, 32))
    sum(o.square().mean() for o in out.values()).backward()
    optimizer.step()
    scheduler.step()
    return cfg, model, combiner, optimizer, scheduler


def _save(directory: Path, tiny, step: int = 3, objective: float = 1.5) -> Path:
    cfg, model, combiner, optimizer, scheduler = tiny
    return checkpoint.save_checkpoint(
        directory, model=model, config=cfg, step=step, optimizer=optimizer, scheduler=scheduler,
        combiner=combiner, data_position={"epoch": 1, "micro_batch": 4}, rng=[checkpoint.capture_rng()],
        counters={"bad_samples": 2, "samples": 24}, history=[{"step": 1, "total": 2.0}],
        meta={"val_objective": objective},
    )


def test_contents_load_with_weights_only(tmp_path: Path, tiny) -> None:
    cfg, model, combiner, optimizer, scheduler = tiny
    directory = _save(tmp_path / "ckpt", tiny)
    assert sorted(p.name for p in directory.iterdir()) == sorted(checkpoint.CHECKPOINT_FILES)
    for name in (checkpoint.MODEL_FILE, checkpoint.STATE_FILE):
        torch.load(directory / name, weights_only=True)  # raises if anything unsafe was pickled
    payload = checkpoint.load_checkpoint(directory)
    assert payload["step"] == 3 and payload["tasks"] == ["normal", "depth_zbuffer"]
    assert payload["config"]["model"]["embed_dim"] == 12
    for key, value in model.state_dict().items():
        torch.testing.assert_close(payload["model"][key], value)
    state = payload["state"]
    assert state["data_position"] == {"epoch": 1, "micro_batch": 4}
    assert state["counters"] == {"bad_samples": 2, "samples": 24}
    assert state["scheduler"]["last_epoch"] == 1
    assert len(state["optimizer"]["state"]) > 0
    restored = build_optimizer(build_model(cfg), cfg.optim, build_loss_combiner(cfg))
    restored.load_state_dict(state["optimizer"])  # same parameter layout
    assert json.loads((directory / checkpoint.META_FILE).read_text())["val_objective"] == 1.5


def test_ddp_prefix_is_not_saved(tmp_path: Path, tiny) -> None:
    cfg, model, *_ = tiny

    class Wrapper(torch.nn.Module):  # stands in for DDP/compile wrappers: unwrap() follows _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    checkpoint.save_checkpoint(tmp_path, model=Wrapper(model), config=cfg, step=0)
    keys = checkpoint.load_checkpoint(tmp_path)["model"].keys()
    assert keys == model.state_dict().keys()


def test_rng_round_trip() -> None:
    state = checkpoint.capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(2))
    checkpoint.restore_rng(state)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == second[0] and first[1] == second[1]
    torch.testing.assert_close(first[2], second[2])


def test_select_best_and_latest(tmp_path: Path, tiny) -> None:
    _save(tmp_path / "checkpoint_a", tiny, step=10, objective=0.9)
    _save(tmp_path / "checkpoint_b", tiny, step=20, objective=1.3)
    _save(tmp_path / "checkpoint_c", tiny, step=30, objective=0.9)
    (tmp_path / "tensorboard").mkdir()
    assert checkpoint.select_checkpoint(tmp_path).name == "checkpoint_c"  # tie: later step
    assert checkpoint.select_checkpoint(tmp_path, "latest").name == "checkpoint_c"
    _save(tmp_path / "checkpoint_d", tiny, step=40, objective=2.0)
    assert checkpoint.select_checkpoint(tmp_path).name == "checkpoint_c"
    assert checkpoint.select_checkpoint(tmp_path, "latest").name == "checkpoint_d"
    with pytest.raises(ValueError, match="prefer"):
        checkpoint.select_checkpoint(tmp_path, "newest")


def test_load_model_local(tmp_path: Path, tiny) -> None:
    cfg, model, *_ = tiny
    directory = _save(tmp_path / "run" / "checkpoint_000001", tiny)
    x = torch.rand(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    for where in (directory, directory / checkpoint.MODEL_FILE, tmp_path / "run"):
        loaded, loaded_cfg = checkpoint.load_model(where)
        assert loaded_cfg.tasks == cfg.tasks and not loaded.training
        with torch.no_grad():
            got = loaded(x)
        for task in cfg.tasks:
            torch.testing.assert_close(got[task], expected[task])


def test_load_model_errors(tmp_path: Path, tiny) -> None:
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load_model(tmp_path / "empty")
    directory = _save(tmp_path / "bad", tiny)
    payload = torch.load(directory / checkpoint.MODEL_FILE, weights_only=True)
    payload["config"]["model"]["embed_dim"] = 24  # weights no longer fit what the config builds
    torch.save(payload, directory / checkpoint.MODEL_FILE)
    with pytest.raises((checkpoint.CheckpointError, RuntimeError)):
        checkpoint.load_model(directory)
    (directory / checkpoint.MODEL_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="weights_only"):
        checkpoint.load_checkpoint(directory)


def test_load_model_from_s3(tmp_path: Path, tiny, s3_server) -> None:
    from mult.data.storage import open_storage

    cfg, model, *_ = tiny
    bucket = s3_server.make_bucket("ckpt-test")
    run = f"{bucket}/runs/r1"
    storage = open_storage(run)
    for name, step, objective in (("checkpoint_a", 5, 0.5), ("checkpoint_b", 9, 0.8)):
        directory = _save(tmp_path / name, tiny, step=step, objective=objective)
        for path in directory.iterdir():
            storage.upload_file(path, f"{name}/{path.name}")
    loaded, loaded_cfg = checkpoint.load_model(run)  # best: checkpoint_a
    assert loaded_cfg.model == cfg.model
    work = tmp_path / "latest"
    work.mkdir()
    chosen = checkpoint.resolve_local(run, work, prefer="latest")
    assert chosen.name == "checkpoint_b" and checkpoint.read_meta(chosen)["step"] == 9
    assert not (chosen / checkpoint.STATE_FILE).exists()  # optimizer state is never fetched
    best = checkpoint.resolve_local(f"{run}/checkpoint_a/model.pt", tmp_path / "one")
    assert checkpoint.read_meta(best)["step"] == 5
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
