"""Experiments built on training: the loss-weight search, the shared-attention ablation,
single-task baselines, domain-transfer evaluation, prediction, and their reports.

Nothing here imports Ray; :mod:`mult.launch` runs these on a cluster.
"""
