"""MulT: a multitask Swin transformer with shared attention, and the pieces to train it.

The package is layered; each layer imports only from the ones before it:

* core: :mod:`~mult.config`, :mod:`~mult.tasks` (the task table) and what it names
  (:mod:`~mult.encodings`, :mod:`~mult.losses`, :mod:`~mult.accumulators`, :mod:`~mult.drawing`),
  :mod:`~mult.weighting`, :mod:`~mult.metrics`, :mod:`~mult.outputs`;
* :mod:`mult.model`: the encoder, shared attention, decoders, heads, ``build_model``;
* :mod:`mult.data`: storage, the dataset table, readers, generators, shards, the loader;
* :mod:`mult.training`: the optimiser, one step, one evaluation loop, the loop, checkpoints;
* :mod:`mult.experiments`: search, ablation, baselines, transfer, prediction, reports;
* :mod:`mult.launch`: Ray (Train, Tune, tasks), local services, the demo chain.

Nothing outside :mod:`mult.launch` imports Ray.
"""

from mult.config import Config, ConfigError, load_config
from mult.tasks import TASK_NAMES, TASKS, TaskSpec, get_task

__all__ = ["Config", "ConfigError", "load_config", "TASKS", "TASK_NAMES", "TaskSpec", "get_task"]
__version__ = "0.1.0"
