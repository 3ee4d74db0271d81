"""S3 through boto3: the client, a streaming read that resumes, part-wise uploads, webdataset's opener.

S3 goes through boto3 with the standard AWS credential chain (environment, shared config
files, instance or pod roles); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points it at
any S3-compatible store, which boto3 reads itself. Each call is retried by botocore's
``standard`` mode (``AWS_RETRY_MODE=adaptive``, or ``retry_mode=``, asks for the client-side
rate limiter), and around that every operation is retried on infrastructure errors within a
:class:`~mult.data.retry.RetryPolicy` (``data.storage_retry_s``), then fails with
:class:`~mult.data.storage.StorageUnavailableError`. Reads stream; a read that breaks in the
middle of an object resumes with a ranged GET from the byte where it broke (see
:class:`ResumableS3Stream`); downloads are such reads into a temporary file renamed at the end.
Uploads above ``multipart_threshold`` are multipart, each part retried on its own. Nothing here
logs credentials: log lines name the bucket and key only, and error messages never include
request headers.

boto3 and webdataset are imported lazily, so ``import mult`` stays light.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Callable, TypeVar

from mult.data.retry import FATAL, MISSING, Retrier, RetryPolicy, classify, describe, error_code, is_credential_error
from mult.data.retry import call as retry_call
from mult.data.storage import TMP_MARKER, Storage, StorageError, _check_rel, ensure_free_space

T = TypeVar("T")
READ_CHUNK = 256 * 2**10

log = logging.getLogger(__name__)

RETRY_MODES = ("standard", "adaptive", "legacy")


# ---------------------------------------------------------------------------------------------
# S3 through boto3.
# ---------------------------------------------------------------------------------------------
_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


# botocore's DEBUG logs print request headers and the string it signs, which carry the session
# token and the access key id. These loggers get a filter that masks the current credentials.
_BOTO_LOGGERS = ("botocore.endpoint", "botocore.auth", "botocore.parsers", "botocore.credentials",
                 "botocore.httpsession", "botocore.awsrequest", "botocore.utils", "botocore.hooks",
                 "botocore.retryhandler", "urllib3.connectionpool")


class _RedactCredentials(logging.Filter):
    def __init__(self) -> None:
        super().__init__("mult-redact")
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, ()
        return True


_REDACT = _RedactCredentials()


def _install_redaction(session: Any) -> None:
    creds = session.get_credentials()
    if creds is None:
        return
    frozen = creds.get_frozen_credentials()
    _REDACT.secrets.update(v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v)
    for name in _BOTO_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


def _retry_mode(mode: str | None) -> str:
    mode = mode or os.environ.get("AWS_RETRY_MODE") or "standard"
    if mode not in RETRY_MODES:
        raise ValueError(f"unknown S3 retry mode {mode!r}; valid modes: {', '.join(RETRY_MODES)}")
    return mode


def s3_client(retry_mode: str | None = None, max_attempts: int | None = None,
              timeout_s: float | None = None) -> Any:
    """A boto3 S3 client, cached per process, endpoint, retry and timeout settings.

    Credentials come from boto3's standard chain; the endpoint from ``AWS_ENDPOINT_URL`` /
    ``AWS_ENDPOINT_URL_S3`` (read by boto3 itself). ``retry_mode`` is ``standard`` (default, or
    ``AWS_RETRY_MODE``) or ``adaptive``; ``max_attempts``, botocore's attempts at one call
    (the first included, as ``AWS_MAX_ATTEMPTS`` counts them; :mod:`mult.data.retry` retries
    around them), defaults to ``AWS_MAX_ATTEMPTS`` or 8; ``timeout_s`` is the read timeout
    (default 60 s; connecting waits at most 10 s of it).
    """
    import boto3
    from botocore.config import Config

    mode = _retry_mode(retry_mode)
    attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Credentials are part of the cache key only through a hash, so rotating keys in one
    # process (tests, several profiles) gets a fresh client and nothing secret is stored twice.
    cred_hash = hash((os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE")))
    timeout = float(timeout_s or 60.0)
    key = (os.getpid(), endpoint, os.environ.get("AWS_DEFAULT_REGION"), mode, attempts, timeout, cred_hash)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            config = Config(
                # total_max_attempts counts the first attempt, like AWS_MAX_ATTEMPTS (botocore's
                # "max_attempts" key would count retries only: one more attempt than asked)
                retries={"mode": mode, "total_max_attempts": attempts},
                connect_timeout=min(10.0, timeout),
                read_timeout=timeout,
                max_pool_connections=32,
            )
            session = boto3.session.Session()
            _install_redaction(session)
            client = session.client("s3", config=config)
            log.debug("S3 client: endpoint=%s retry_mode=%s", endpoint or "<aws default>", mode)
            _CLIENTS[key] = client
        return client


def forget_clients() -> None:
    """Drop this process's cached clients, so the next call builds a session that reads the
    credential chain again (after an expired token or a rotated credentials file)."""
    with _CLIENTS_LOCK:
        for key in [k for k in _CLIENTS if k[0] == os.getpid()]:
            del _CLIENTS[key]


class ResumableS3Stream(io.RawIOBase):
    """A streaming GET that survives dropped connections, throttling and expired credentials.

    It counts the bytes it has handed out; when the body breaks (reset, truncated response,
    timeout, the server restarting) or a request fails with an infrastructure error (see
    :mod:`mult.data.retry`), it reopens the object with ``Range: bytes={pos}-`` and
    ``If-Match: {etag}`` (so a replaced object is an error, not silently spliced bytes) and
    goes on. The object's failures share one budget, ``retry.max_retry_s``; past it
    :class:`StorageUnavailableError` names the object, the byte and the last error. A read
    never ends early without an error. ``client_factory`` returns the client for each attempt
    (a fresh one after a credential error).
    """

    def __init__(self, bucket: str, key: str, *, retry: RetryPolicy | None = None,
                 client_factory: Callable[[], Any] | None = None):
        super().__init__()
        self.bucket, self.key = bucket, key
        self.retry = retry or RetryPolicy()
        self._client_factory = client_factory or (lambda: s3_client(timeout_s=self.retry.timeout_s))
        self.url = f"s3://{bucket}/{key}"
        self._retrier = Retrier(self.retry, self.url)
        self.pos = 0
        self.resumes = 0  # reopenings after the first GET, for tests and logs
        self.etag: str | None = None
        self._body = None
        response = retry_call(self.retry, self.url, lambda: self._client_factory().get_object(
            Bucket=bucket, Key=key), retrier=self._retrier, on_credentials=forget_clients)
        self.length = int(response["ContentLength"])
        self.etag = response.get("ETag")
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self.key, "Range": f"bytes={self.pos}-"}
        if self.etag:
            kwargs["IfMatch"] = self.etag
        self.resumes += 1
        self._body = self._client_factory().get_object(**kwargs)["Body"]

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.length or len(buffer) == 0:
            return 0
        # At most READ_CHUNK per read: what a reset loses is re-read from the last chunk handed out.
        want = min(len(buffer), self.length - self.pos, READ_CHUNK)
        while True:
            start = time.monotonic()
            try:
                if self._body is None:
                    self._reopen()
                chunk = self._body.read(want)
                if not chunk:
                    raise ConnectionError(f"stream ended at byte {self.pos} of {self.length}")
                n = len(chunk)
                buffer[:n] = chunk
                self.pos += n
                return n
            except StorageError:
                raise
            except Exception as exc:
                self._close_body()
                self._failed(exc, time.monotonic() - start)

    def _failed(self, exc: Exception, attempt_s: float) -> None:
        """Raise for data and fatal errors; count and wait for infrastructure ones."""
        code, _ = error_code(exc)
        if code in ("PreconditionFailed", "412"):
            raise StorageError(f"{self.url} changed while it was being read (at byte {self.pos})",
                               url=self.url, cause=describe(exc)) from None
        kind = classify(exc)
        if kind == MISSING:
            raise FileNotFoundError(f"{self.url} disappeared while it was being read (at byte {self.pos})")
        if kind == FATAL:
            raise StorageError(f"{self.url}: reading at byte {self.pos} failed: {describe(exc)}",
                               url=self.url, cause=describe(exc)) from exc
        if is_credential_error(exc):
            forget_clients()
        self._retrier.failed(exc, attempt_s, where=f"at byte {self.pos} of {self.length}",
                             then="resuming with a ranged GET")

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # closing a broken connection may itself fail; nothing to keep
                pass
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


class S3Storage(Storage):
    """``s3://bucket/prefix`` through boto3 (see the module docstring for settings).

    Every operation is retried on infrastructure errors within ``retry``
    (:class:`~mult.data.retry.RetryPolicy`); a missing object is ``FileNotFoundError``.
    """

    def __init__(self, bucket: str, prefix: str = "", *, retry: RetryPolicy | None = None,
                 retry_mode: str | None = None, multipart_threshold: int = 64 * 2**20,
                 multipart_chunksize: int = 16 * 2**20, max_concurrency: int = 4):
        if multipart_chunksize < 5 * 2**20:
            raise ValueError(f"multipart_chunksize must be >= 5 MiB (S3's smallest part), got {multipart_chunksize}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retry = retry or RetryPolicy()
        self.retry_mode = _retry_mode(retry_mode)
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency

    @property
    def client(self) -> Any:
        return s3_client(self.retry_mode, timeout_s=self.retry.timeout_s)

    def _key(self, rel: str) -> str:
        rel = _check_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _call(self, action: str, rel: str, fn: Callable[[Any], T], retrier: Retrier | None = None) -> T:
        """``fn(client)`` with retries; errors name the action and the object's URL."""
        return retry_call(self.retry, self.url(rel), lambda: fn(self.client), retrier=retrier,
                          on_credentials=forget_clients, where=f"({action})")

    def open_read(self, rel: str) -> IO[bytes]:
        return io.BufferedReader(ResumableS3Stream(self.bucket, self._key(rel), retry=self.retry,
                                                   client_factory=lambda: self.client), buffer_size=1 << 20)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._call("writing", rel, lambda c: c.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data))

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        # An object appears only when its PUT or CompleteMultipartUpload succeeds, so an upload
        # killed half-way never publishes a partial object. Parts are retried one by one: a
        # dropped connection costs one part, not the whole file.
        size = os.path.getsize(local_path)
        if size <= self.multipart_threshold:
            def put(client: Any) -> Any:
                with open(local_path, "rb") as fh:
                    return client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=fh)

            self._call("uploading", rel, put)
            return
        upload_parts(self, os.fspath(local_path), rel, size)

    def download_file(self, rel: str, local_path: str | os.PathLike) -> None:
        # A streaming GET that resumes at the byte, into a temporary file renamed at the end:
        # a cut-off download never looks like a whole file.
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.open_read(rel) as fh:
            ensure_free_space(dest.parent, fh.raw.length, f"downloading {self.url(rel)}")
            tmp = dest.with_name(f".{dest.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")
            try:
                with open(tmp, "wb") as out:
                    shutil.copyfileobj(fh, out, 1 << 20)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

    def size(self, rel: str) -> int | None:
        try:
            head = self._call("inspecting", rel, lambda c: c.head_object(Bucket=self.bucket, Key=self._key(rel)))
        except FileNotFoundError:
            return None
        return int(head["ContentLength"])

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def sizes(self, prefix: str = "") -> dict[str, int]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0

        def listing(client: Any) -> dict[str, int]:
            out: dict[str, int] = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out.update((obj["Key"][strip:], int(obj["Size"])) for obj in page.get("Contents", []))
            return out

        return self._call("listing", prefix, listing)

    def delete(self, rel: str) -> None:
        self._call("deleting", rel, lambda c: c.delete_object(Bucket=self.bucket, Key=self._key(rel)))

    def url(self, rel: str = "") -> str:
        key = self._key(rel) if rel else self.prefix
        return f"s3://{self.bucket}/{key}"

    def __repr__(self) -> str:
        return f"S3Storage({self.url()!r})"


