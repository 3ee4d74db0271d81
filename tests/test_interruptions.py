"""Non-finite steps decided by every rank, and SIGTERM turned into a checkpoint at a step boundary.

The DDP tests run two real gloo ranks (``torch.multiprocessing``), no Ray; the Ray Train path
(the handler installed in the worker actors' main threads) is tested in ``test_train.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mult.config import load_config
from mult.losses import NonFiniteLossError
from mult.training import interrupts
from mult.training.nonfinite import RECORD, NonFiniteGuard, warn_if_replaying
from mult.training.step import StepResult, train_step
from mult.weighting import LossCombiner
from test_step import TASKS, TinyNet, make_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_stale_stop():
    interrupts.clear_stop()
    yield
    interrupts.clear_stop()


def _one_step(model, batch, *, on_nonfinite="skip", stop=False):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_step(model, LossCombiner(TASKS), optimizer, None, iter([batch]), tasks=TASKS, accumulation=1,
                      grad_clip=1.0, device=torch.device("cpu"), on_nonfinite=on_nonfinite, stop_requested=stop)


def _poisoned(seed: int) -> dict:
    batch = make_batch(2, seed=seed)
    batch["rgb"][0, 0, 0, 0] = float("nan")  # what a corrupt decode or an overflow upstream gives
    batch["key"] = [f"scene/view{seed}-{i}" for i in range(2)]
    return batch


# ---------------------------------------------------------------------------------------------
# One process.
# ---------------------------------------------------------------------------------------------
def test_nonfinite_step_is_skipped_without_touching_the_weights():
    torch.manual_seed(0)
    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    result = _one_step(model, _poisoned(1))
    assert result.skipped and result.nonfinite_ranks == 1
    assert "depth_zbuffer=nan" in result.problem and "normal=nan" in result.problem and "scene/view1-0" in result.problem
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    clean = _one_step(model, make_batch(2, seed=2))
    assert not clean.skipped and any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_nonfinite_step_raises_by_default_naming_every_task():
    with pytest.raises(NonFiniteLossError, match="depth_zbuffer=nan") as info:
        _one_step(TinyNet(), _poisoned(3), on_nonfinite="raise")
    for task in TASKS:
        assert f"{task}=" in str(info.value)


def test_nonfinite_gradient_with_finite_losses_is_skipped():
    model = TinyNet()

    def blow_up(grad):
        return grad * float("inf")

    next(model.parameters()).register_hook(blow_up)
    result = _one_step(model, make_batch(2, seed=4))
    assert result.skipped and result.nonfinite_ranks == 0 and "gradient norm" in result.problem


def _result(skipped: bool) -> StepResult:
    problem = "total=nan; normal=nan (weight 1); samples ['a/b']" if skipped else ""
    return StepResult(float("nan") if skipped else 1.0, {"normal": 1.0}, 1.0, 0.1, 2, skipped=skipped,
                      nonfinite_ranks=int(skipped), problem=problem)


def test_guard_skips_up_to_the_limit_in_a_row_then_fails_and_records(tmp_path, caplog):
    guard = NonFiniteGuard("skip", 2, rank=0, world=1, run_url=str(tmp_path))
    where = dict(epoch=3, micro_batch=40, accumulation=4)
    assert guard.check(_result(True), step=7, **where) is True
    assert guard.check(_result(False), step=7, **where) is False  # a finite step resets the count
    assert guard.check(_result(True), step=8, **where) is True
    assert guard.check(_result(True), step=8, **where) is True
    with pytest.raises(NonFiniteLossError) as info:
        guard.check(_result(True), step=8, **where)
    message = str(info.value)
    for part in ("step 8", "epoch 3", "micro-batches 40-43", "3 such step(s) in a row", "normal=nan", "'a/b'",
                 "train.max_nonfinite_steps=2"):
        assert part in message, part
    record = json.loads((tmp_path / RECORD).read_text())
    assert (record["step"], record["epoch"], record["micro_batch"]) == (8, 3, 40)
    with caplog.at_level(logging.ERROR, logger="mult.training.nonfinite"):
        assert warn_if_replaying(str(tmp_path), step=6, epoch=3, micro_batch=24) is not None
    assert "replay" in caplog.text and "step 8" in caplog.text
    assert warn_if_replaying(str(tmp_path), step=9, epoch=3, micro_batch=44) is None  # already past it


def test_guard_fail_policy_stops_at_the_first():
    guard = NonFiniteGuard("fail", 5, rank=0, world=1, run_url=None)
    with pytest.raises(NonFiniteLossError, match="train.nonfinite=fail"):
        guard.check(_result(True), step=1, epoch=0, micro_batch=0, accumulation=1)


def test_config_refuses_bad_nonfinite_settings():
    from mult.config import ConfigError

    with pytest.raises(ConfigError, match="nonfinite"):
        load_config(REPO / "configs" / "cpu-small.yaml", ["train.nonfinite=ignore"])
    with pytest.raises(ConfigError, match="max_nonfinite_steps"):
        load_config(REPO / "configs" / "cpu-small.yaml", ["train.max_nonfinite_steps=0"])


# ---------------------------------------------------------------------------------------------
# Two DDP ranks (gloo): one rank's NaN, one rank's SIGTERM.
# ---------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(TinyNet())
        before = [p.detach().clone() for p in model.parameters()]
        # step 1: only rank 1's batch holds a NaN target
        poisoned = _one_step(model, _poisoned(10) if rank == 1 else make_batch(2, seed=10 + rank))
        after_skip = [p.detach().clone() for p in model.parameters()]
        # step 2: clean everywhere; only rank 1 asks to stop
        clean = _one_step(model, make_batch(2, seed=20 + rank), stop=rank == 1)
        torch.save({
            "skipped": poisoned.skipped, "nonfinite_ranks": poisoned.nonfinite_ranks,
            "unchanged": all(torch.equal(p, q) for p, q in zip(after_skip, before)),
            "clean_skipped": clean.skipped, "stop": clean.stop,
            "params": [p.detach() for p in model.parameters()],
        }, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_nan_on_one_rank_is_skipped_on_every_rank_and_a_stop_reaches_all(tmp_path):
    """Before, the rank with the NaN raised alone and the other waited in DDP's all-reduce."""
    from mult.launch.local import free_port

    ctx = mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    for _ in range(240):  # bounded: a hang (the old behaviour) fails here instead of blocking the suite
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("DDP ranks did not finish: a rank is stuck in a collective")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["skipped"] and r["nonfinite_ranks"] == 1 and r["unchanged"]
        assert not r["clean_skipped"] and r["stop"]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The SIGTERM handler.
