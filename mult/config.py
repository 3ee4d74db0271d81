"""Typed experiment configs: dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Unknown keys and wrong types are refused with a :class:`ConfigError` that names the key and
what is allowed, so a typo never silently falls back to a default. The resolved config is a
plain dict (``to_dict``) that is saved with every run and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from mult.tasks import TASK_NAMES, TASKS


# MulT's shared-attention modes (see mult.model.decoder): the paper's, the released code's
# (DEA4), a variant from the encoder skip alone, and the ablation without sharing.
SHARED_ATTENTION_MODES: tuple[str, ...] = ("reference", "official", "encoder", "none")

_SCIENTIFIC = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what is allowed."""


@dataclass
class ModelConfig:
    encoder: str = "swin_tiny_patch4_window7_224"  # any timm Swin name
    pretrained: bool = False
    pretrained_path: str | None = None  # a local timm checkpoint, for machines without a hub
    img_size: int = 256  # the one image size: model input, loader output, shard --resize
    window_size: int = 8
    embed_dim: int | None = None  # override the encoder width (tiny test models)
    depths: list[int] | None = None  # override the encoder's blocks per stage
    num_heads: list[int] | None = None
    decoder_depth: int = 2  # Swin blocks per decoder stage (window, shifted window)
    decoder_heads: list[int] | None = None  # per decoder stage, deepest first
    head_channels: int | None = None  # hidden width of the task heads (default: max(16, C0 / 4))
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    # "patch": Swin's 4x4 patch projection (the paper). "conv": a small conv stem in its place
    # (3x3 convs with batch norm; Xiao et al. 2021), for training from scratch on little data
    # (the CPU configs; measured in BENCHMARKS.md "Learning"). It replaces pretrained weights'
    # patch projection, so it needs pretrained: false.
    stem: Literal["patch", "conv"] = "patch"
    shared_attention: Literal[SHARED_ATTENTION_MODES] = "reference"  # type: ignore[valid-type]
    reference_task: str = "normal"
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class DataConfig:
    train: str | None = None  # shard URL (directory or s3://bucket/prefix) with manifest.json
    val: str | None = None
    num_workers: int = 2  # loader processes per rank
    shuffle_buffer: int = 256
    steps_per_epoch: int | None = None  # optimizer steps; default: samples in manifest / global batch
    bad_sample_policy: Literal["skip", "fail"] = "skip"
    hflip: bool = True
    # Storage that keeps failing (throttling, 5xx, credentials, timeouts, resets) is retried with
    # back-off for up to this many seconds per object (a shard, a checkpoint file), then the run
    # fails and Ray restarts it (train.max_failures); never counted as bad samples.
    storage_retry_s: float = 300.0
    storage_timeout_s: float = 60.0  # connect/read timeout of one storage request


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 500
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    global_batch_size: int = 32
    micro_batch_size: int = 1  # per worker per step; accumulation reaches the global batch
    max_steps: int = 100_000
    val_every: int = 1000
    val_batches: int | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast applies on GPU only
    seed: int = 0
    storage_path: str = "runs"  # local directory or s3://bucket/prefix
    run_name: str = "mult"
    baselines: str | None = None  # JSON of single-task baseline metrics, for delta-m
    max_failures: int = 3
    log_every: int = 10  # optimizer steps between metric reports (each report is a barrier)
    # a step whose loss or gradient is NaN/inf on any rank: "skip" it on every rank (counted,
    # and the run fails after max_nonfinite_steps such steps in a row) or "fail" at once
    nonfinite: Literal["skip", "fail"] = "skip"
    max_nonfinite_steps: int = 5

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step so that the global batch is reached."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size < per_step or self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a positive multiple of "
                f"micro_batch_size x world size ({self.micro_batch_size} x {world_size})"
            )
        return self.global_batch_size // per_step


@dataclass
class LossConfig:
    weighting: Literal["fixed", "uncertainty", "dwa"] = "fixed"
    dwa_temperature: float = 2.0
    # what an L1 loss divides by: "valid" pixels (default), or "all" pixels (the Taskonomy
    # task-grouping code: masked pixels count as zero error); see mult.losses
    normalize: Literal["valid", "all"] = "valid"


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # how long the training stage waits for the workers to be placed before it fails naming
    # what it could not get (an autoscaler adding GPU nodes takes minutes)
    placement_timeout_s: float = 900.0


