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
``complete.json``
    ``{"format_version": 1, "files": {name: bytes}}``, written last. A checkpoint is
    *complete* when this marker exists and every file it lists exists with exactly that size.
    Ray Train uploads a checkpoint file by file in no fixed order, so the marker alone could
    arrive before ``model.pt``; the sizes make the test independent of the order, and a
    half-copied local file fails it too.

Incomplete checkpoints (a save or an upload cut off: a killed worker, a full disk, a lost
connection) are never used: picking within a run (:func:`select_checkpoint`, ``--resume``,
:func:`load_model` on a run) skips them with a warning that says why, and naming one directly is
a :class:`CheckpointError`. Before writing, :func:`save_checkpoint` checks that the disk has room
for what the state dicts hold (:class:`~mult.data.storage.InsufficientSpaceError` names the
directory, the need and the free bytes). Remote checkpoints are read through
:mod:`mult.data.storage`: retried within ``data.storage_retry_s``, downloads resumed at the byte.

Every ``.pt`` file loads with ``torch.load(..., weights_only=True)``: only tensors, numbers,
strings, lists, tuples and dicts are stored (RNG states are converted to tensors).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mult.config import Config, derive, from_dict, save_config

if TYPE_CHECKING:
    from mult.data.retry import RetryPolicy
    from mult.data.storage import Storage

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
COMPLETE_FILE = "complete.json"
FORMAT_VERSION = 1
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, META_FILE, CONFIG_FILE, COMPLETE_FILE)
# torch.save's zip framing and pickled structure on top of the tensor bytes, plus meta and config
SAVE_OVERHEAD = (1.01, 4 * 2**20)


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
    """Write a checkpoint directory (see the module docstring), ``complete.json`` last; returns it.

    Raises :class:`~mult.data.storage.InsufficientSpaceError` before writing anything when the
    disk lacks room for the state dicts.
    """
    from mult.config import to_dict
    from mult.data.storage import ensure_free_space
    from mult.training.step import unwrap

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / COMPLETE_FILE).unlink(missing_ok=True)  # an overwrite is incomplete until it ends
    payload = {
        "model": unwrap(model).state_dict(),
        "config": to_dict(config),
        "step": int(step),
        "tasks": list(config.tasks),
        "format_version": FORMAT_VERSION,
    }
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
    scale, extra = SAVE_OVERHEAD
    need = int(tensor_bytes([payload, state]) * scale) + extra
    ensure_free_space(directory, need, f"the checkpoint of step {step}")
    torch.save(payload, directory / MODEL_FILE)
    torch.save(state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps({"step": int(step), **(meta or {})}, default=float))
    save_config(config, directory / CONFIG_FILE)
    mark_complete(directory)
    return directory


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensor storages in nested dicts, lists and tuples (each storage once): what
    ``torch.save`` will write, less its framing."""
    seen: set[tuple[int, str]] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (storage.data_ptr(), str(item.device))
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def mark_complete(directory: str | Path) -> None:
    """Write ``complete.json`` for the files in ``directory`` (atomically, as every local
    storage write: a temporary name, then a rename). Call it only once every other file is whole."""
    directory = Path(directory)
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())
             if p.is_file() and p.name != COMPLETE_FILE and not p.name.startswith(".")}
    from mult.data.storage import LocalStorage

    LocalStorage(directory).write_bytes(
        COMPLETE_FILE, json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1).encode())


def why_incomplete(files: dict[str, int], marker: bytes | None, names: tuple[str, ...] | None = None) -> str | None:
    """Why a checkpoint whose directory holds ``files`` (name -> bytes) and whose
    ``complete.json`` reads ``marker`` is incomplete, or None when it is complete.

    ``names``: check only these of the listed files (a partial download holds only what it fetched).
    """
    if marker is None:
        return f"no {COMPLETE_FILE} (it is written last: the save or upload was cut off)"
    try:
        listed = json.loads(marker)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE_FILE} is unreadable (cut off while it was written)"
    for name, size in listed.items():
        if names is not None and name not in names:
            continue
        if name not in files:
            return f"{name} is missing ({size} bytes expected)"
        if files[name] != size:
            return f"{name} has {files[name]} of {size} bytes"
    return None


def _torch_load(path: Path, map_location: Any) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that weights_only refuses
        raise CheckpointError(f"cannot load {str(path)!r} with weights_only=True: {exc}") from exc


def load_checkpoint(directory: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a local checkpoint directory: ``model.pt`` merged with ``train_state.pt`` if present.

    Raises :class:`CheckpointError` when the checkpoint is incomplete (see the module docstring).
    """
    directory = Path(directory)
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()} if directory.is_dir() else {}
    marker = (directory / COMPLETE_FILE).read_bytes() if COMPLETE_FILE in files else None
    present = tuple(n for n in (MODEL_FILE, STATE_FILE) if n in files) or (MODEL_FILE,)
    reason = why_incomplete(files, marker, present)
    if reason:
        raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete: {reason}")
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
    """Pick a complete checkpoint directory inside a local run directory (incomplete ones are
    skipped with a warning).

    ``prefer="best"``: the lowest ``val_objective`` in ``meta.json`` (ties: the later step);
    ``"latest"``: the highest step.
    """
    from mult.data.storage import LocalStorage

    storage = LocalStorage(run_dir)
    listing = {d: files for d, files in _listing(storage).items() if d}
    return Path(storage.url(_choose(storage, listing, prefer, str(run_dir))))


