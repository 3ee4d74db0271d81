"""Training checkpoints: what is saved, how it is read back, and :func:`load_model`.

A checkpoint is a directory (Ray Train copies it to the run's storage as ``checkpoint_*``):

``model.pt``
    ``{"model": state_dict (unwrapped from DDP), "config": resolved config dict,
    "step": int, "tasks": [...], "format_version": 1}``: all that inference needs.
``train_state.pt``
    ``{"optimizer", "scheduler", "combiner": state dicts, "data_position": {...},
    "rng": [one state per rank], "counters": {...}, "history": [...]}``: what resuming needs.
``meta.json``
    ``{"step", "val_objective", "val_metrics", "delta_m"}``: read without torch to pick the
    best checkpoint of a run.
``config.yaml``
    The resolved config, for people.

Every ``.pt`` file loads with ``torch.load(..., weights_only=True)``: only tensors, numbers,
strings, lists, tuples and dicts are stored (RNG states are converted to tensors).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mult.config import Config, derive, from_dict, save_config

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, META_FILE, CONFIG_FILE)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or incompatible; the message names what and where."""


# --------------------------------------------------------------------------------------------
# RNG state as weights_only-safe data.
# --------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) generator states, as tensors and lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Save / load.
# --------------------------------------------------------------------------------------------
def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    config: Config,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    combiner: nn.Module | None = None,
    data_position: dict[str, Any] | None = None,
    rng: list[dict[str, Any]] | None = None,
    counters: dict[str, int | float] | None = None,
    history: list[dict[str, float]] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory (see the module docstring); returns it."""
    from mult.config import to_dict
    from mult.training.step import unwrap

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": unwrap(model).state_dict(),
            "config": to_dict(config),
            "step": int(step),
            "tasks": list(config.tasks),
            "format_version": FORMAT_VERSION,
        },
        directory / MODEL_FILE,
    )
    state: dict[str, Any] = {
        "step": int(step),
        "data_position": dict(data_position or {}),
        "rng": list(rng or []),
        "counters": dict(counters or {}),
        "history": list(history or []),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if combiner is not None:
        state["combiner"] = combiner.state_dict()
    torch.save(state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps({"step": int(step), **(meta or {})}, default=float))
    save_config(config, directory / CONFIG_FILE)
    return directory


def _torch_load(path: Path, map_location: Any) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that weights_only refuses
        raise CheckpointError(f"cannot load {str(path)!r} with weights_only=True: {exc}") from exc


def load_checkpoint(directory: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a local checkpoint directory: ``model.pt`` merged with ``train_state.pt`` if present."""
    directory = Path(directory)
    payload = _torch_load(directory / MODEL_FILE, map_location)
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {payload.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    if (directory / STATE_FILE).is_file():
        payload["state"] = _torch_load(directory / STATE_FILE, map_location)
    return payload


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def select_checkpoint(run_dir: str | Path, prefer: str = "best") -> Path:
    """Pick a checkpoint directory inside a run directory.

    ``prefer="best"``: the lowest ``val_objective`` in ``meta.json`` (ties: the later step);
    ``"latest"``: the highest step.
    """
    if prefer not in ("best", "latest"):
        raise ValueError(f"prefer: {prefer!r} is not allowed; choose 'best' or 'latest'")
    candidates = [p for p in Path(run_dir).iterdir() if (p / MODEL_FILE).is_file()]
    if not candidates:
        raise CheckpointError(f"no checkpoint (a directory with {MODEL_FILE}) in {str(run_dir)!r}")
    metas = {p: read_meta(p) for p in candidates}

    def step(p: Path) -> int:
        return int(metas[p].get("step", -1))

    if prefer == "latest":
        return max(candidates, key=step)
    scored = [p for p in candidates if isinstance(metas[p].get("val_objective"), (int, float))]
    if not scored:
        return max(candidates, key=step)
    return min(scored, key=lambda p: (metas[p]["val_objective"], -step(p)))


# --------------------------------------------------------------------------------------------
# Remote checkpoints and load_model.
# --------------------------------------------------------------------------------------------
def _fetch_s3(url: str, dest: Path, prefer: str) -> Path:
    """Download the one checkpoint that ``url`` (a checkpoint or run prefix) names into ``dest``.

    Only ``meta.json`` files are read to choose within a run; then that checkpoint's
    ``model.pt``, ``meta.json`` and ``config.yaml`` are fetched (never the optimizer state).
    """
    from mult.data.storage import open_storage

    storage = open_storage(url)
    names = storage.list("")
    dirs = sorted({n.rpartition("/")[0] for n in names if n.rpartition("/")[2] == MODEL_FILE})
    if not dirs:
        raise CheckpointError(f"no checkpoint ({MODEL_FILE}) under {url!r}")
    if "" in dirs:
        chosen = ""
    else:
        for d in dirs:
            meta = f"{d}/{META_FILE}"
            if meta in names:
                storage.download_file(meta, dest / meta)
            else:
                (dest / d).mkdir(parents=True, exist_ok=True)
            # select_checkpoint needs model.pt to exist: a placeholder until the choice is made
            (dest / d / MODEL_FILE).touch()
        chosen = select_checkpoint(dest, prefer).relative_to(dest).as_posix()
    target = dest / chosen if chosen else dest
    for name in (MODEL_FILE, META_FILE, CONFIG_FILE):
        rel = f"{chosen}/{name}" if chosen else name
        if rel in names:
            storage.download_file(rel, target / name)
    return target


def resolve_local(url_or_path: str | Path, workdir: Path, prefer: str = "best") -> Path:
    """A local checkpoint directory for a checkpoint dir, its ``model.pt``, or a run dir.

    Local paths are used in place; ``s3://`` URLs are fetched into ``workdir``.
    """
    text = str(url_or_path)
    if text.startswith("s3://"):
        text = text.rstrip("/")
        if text.endswith("/" + MODEL_FILE):
            text = text[: -len(MODEL_FILE) - 1]
        return _fetch_s3(text, workdir, prefer)
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {text!r} does not exist")
    if path.is_file():
        return path.parent
    if (path / MODEL_FILE).is_file():
        return path
    return select_checkpoint(path, prefer)


def load_model(
    url_or_path: str | Path, map_location: str | torch.device = "cpu", prefer: str = "best"
) -> tuple[nn.Module, Config]:
    """Build MulT from a checkpoint and load its weights; returns ``(model in eval mode, cfg)``.

    ``url_or_path``: a checkpoint directory, its ``model.pt``, or a run directory (then the
    ``prefer``-ed checkpoint: ``"best"`` validation objective or ``"latest"`` step); local paths
    or ``s3://`` URLs (``AWS_ENDPOINT_URL`` honoured).
    """
    from mult.model import build_model

    with tempfile.TemporaryDirectory(prefix="mult-ckpt-") as tmp:
        directory = resolve_local(url_or_path, Path(tmp), prefer)
        payload = _torch_load(directory / MODEL_FILE, map_location)
    cfg = from_dict(payload["config"])
    # The checkpoint holds every weight: rebuilding must not fetch ImageNet weights again
    # (and could not, on a machine without the hub).
    model = build_model(derive(cfg, {"model.pretrained": False, "model.compile": False}))
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{url_or_path}: weights do not fit the model its config builds "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.to(map_location)
    model.eval()
    log.info("loaded %s (step %s, tasks %s)", directory, payload.get("step"), payload.get("tasks"))
    return model, cfg