@dataclass
class TuneConfig:
    num_samples: int = 16
    max_concurrent_trials: int = 1
    search: Literal["optuna", "random"] = "optuna"
    weight_range: list[float] = field(default_factory=lambda: [0.1, 10.0])
    fixed_task: str | None = None  # this task's weight stays 1.0 (the reference)
    grace_period: int = 1  # ASHA: validations before a trial may be stopped
    reduction_factor: int = 2
    trial_driver_cpus: float = 0.01
    trial_num_workers: int | None = None  # default: scaling.num_workers
    extra_arms: list[str] = field(default_factory=list)  # "uncertainty", "dwa"
    experiment_path: str = "tune"
    # per-task [low, high] that replace weight_range for those tasks (searched tasks only)
    weight_ranges: dict[str, list[float]] = field(default_factory=dict)
    # cap max_concurrent_trials at what the cluster's current CPUs/GPUs hold (off on autoscalers)
    limit_concurrency_to_cluster: bool = True


@dataclass
class MetricsConfig:
    # the address rank 0 serves metrics on; "node-ip": this node's private address (what a
    # Prometheus inside the cluster scrapes; never 0.0.0.0 on a cluster reachable from outside)
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int | None = None  # None: no endpoint; 0: pick a free port
    pushgateway: str | None = None
    tensorboard: bool = True
    # where rank 0 writes TensorBoard events, the loss curve and the metrics address when
    # train.storage_path is on S3 (they are uploaded to the run's storage as well);
    # None: ~/.cache/mult/runs. With local storage they go in the run directory itself.
    local_dir: str | None = None


@dataclass
class Config:
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    loss_weights: dict[str, float] = field(default_factory=dict)  # missing tasks: default weight
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def weight(self, task: str) -> float:
        return self.loss_weights.get(task, TASKS[task].default_weight)


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping ({_type_name(tp)}), got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


# Keys that moved: an old config gets the new name instead of a bare "unknown key".
MOVED_KEYS = {"data.image_size": "model.img_size"}


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    if prefix + name in MOVED_KEYS:
        return ConfigError(f"config key {prefix + name!r} is now {MOVED_KEYS[prefix + name]!r}; rename it")
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {prefix + name!r}{hint}; valid keys: {', '.join(valid)}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            raise _unknown_key(cls, name, prefix)
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON-safe data."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cls: type = Config
    node = data
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise _unknown_key(cls, part, ".".join(parts[:i]) + ("." if i else ""))
        tp = hints[part]
        last = i == len(parts) - 1
        if last:
            node[part] = value
            return
        if typing.get_origin(tp) is dict:  # loss_weights.normal=2
            node.setdefault(part, {})
            node[part][".".join(parts[i + 1 :])] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section; it has no key {parts[i + 1]!r}")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} must be a mapping")
        cls = tp


def derive(cfg: Config, changes: Mapping[str, Any]) -> Config:
    """A new, validated config: ``cfg`` with dotted keys replaced, e.g.
    ``derive(cfg, {"train.max_steps": 4, "data.train": url, "loss_weights": {...}})``.

    Keys and values are checked exactly as command-line overrides are (unknown keys and wrong
    types raise :class:`ConfigError`); ``cfg`` itself is not changed.
    """
    dotted: dict[str, Any] = {}
    for key, value in changes.items():
        _set_dotted(dotted, key, value)
    return from_dict(_merge(to_dict(cfg), dotted))


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.max_steps=10"`` -> ``("train.max_steps", 10)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.max_steps=10)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    if isinstance(value, str):
        # YAML 1.1 reads "3e-3" (no dot) as a string; on the command line it means a number.
        try:
            value = float(value) if _SCIENTIFIC.fullmatch(value) else value
        except ValueError:
            pass
    return key.strip(), value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "loss_weights":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from plain data (e.g. one saved in a checkpoint)."""
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML; ``None`` = all defaults) and apply dotted ``key=value`` overrides.

    An override may also be ``@file.yaml``: that file's keys are merged in (Tune writes its
    best weights as such a file).
    """
    data = _read_yaml(path) if path is not None else {}
    dotted: dict[str, Any] = {}
    for text in overrides or []:
        if text.startswith("@"):
            data = _merge(data, _read_yaml(text[1:]))
            continue
        key, value = parse_override(text)
        _set_dotted(dotted, key, value)
    data = _merge(data, dotted)
    return from_dict(data)


