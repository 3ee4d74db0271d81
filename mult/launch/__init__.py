"""Running things: the only package that imports Ray.

* :mod:`~mult.launch.env`: how every stage joins Ray (and what its processes inherit);
* :mod:`~mult.launch.trainer`: the training loop under Ray Train (``TorchTrainer``, the Ray
  session adapter);
* :mod:`~mult.launch.tune`: the loss-weight search under Ray Tune;
* :mod:`~mult.launch.ablation`, :mod:`~mult.launch.transfer`, :mod:`~mult.launch.shard`: many
  small jobs as Ray tasks;
* :mod:`~mult.launch.local`: a local S3-compatible server and Ray head (tests, the demo);
* :mod:`~mult.launch.demo`: the whole chain on one machine, each stage as its own process.

Everything else in :mod:`mult` imports without Ray.
"""
