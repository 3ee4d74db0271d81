"""Joining Ray from an entry point, with the settings every process of the job needs.

Every stage connects the same way: to ``RAY_ADDRESS`` when it is set (a cluster, a local
``ray start --head``, or the job's own cluster under ``ray job submit``), otherwise to a new local
instance. Either way the job's processes get the driver's non-secret S3 settings through the
runtime environment: the endpoint of an S3-compatible store is needed by every worker that
reads shards or writes checkpoints. Keys and tokens are never put there (a runtime environment
is visible in the dashboard and the job table); workers take credentials from their own chain.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("mult.ray")

FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS",
)


# Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default), and a worker's `ray.train.report` waits for that poll: measured here, back-to-back
# reports cost 2.0 s each with the default and 0.2 s with 0.2 (BENCHMARKS.md, DDP). 0.5 s keeps
# reports cheap at a negligible polling cost; set the variable to choose another value.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_HEALTH_CHECK_S = "0.5"


def forwarded_env() -> dict[str, str]:
    """Environment variables to pass to every process of this job.

    ``RAY_ADDRESS`` is included when it is a ``host:port``: Ray Train's placement-group cleaner
    looks its cluster up through the state API and otherwise auto-detects, which fails on a host
    running several Ray instances ("Found multiple active Ray instances"). Under ``ray job
    submit`` variables the job's own runtime environment sets are left out, since Ray refuses to
    merge a variable that both set.
    """
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env[HEALTH_CHECK_ENV] = os.environ.get(HEALTH_CHECK_ENV, DEFAULT_HEALTH_CHECK_S)
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "auto" and "://" not in address:
        env["RAY_ADDRESS"] = address
    injected = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    job_env = (injected.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in env.items() if k not in job_env}


def init_ray(*, local_cpus: int | None = None, local_dashboard: bool = False) -> None:
    """``ray.init`` for an entry point (no-op when Ray is already initialised).

    ``local_cpus`` and ``local_dashboard`` apply only when no ``RAY_ADDRESS`` is set and a new
    local instance starts.
    """
    import ray

    if ray.is_initialized():
        return
    # A new local instance's processes inherit this environment; a cluster's get it through
    # the job's runtime environment below.
    os.environ.setdefault(HEALTH_CHECK_ENV, DEFAULT_HEALTH_CHECK_S)
    env = forwarded_env()
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        if local_cpus is not None:
            kwargs["num_cpus"] = local_cpus
        ray.init(include_dashboard=local_dashboard, **kwargs)
    log.info("Ray: %s", ray.cluster_resources())
