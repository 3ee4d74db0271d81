"""Infrastructure errors against data errors, and how long an object may keep failing.

Object storage fails in two unrelated ways, and they must never be confused:

* **data**: the object is not there (404 ``NoSuchKey``), or its bytes are not what they should
  be (a corrupt tar member). The loader skips and counts these, or fails, by
  ``data.bad_sample_policy``.
* **infrastructure**: the store is there but cannot serve right now: throttling (503
  ``SlowDown``), other 5xx, expired or missing credentials (403 ``ExpiredToken``,
  ``AccessDenied``, ``InvalidAccessKeyId``; no credentials at all), timeouts, connections reset
  or refused. These are retried with exponential back-off and jitter, and a read resumes at the
  byte where it broke. One object (a shard, a checkpoint file) may spend at most
  ``data.storage_retry_s`` seconds failing -- the failed attempts themselves and the waits
  between them, summed over the object's life -- and then :class:`StorageUnavailableError`
  names the object and the last error. Training then stops, and Ray's restart logic
  (``train.max_failures``) takes over: a throttled or expired run never trains on less data.

Anything else (a malformed request, a bucket that does not exist, an object replaced while it
was read) is neither: it raises :class:`~mult.data.storage.StorageError` at once.

botocore is imported lazily, so ``import mult`` stays light.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from mult.data.storage import StorageError, StorageUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

MISSING, INFRASTRUCTURE, FATAL = "missing", "infrastructure", "fatal"

# S3 error codes that say "the store cannot serve you now", whatever their HTTP status.
THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "RequestTimeoutException", "PriorRequestNotComplete",
})
CREDENTIAL_CODES = frozenset({
    "ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "AccessDenied",
    "InvalidAccessKeyId", "InvalidToken", "SignatureDoesNotMatch", "RequestExpired",
    "RequestTimeTooSkewed", "InvalidClientTokenId", "UnrecognizedClientException",
})
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


@dataclass(frozen=True)
class RetryPolicy:
    """How long one object may keep failing, and how fast each request must answer.

    ``max_retry_s``: the bound on the summed time of one object's failed attempts and the
    back-off waits between them (``data.storage_retry_s``). ``timeout_s``: connect and read
    timeout of one request (``data.storage_timeout_s``); a stalled connection counts as failed
    after it. Waits grow from ``base_delay_s`` by doubling up to ``max_delay_s``, each drawn
    from the upper half of its range ("equal jitter") so that many workers throttled at once do
    not retry in step.
    """

    max_retry_s: float = 300.0
    timeout_s: float = 60.0
    base_delay_s: float = 0.1
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_retry_s", "timeout_s", "base_delay_s", "max_delay_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"RetryPolicy.{name} must be > 0, got {value}")

    @classmethod
    def from_config(cls, data: Any) -> "RetryPolicy":
        """The policy a config's ``data`` section asks for (``storage_retry_s``, ``storage_timeout_s``)."""
        return cls(max_retry_s=float(data.storage_retry_s), timeout_s=float(data.storage_timeout_s))


