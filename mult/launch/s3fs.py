"""The pyarrow S3 filesystem through which Ray Train writes and reads checkpoints, with retries
sized from :class:`~mult.data.retry.RetryPolicy` that survive Ray's pickling.

Ray pickles the storage filesystem to its controller and every worker, and pyarrow's own
pickling leaves ``retry_strategy`` out: measured with pyarrow 26, an unpickled
``S3FileSystem`` is back to the default 3 attempts, so the worker that uploads a checkpoint would
give up after two retries of a 503 ``SlowDown``. :class:`RetryingS3FileSystem` pickles its
attempts with it.

pyarrow retries throttling, 5xx and connection errors by count, each part of a multipart upload
on its own; it does not retry expired credentials. A checkpoint upload that still fails makes
``ray.train.report`` raise on the worker, and Ray's ``train.max_failures`` restarts the run
from the last complete checkpoint.
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs

from mult.data.retry import RetryPolicy


def pyarrow_attempts(policy: RetryPolicy) -> int:
    """Attempts whose expected back-off under the AWS SDK's standard strategy adds up to
    ``policy.max_retry_s``.

    That strategy waits a random fraction of 2^n seconds before retry n, at most 20 s: the
    expected wait is 2^(n-1) while 2^n <= 20, and 20 - 200/2^n beyond.
    """
    waited, retries = 0.0, 0
    while waited < policy.max_retry_s:
        ceiling = 2.0 ** retries
        waited += ceiling / 2 if ceiling <= 20 else 20 - 200 / ceiling
        retries += 1
    return retries + 1


class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` with ``AwsStandardS3RetryStrategy(max_attempts)`` that
    survives pickling; every other keyword goes to ``S3FileSystem``."""

    def __init__(self, *, max_attempts: int, **kwargs: Any):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        super().__init__(retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kwargs)
        self.max_attempts = max_attempts
        self._kwargs = dict(kwargs)

    def __reduce__(self) -> tuple:
        return _rebuild, (self.max_attempts, self._kwargs)


def _rebuild(max_attempts: int, kwargs: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts=max_attempts, **kwargs)
