"""Thin entry points, one per stage: ``python -m pipelines.<stage>``."""