def upload_parts(store: S3Storage, local_path: str, rel: str, size: int) -> None:
    """A multipart upload whose parts are retried one by one within one budget for the object;
    aborted (nothing published) if it fails."""
    key, chunk = store._key(rel), store.multipart_chunksize
    retrier = Retrier(store.retry, store.url(rel))
    upload_id = store._call("starting upload", rel, lambda c: c.create_multipart_upload(
        Bucket=store.bucket, Key=key), retrier)["UploadId"]

    def part(number: int) -> dict[str, Any]:
        with open(local_path, "rb") as fh:
            fh.seek((number - 1) * chunk)
            body = fh.read(chunk)
        answer = store._call(f"uploading part {number}", rel, lambda c: c.upload_part(
            Bucket=store.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body), retrier)
        return {"PartNumber": number, "ETag": answer["ETag"]}

    try:
        with ThreadPoolExecutor(max_workers=store.max_concurrency) as pool:
            parts = list(pool.map(part, range(1, (size + chunk - 1) // chunk + 1)))
        store._call("completing upload", rel, lambda c: c.complete_multipart_upload(
            Bucket=store.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}), retrier)
    except BaseException:
        try:
            store.client.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # the upload stays invisible either way; S3 lifecycle rules reap it
            log.warning("could not abort the multipart upload of %s: %s", store.url(rel), describe(exc))
        raise


# ---------------------------------------------------------------------------------------------
# webdataset.
# ---------------------------------------------------------------------------------------------
def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    if mode != "rb":
        raise ValueError(f"the s3 opener only reads (mode 'rb'), got mode {mode!r}")
    bucket, _, key = url[len("s3://"):].partition("/")
    return io.BufferedReader(ResumableS3Stream(bucket, key), buffer_size=1 << 20)


def register_webdataset_s3() -> None:
    """Make ``webdataset.gopen`` open ``s3://`` URLs with :class:`ResumableS3Stream`."""
    import webdataset

    webdataset.gopen_schemes["s3"] = _gopen_s3