def validate(cfg: Config) -> None:
    """Cross-field checks that a type system cannot express."""
    if not cfg.tasks:
        raise ConfigError("tasks: at least one task is required")
    for task in cfg.tasks:
        if task not in TASKS:
            raise ConfigError(f"tasks: unknown task {task!r}; valid tasks: {', '.join(TASK_NAMES)}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise ConfigError(f"tasks: duplicates in {cfg.tasks}")
    for task, weight in cfg.loss_weights.items():
        if task not in cfg.tasks:
            raise ConfigError(
                f"loss_weights.{task}: not one of the configured tasks ({', '.join(cfg.tasks)})"
            )
        if not weight >= 0.0 or weight == float("inf"):
            raise ConfigError(f"loss_weights.{task}: weights must be finite and >= 0, got {weight}")
    m = cfg.model
    if m.shared_attention in ("reference", "official") and m.reference_task not in cfg.tasks:
        raise ConfigError(
            f"model.reference_task: {m.reference_task!r} is not among tasks ({', '.join(cfg.tasks)}); "
            "pick one of them or set model.shared_attention to 'encoder' or 'none'"
        )
    if m.stem == "conv" and m.pretrained:
        raise ConfigError("model.stem: 'conv' replaces the pretrained patch projection; "
                          "use stem 'patch' with pretrained: true, or pretrained: false")
    if m.img_size % 32 or m.img_size < 32:
        raise ConfigError(f"model.img_size: must be a positive multiple of 32, got {m.img_size}")
    t = cfg.train
    per_step = t.micro_batch_size * cfg.scaling.num_workers
    for key, value in (
        ("train.global_batch_size", t.global_batch_size),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.max_steps", t.max_steps),
        ("train.val_every", t.val_every),
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.log_every", t.log_every),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps),
        ("scaling.num_workers", cfg.scaling.num_workers),
    ):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"micro_batch_size x num_workers ({t.micro_batch_size} x {cfg.scaling.num_workers})"
        )
    if not cfg.scaling.placement_timeout_s > 0:
        raise ConfigError(f"scaling.placement_timeout_s: must be > 0, got {cfg.scaling.placement_timeout_s}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    for key, value in (("data.storage_retry_s", cfg.data.storage_retry_s),
                       ("data.storage_timeout_s", cfg.data.storage_timeout_s)):
        if not 0 < value < float("inf"):
            raise ConfigError(f"{key}: must be a finite number of seconds > 0, got {value}")
    lo_hi = cfg.tune.weight_range
    if len(lo_hi) != 2 or not 0 < lo_hi[0] < lo_hi[1]:
        raise ConfigError(f"tune.weight_range: need [low, high] with 0 < low < high, got {lo_hi}")
    for arm in cfg.tune.extra_arms:
        if arm not in ("uncertainty", "dwa"):
            raise ConfigError(f"tune.extra_arms: {arm!r} is not allowed; choose from ['uncertainty', 'dwa']")


def validate_tune(cfg: Config) -> None:
    """Checks that only matter for a search (a training run ignores the tune section)."""
    if cfg.tune.fixed_task is not None and cfg.tune.fixed_task not in cfg.tasks:
        raise ConfigError(
            f"tune.fixed_task: {cfg.tune.fixed_task!r} is not among tasks ({', '.join(cfg.tasks)})"
        )
    searched = [t for t in cfg.tasks if t != cfg.tune.fixed_task]
    if not searched:
        raise ConfigError("tune: nothing to search; every task's weight is fixed")
    if cfg.tune.num_samples < 1 or cfg.tune.max_concurrent_trials < 1:
        raise ConfigError("tune.num_samples and tune.max_concurrent_trials must be >= 1")


def add_config_arguments(parser: Any, example: str = "train.max_steps=10") -> None:
    """The arguments every stage takes: ``--config PATH`` and dotted ``key=value`` overrides
    (an ``argparse.ArgumentParser``'s; :func:`load_config` reads them)."""
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}, or @file.yaml")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
