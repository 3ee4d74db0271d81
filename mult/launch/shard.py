"""Shard conversion on Ray: one Ray task per group (building, scene, run, map)."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Iterable, Sequence

log = logging.getLogger(__name__)


def ray_map(num_cpus: float = 1.0) -> Callable[[Callable[[str], dict], Sequence[str]], Iterable[dict]]:
    """A ``map_groups`` for :func:`mult.data.shards.convert` running one Ray task per group,
    with a progress bar. Every group is attempted; failures are raised together at the end."""

    def run(fn: Callable[[str], dict], groups: Sequence[str]) -> list[dict]:
        import ray
        from tqdm import tqdm

        from mult.launch.env import init_ray

        init_ray(local_cpus=2)
        task = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
        pending = {task.remote(g): g for g in groups}
        results, failures = [], []
        with tqdm(total=len(groups), unit="group", desc="shard", file=sys.stderr) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    group = pending.pop(ref)
                    try:
                        record = ray.get(ref)
                        results.append(record)
                        bar.set_postfix(samples=sum(r["samples"] for r in results), refresh=False)
                    except Exception as exc:  # keep converting the rest; rerun resumes
                        failures.append(f"{group}: {exc}")
                        log.error("group %s failed: %s", group, exc)
                    bar.update(1)
        if failures:
            from mult.data.shards import ConversionError

            raise ConversionError(f"{len(failures)} group(s) failed (rerun to resume): " + "; ".join(failures[:5]))
        return results

    return run
