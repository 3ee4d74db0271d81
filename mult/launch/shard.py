"""Shard conversion and verification on Ray: one Ray task per group (building, scene, run, map)
or per shard."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

MapFn = Callable[[Callable[[str], dict], Sequence[str]], Iterable[dict]]


def ray_map(num_cpus: float = 1.0, *, desc: str = "shard",
            on_error: Callable[[str, BaseException], dict] | None = None) -> MapFn:
    """A ``map_groups`` for :func:`mult.data.shards.convert` (or a ``map_shards`` for
    :func:`mult.data.verify.verify_dataset`) running one Ray task per item, with a progress bar.

    Every item is attempted. Without ``on_error``, failures are raised together at the end as a
    :class:`~mult.data.shards.ConversionError` (a rerun resumes the conversion); with it, a
    failed item's result is ``on_error(item, exception)``, so a report can name it.
    """

    def run(fn: Callable[[str], dict], items: Sequence[str]) -> list[dict]:
        import ray
        from tqdm import tqdm

        from mult.launch.env import init_ray

        init_ray(local_cpus=2)
        task = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
        pending = {task.remote(item): item for item in items}
        results, failures = [], []
        with tqdm(total=len(items), unit="item", desc=desc, file=sys.stderr) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    item = pending.pop(ref)
                    try:
                        results.append(ray.get(ref))
                        bar.set_postfix(samples=sum(r.get("samples", 0) for r in results), refresh=False)
                    except Exception as exc:  # keep going over the rest; the caller decides
                        log.error("%s %s failed: %s", desc, item, exc)
                        if on_error is None:
                            failures.append(f"{item}: {exc}")
                        else:
                            results.append(on_error(item, exc))
                    bar.update(1)
        if failures:
            from mult.data.shards import ConversionError

            raise ConversionError(f"{len(failures)} group(s) failed (rerun to resume): " + "; ".join(failures[:5]))
        return results

    return run
