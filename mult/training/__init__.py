"""Training without Ray: the optimiser, one step, one evaluation pass, the loop of one rank,
checkpoints, telemetry, and the driver's checks.

* :mod:`~mult.training.optim`: AdamW groups, warm-up + cosine;
* :mod:`~mult.training.step`: precision, :func:`~mult.training.step.train_step`,
  :func:`~mult.training.step.evaluate` (every stage's one step and one evaluation loop);
* :mod:`~mult.training.session`: the Session a launcher provides, and loop hooks;
* :mod:`~mult.training.loop`: :func:`~mult.training.loop.train_loop`;
* :mod:`~mult.training.checkpoint`, :mod:`~mult.training.telemetry`;
* :mod:`~mult.training.plan`: checks before any worker starts, run naming.

:mod:`mult.launch.trainer` runs the loop under Ray Train.
"""