# --------------------------------------------------------------------------------------------
# Finding complete checkpoints, local or remote, and load_model.
# --------------------------------------------------------------------------------------------
def _listing(storage: "Storage") -> dict[str, dict[str, int]]:
    """``{checkpoint dir ("" for the root itself): {file: bytes}}`` for every directory at most
    one level down that holds a checkpoint file."""
    out: dict[str, dict[str, int]] = {}
    for rel, size in storage.sizes("").items():
        parent, _, name = rel.rpartition("/")
        if "/" not in parent and name in CHECKPOINT_FILES:
            out.setdefault(parent, {})[name] = size
    return out


def _why(storage: "Storage", directory: str, files: dict[str, int]) -> str | None:
    marker = None
    if COMPLETE_FILE in files:
        marker = storage.read_bytes(f"{directory}/{COMPLETE_FILE}" if directory else COMPLETE_FILE)
    return why_incomplete(files, marker)


def scan_checkpoints(url: str, retry: "RetryPolicy | None" = None) -> tuple[list[str], dict[str, str]]:
    """The complete checkpoint directories of a run (local or ``s3://``), and the incomplete
    ones with the reason; names relative to ``url``."""
    from mult.data.storage import open_storage

    storage = open_storage(url, retry=retry)
    complete, incomplete = [], {}
    for directory, files in sorted(_listing(storage).items()):
        reason = _why(storage, directory, files)
        if reason is None:
            complete.append(directory)
        else:
            incomplete[directory] = reason
    return complete, incomplete


def _choose(storage: "Storage", listing: dict[str, dict[str, int]], prefer: str, where: str) -> str:
    """The ``prefer``-ed complete checkpoint among ``listing``; warns about each incomplete one."""
    if prefer not in ("best", "latest"):
        raise ValueError(f"prefer: {prefer!r} is not allowed; choose 'best' or 'latest'")
    if not listing:
        raise CheckpointError(f"no checkpoint (a directory with {MODEL_FILE}) in {where!r}")
    complete = []
    skipped = {}
    for directory, files in sorted(listing.items()):
        reason = _why(storage, directory, files)
        if reason is None:
            complete.append(directory)
        else:
            skipped[directory] = reason
            log.warning("skipping incomplete checkpoint %s: %s", storage.url(directory), reason)
    if not complete:
        raise CheckpointError(f"no complete checkpoint in {where!r}; incomplete: "
                              + "; ".join(f"{d} ({why})" for d, why in skipped.items()))
    metas = {}
    for directory in complete:
        files = listing[directory]
        metas[directory] = json.loads(storage.read_bytes(f"{directory}/{META_FILE}")) if META_FILE in files else {}

    def step(d: str) -> int:
        return int(metas[d].get("step", -1))

    if prefer == "latest":
        return max(complete, key=step)
    scored = [d for d in complete if isinstance(metas[d].get("val_objective"), (int, float))]
    if not scored:
        return max(complete, key=step)
    return min(scored, key=lambda d: (metas[d]["val_objective"], -step(d)))


def resolve_local(url_or_path: str | Path, workdir: Path, prefer: str = "best",
                  retry: "RetryPolicy | None" = None) -> Path:
    """A local, complete checkpoint directory for a checkpoint dir, its ``model.pt``, or a run dir.

    Local paths are used in place; from ``s3://`` URLs the chosen checkpoint's ``model.pt``,
    ``meta.json``, ``config.yaml`` and ``complete.json`` are fetched into ``workdir`` (never
    the optimizer state; only ``meta.json`` files are read to choose within a run). Within a
    run, incomplete checkpoints are skipped with a warning; a checkpoint named directly that is
    incomplete is a :class:`CheckpointError`.
    """
    from mult.data.storage import open_storage

    text = str(url_or_path).rstrip("/")
    remote = text.startswith("s3://")
    if remote and text.endswith("/" + MODEL_FILE):
        text = text[: -len(MODEL_FILE) - 1]
    if not remote:
        path = Path(text).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint path {text!r} does not exist")
        text = str(path.parent if path.is_file() else path)
    storage = open_storage(text, retry=retry)
    listing = _listing(storage)
    if "" in listing:  # a checkpoint, named directly
        chosen = ""
        reason = _why(storage, "", listing[""])
        if reason:
            raise CheckpointError(f"checkpoint {text!r} is incomplete: {reason}; name its run directory "
                                  "to use the newest complete checkpoint instead")
    else:
        chosen = _choose(storage, listing, prefer, text)
    if not remote:
        return Path(storage.url(chosen)) if chosen else Path(text)
    target = workdir / chosen if chosen else workdir
    for name in (MODEL_FILE, META_FILE, CONFIG_FILE, COMPLETE_FILE):
        if name in listing[chosen]:
            storage.download_file(f"{chosen}/{name}" if chosen else name, target / name)
    return target


def load_model(
    url_or_path: str | Path, map_location: str | torch.device = "cpu", prefer: str = "best",
    retry: "RetryPolicy | None" = None,
) -> tuple[nn.Module, Config]:
    """Build MulT from a checkpoint and load its weights; returns ``(model in eval mode, cfg)``.

    ``url_or_path``: a checkpoint directory, its ``model.pt``, or a run directory (then the
    ``prefer``-ed *complete* checkpoint: ``"best"`` validation objective or ``"latest"`` step;
    incomplete ones are skipped with a warning); local paths or ``s3://`` URLs
    (``AWS_ENDPOINT_URL`` honoured; ``retry`` bounds how long storage may keep failing). A
    checkpoint named directly that is incomplete raises :class:`CheckpointError`: loading some
    other checkpoint instead would be a surprise.
    """
    from mult.model import build_model

    with tempfile.TemporaryDirectory(prefix="mult-ckpt-") as tmp:
        directory = resolve_local(url_or_path, Path(tmp), prefer, retry)
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