# ---------------------------------------------------------------------------------------------
# Which kind of error is it.
# ---------------------------------------------------------------------------------------------
def error_code(exc: BaseException) -> tuple[str, int | None]:
    """(S3 error code, HTTP status) of a botocore ``ClientError``; ("", None) for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, int(status) if status is not None else None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the request or response never made it whole over the network."""
    import http.client

    from botocore.exceptions import (
        ChecksumError,
        ConnectionError as BotoConnectionError,
        FlexibleChecksumError,
        HTTPClientError,
        IncompleteReadError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (ConnectionError, TimeoutError, http.client.HTTPException, HTTPClientError,
            BotoConnectionError, IncompleteReadError, ChecksumError, FlexibleChecksumError, Urllib3Error)


def _credential_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import (
        CredentialRetrievalError,
        NoCredentialsError,
        PartialCredentialsError,
        TokenRetrievalError,
    )

    return (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError, TokenRetrievalError)


def classify(exc: BaseException) -> str:
    """``MISSING`` (data: the object is absent), ``INFRASTRUCTURE`` (retry, then fail the run)
    or ``FATAL`` (raise at once)."""
    if isinstance(exc, StorageUnavailableError):
        return INFRASTRUCTURE
    if isinstance(exc, FileNotFoundError):
        return MISSING
    code, status = error_code(exc)
    if code or status is not None:
        if code in NOT_FOUND_CODES:
            return MISSING
        if code in THROTTLING_CODES or code in CREDENTIAL_CODES:
            return INFRASTRUCTURE
        if status is not None and (status >= 500 or status in (403, 408, 429)):
            return INFRASTRUCTURE
        return FATAL
    if is_credential_error(exc) or isinstance(exc, _transport_errors()):
        return INFRASTRUCTURE
    return FATAL


def is_credential_error(exc: BaseException) -> bool:
    """Expired, refused or absent credentials: worth a fresh client (it re-reads the chain)."""
    code, status = error_code(exc)
    return code in CREDENTIAL_CODES or status == 403 or isinstance(exc, _credential_errors())


def describe(exc: BaseException) -> str:
    """A one-line account of an error, without request headers or signing details."""
    code, status = error_code(exc)
    if code or status is not None:
        message = str(getattr(exc, "response", {}).get("Error", {}).get("Message", "")).strip()
        return f"{code or status} (HTTP {status}){': ' + message if message else ''}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}{': ' + text if text else ''}"


# ---------------------------------------------------------------------------------------------
# Waiting between attempts.
# ---------------------------------------------------------------------------------------------
class Retrier:
    """The failure budget of one object: records failed attempts, waits, or gives up.

    Thread-safe (parts of one multipart upload share it). The jitter comes from a private
    generator seeded by the OS, so retries never consume the seeded streams that make training
    reproducible.
    """

    def __init__(self, policy: RetryPolicy, url: str, *, sleep: Callable[[float], None] = time.sleep):
        self.policy, self.url = policy, url
        self.spent = 0.0  # seconds of failed attempts and waits so far
        self.failures = 0
        self._rng = random.Random(os.urandom(8))
        self._lock = threading.Lock()
        self._sleep = sleep

    def failed(self, exc: BaseException, attempt_s: float, where: str = "", then: str = "retrying") -> None:
        """Count a failed attempt that took ``attempt_s``; wait before the next one (logged as
        ``then``), or raise :class:`StorageUnavailableError` when the object's budget is spent."""
        p = self.policy
        with self._lock:
            self.failures += 1
            self.spent += attempt_s
            left = p.max_retry_s - self.spent
            ceiling = min(p.max_delay_s, p.base_delay_s * 2 ** min(self.failures - 1, 30))
            delay = min(ceiling / 2 + self._rng.random() * ceiling / 2, max(left, 0.0))
            self.spent += delay
            failures, spent = self.failures, self.spent
        at = f" {where}" if where else ""
        if left <= 0:
            raise StorageUnavailableError(
                f"{self.url}{at}: storage unavailable: {failures} failed attempt(s) over {spent:.1f}s "
                f"(bound data.storage_retry_s={p.max_retry_s:g}s); last error {describe(exc)}",
                url=self.url, cause=describe(exc),
            ) from exc
        log.warning("%s%s: %s; %s in %.2fs (failure %d, %.1f of %gs spent)", self.url, at, describe(exc),
                    then, delay, failures, spent, p.max_retry_s)
        self._sleep(delay)


def call(policy: RetryPolicy, url: str, fn: Callable[[], T], *, retrier: Retrier | None = None,
         on_credentials: Callable[[], None] | None = None, where: str = "") -> T:
    """``fn()`` retried on infrastructure errors within ``policy``.

    A missing object raises ``FileNotFoundError``; a fatal error raises
    :class:`~mult.data.storage.StorageError`; past the bound :class:`StorageUnavailableError`.
    ``on_credentials`` runs after a credential error (drop a cached client, say).
    """
    retrier = retrier or Retrier(policy, url)
    while True:
        start = time.monotonic()
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            kind = classify(exc)
            if kind == MISSING:
                raise FileNotFoundError(f"{url} does not exist") from None
            if kind == FATAL:
                raise StorageError(f"{url}{' ' + where if where else ''}: {describe(exc)}",
                                   url=url, cause=describe(exc)) from exc
            if on_credentials is not None and is_credential_error(exc):
                on_credentials()
            retrier.failed(exc, time.monotonic() - start, where)