# ---------------------------------------------------------------------------------------------
def test_first_sigterm_asks_to_stop_and_the_second_goes_to_the_previous_handler():
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with interrupts.stop_on_signal():
            assert interrupts.stop_handler_installed()
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs in this (main) thread at the next bytecode
                if interrupts.stop_requested():
                    break
            assert interrupts.stop_requested() and interrupts.stop_reason() == "SIGTERM" and seen == []
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                if seen:
                    break
            assert seen == [signal.SIGTERM]
        assert not interrupts.stop_handler_installed()  # put back on exit
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_handler_cannot_be_installed_off_the_main_thread():
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(interrupts.install_stop_handler()))
    thread.start()
    thread.join()
    assert results == [False] and not interrupts.stop_handler_installed()


# ---------------------------------------------------------------------------------------------
# The training loop, one process: a poisoned step is skipped; SIGTERM checkpoints and resumes.
# ---------------------------------------------------------------------------------------------
class _KeepCheckpoints:
    """A hook that copies every checkpoint the loop hands over (LocalSession keeps none)."""

    def __init__(self, into: Path) -> None:
        self.into = into
        self.steps: list[int] = []

    def before_step(self, step):
        pass

    def before_report(self, metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            step = int(metrics["step"])
            shutil.copytree(checkpoint_dir, self.into / f"step{step}")
            self.steps.append(step)

    def after_report(self, metrics, seconds):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> tuple[str, str]:
    from mult.data.smoke import make_smoke_dataset

    return make_smoke_dataset(str(tmp_path_factory.mktemp("shards")), size=32, seed=5)


def _loop_cfg(shards, *extra: str):
    train_url, val_url = shards
    return load_config(REPO / "configs" / "cpu-small.yaml", [
        "tasks=[normal,depth_zbuffer]", "model.img_size=32", "model.embed_dim=12", "model.num_heads=[1,1,1,1]",
        "data.num_workers=0", "scaling.num_workers=1", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.log_every=1", "train.val_every=100", "train.checkpoint_every=100", "train.precision=fp32",
        f"data.train={train_url}", f"data.val={val_url}", "train.val_batches=1", *extra])


def test_loop_skips_a_poisoned_step_and_goes_on(tmp_path, local_shards):
    from mult.training.loop import LoopOptions, train_loop
    from mult.training.session import LocalSession

    cfg = _loop_cfg(local_shards, "train.max_steps=4")
    opts = LoopOptions(local_dir=tmp_path, telemetry=False, fault_at_step=1, fault_kind="nan")
    metrics = train_loop(cfg, LocalSession(), opts)
    assert metrics["step"] == 4 and metrics["nonfinite_steps_total"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("loss/"))


def test_sigterm_checkpoints_at_the_next_step_and_resumes_there(tmp_path, local_shards):
    from mult.training.interrupts import Preempted
    from mult.training.loop import LoopOptions, train_loop
    from mult.training.session import LocalSession

    cfg = _loop_cfg(local_shards, "train.max_steps=5")
    keep = _KeepCheckpoints(tmp_path / "kept")
    opts = LoopOptions(local_dir=tmp_path, telemetry=False, fault_at_step=2, fault_kind="sigterm")
    with pytest.raises(Preempted, match="stopped at step 3 after SIGTERM"):
        train_loop(cfg, LocalSession(), opts, hooks=[keep])
    assert keep.steps == [3]  # the step in flight when the signal came finished and was saved: none lost
    interrupts.clear_stop()
    resumed = train_loop(cfg, LocalSession(resume_from=tmp_path / "kept" / "step3"),
                         LoopOptions(local_dir=tmp_path, telemetry=False), hooks=[keep])
    assert resumed["resumed_from_step"] == 3 and resumed["step"] == 5
    assert signal.getsignal(signal.SIGTERM) is not interrupts._on_signal  # the loop put the old one back


# ---------------------------------------------------------------------------------------------
# The node side: a pod's preStop and EC2's spot notice.
# ---------------------------------------------------------------------------------------------
_CHILD = r"""
import signal, sys, time
def on_term(signum, frame):
    open(sys.argv[1], "w").write("checkpointed")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
for _ in range(600):
    time.sleep(0.1)
"""


def test_stop_training_sigterms_the_node_train_workers_and_waits_for_them(tmp_path):
    import subprocess
    import sys
    import uuid

    from mult.launch.preemption import stop_training, train_worker_pids

    title = f"mult-test-worker-{uuid.uuid4().hex[:8]}"  # not Ray's title: never touch a real worker
    # argv[0] is the title, as Ray's core worker sets it (``ray::RayTrainWorker``)
    worker = subprocess.Popen([f"{title}::RayTrainWorker", "-c", _CHILD, str(tmp_path / "w")],
                              executable=sys.executable, stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen(["mult-test-other", "-c", _CHILD, str(tmp_path / "b")],
                                 executable=sys.executable, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready" and bystander.stdout.readline().strip() == "ready"
        assert train_worker_pids(title) == [worker.pid]
        assert stop_training(wait_s=60, title=title, drain=False, stop_ray=False) == 0
        assert worker.wait(timeout=60) == 0 and (tmp_path / "w").read_text() == "checkpointed"
        assert bystander.poll() is None and not (tmp_path / "b").exists()
    finally:
        for proc in (worker, bystander):
            proc.kill()
            proc.wait()


class _Imds:
    """IMDSv2 on 127.0.0.1: a token for a PUT, then the spot notice from the ``notice_after``-th poll."""

    def __init__(self, notice_after: int) -> None:
        import http.server

        imds = self
        self.polls = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):
                body = b"token-1"
                self.send_response(200 if self.path == "/latest/api/token" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                ok = self.headers.get("X-aws-ec2-metadata-token") == "token-1"
                imds.polls += 1
                if not ok or self.path != "/latest/meta-data/spot/instance-action" or imds.polls < notice_after:
                    self.send_response(401 if not ok else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"action": "terminate", "time": "2026-12-01T17:00:00Z"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_spot_notice_triggers_the_stop_once():
    from mult.launch.preemption import watch_spot

    imds = _Imds(notice_after=3)
    try:
        notices: list[dict] = []
        assert watch_spot(notices.append, base=imds.url, interval_s=0.01, max_polls=20)
        assert notices == [{"action": "terminate", "time": "2026-12-01T17:00:00Z"}] and imds.polls == 3
        quiet = _Imds(notice_after=10**6)
        try:
            assert not watch_spot(notices.append, base=quiet.url, interval_s=0.01, max_polls=3)
        finally:
            quiet.close()
        assert len(notices) == 1
    finally:
        imds.close()
