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
    checkpoint.mark_complete(directory)  # complete, but its weights no longer fit its config
    with pytest.raises((checkpoint.CheckpointError, RuntimeError)):
        checkpoint.load_model(directory)
    (directory / checkpoint.MODEL_FILE).write_bytes(b"not a checkpoint")
    checkpoint.mark_complete(directory)
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


# --------------------------------------------------------------------------------------------
# Atomic checkpoints: complete.json written last; incomplete ones never chosen; free space.
# --------------------------------------------------------------------------------------------
def _cut(directory: Path, how: str) -> None:
    """Make a checkpoint look cut off: a truncated file, a missing one, or no marker."""
    if how == "truncated":
        state = directory / checkpoint.STATE_FILE
        state.write_bytes(state.read_bytes()[:100])
    elif how == "missing":
        (directory / checkpoint.STATE_FILE).unlink()
    else:
        (directory / checkpoint.COMPLETE_FILE).unlink()


def test_marker_lists_every_file_with_its_size(tmp_path: Path, tiny) -> None:
    directory = _save(tmp_path / "c", tiny)
    listed = json.loads((directory / checkpoint.COMPLETE_FILE).read_text())["files"]
    assert listed == {p.name: p.stat().st_size for p in directory.iterdir() if p.name != checkpoint.COMPLETE_FILE}
    assert checkpoint.load_checkpoint(directory)["step"] == 3


@pytest.mark.parametrize("how", ["truncated", "missing", "no-marker"])
def test_incomplete_checkpoint_is_never_selected(tmp_path: Path, tiny, how: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path / "checkpoint_a", tiny, step=10, objective=0.9)
    newest = _save(tmp_path / "checkpoint_b", tiny, step=20, objective=0.1)  # best and latest, if it were whole
    _cut(newest, how)
    for prefer in ("best", "latest"):
        assert checkpoint.select_checkpoint(tmp_path, prefer).name == "checkpoint_a"
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint_b" in caplog.text
    reason = {"truncated": "train_state.pt has 100 of", "missing": "train_state.pt is missing",
              "no-marker": "no complete.json"}[how]
    assert reason in caplog.text
    if how != "missing":  # (a missing train_state.pt is the restore's own error: "cannot resume")
        with pytest.raises(checkpoint.CheckpointError, match="is incomplete: " + reason):
            checkpoint.load_checkpoint(newest)  # what a restore reads


def test_load_model_refuses_a_named_incomplete_checkpoint_and_falls_back_in_a_run(
        tmp_path: Path, tiny, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _save(run / "checkpoint_a", tiny, step=10)
    newest = _save(run / "checkpoint_b", tiny, step=20)
    (newest / checkpoint.MODEL_FILE).write_bytes((newest / checkpoint.MODEL_FILE).read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match=r"is incomplete: model.pt has 1000 of \d+ bytes; "
                                                         "name its run directory"):
        checkpoint.load_model(newest)
    _, cfg = checkpoint.load_model(run, prefer="latest")  # the run: its newest *complete* checkpoint
    assert cfg.tasks == tiny[0].tasks
    assert "skipping incomplete checkpoint" in caplog.text
    (run / "checkpoint_a" / checkpoint.COMPLETE_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint in .*checkpoint_a .no complete.json"):
        checkpoint.load_model(run)


def test_s3_run_skips_a_checkpoint_cut_off_mid_upload(tmp_path: Path, tiny, s3_server,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from mult.data.storage import open_storage

    bucket = s3_server.make_bucket("ckpt-cut")
    storage = open_storage(f"{bucket}/run")
    for name, step in (("checkpoint_a", 5), ("checkpoint_b", 9)):
        directory = _save(tmp_path / name, tiny, step=step)
        for path in directory.iterdir():
            if not (name == "checkpoint_b" and path.name == checkpoint.STATE_FILE):  # the upload was cut here
                storage.upload_file(path, f"{name}/{path.name}")
    chosen = checkpoint.resolve_local(f"{bucket}/run", tmp_path / "dl", prefer="latest")
    assert chosen.name == "checkpoint_a" and checkpoint.read_meta(chosen)["step"] == 5
    assert "train_state.pt is missing" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint_b' is incomplete: train_state.pt is missing"):
        checkpoint.load_model(f"{bucket}/run/checkpoint_b/model.pt")


def test_resume_skips_runs_whose_checkpoints_are_incomplete(tmp_path: Path, tiny,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from mult.config import load_config
    from mult.training.plan import PreflightError, choose_run_name

    cfg = load_config("configs/cpu-small.yaml", ["train.run_name=exp"])
    _save(tmp_path / "exp-20261101-000000-aaaa" / "checkpoint_1", tiny, step=4)
    _cut(_save(tmp_path / "exp-20261102-000000-bbbb" / "checkpoint_1", tiny, step=4), "missing")
    assert choose_run_name(cfg, str(tmp_path), True) == "exp-20261101-000000-aaaa"
    assert "run exp-20261102-000000-bbbb: skipping incomplete checkpoint checkpoint_1" in caplog.text
    with pytest.raises(PreflightError, match="has no checkpoint"):
        choose_run_name(cfg, str(tmp_path), "exp-20261102-000000-bbbb")


def test_free_space_is_checked_before_writing(tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch,
                                              s3_server) -> None:
    """Only ``shutil.disk_usage`` is mocked: filling a real disk is not an option in a test."""
    import shutil
    from collections import namedtuple

    from mult.data.storage import InsufficientSpaceError, open_storage

    # The estimate from the state dicts covers what torch.save really writes, with little to spare.
    whole = _save(tmp_path / "whole", tiny)
    written = sum((whole / n).stat().st_size for n in (checkpoint.MODEL_FILE, checkpoint.STATE_FILE))
    cfg, model, combiner, optimizer, scheduler = tiny
    estimate = checkpoint.tensor_bytes([model.state_dict(), optimizer.state_dict(), combiner.state_dict()])
    scale, extra = checkpoint.SAVE_OVERHEAD
    assert written <= estimate * scale + extra <= 1.05 * written + extra

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 123_456, 123_456))
    target = tmp_path / "full" / "checkpoint_x"
    with pytest.raises(InsufficientSpaceError, match=rf"{target}'.*need \d+ bytes .* 123456 bytes .* free"):
        _save(target, tiny)
    assert not any(target.iterdir())  # nothing half-written
    s3_server.make_bucket("ckpt-space")
    open_storage("s3://ckpt-space/x").write_bytes("model.pt", b"\0" * 200_000)
    with pytest.raises(InsufficientSpaceError, match="need 200000 bytes"):
        open_storage("s3://ckpt-space/x").download_file("model.pt", tmp_path / "dl" / "model.pt")
    assert not (tmp_path / "dl" / "model.pt").exists()
