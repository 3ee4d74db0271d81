"""MulT: a multitask Swin transformer with shared attention, and the pieces to train it.

``import mult`` stays light: Ray, boto3 and webdataset are imported only by the modules that
need them, and the model (torch, timm) is imported on first use of :func:`build_model`.
"""

from mult.config import Config, ConfigError, load_config
from mult.tasks import TASK_NAMES, TASKS, TaskSpec, get_task

__all__ = ["Config", "ConfigError", "load_config", "build_model", "TASKS", "TASK_NAMES", "TaskSpec", "get_task"]
__version__ = "0.1.0"


def build_model(cfg: Config):
    """Build MulT from a config (see :mod:`mult.model`)."""
    from mult.model import build_model as _build

    return _build(cfg)
