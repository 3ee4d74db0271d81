"""S3 through boto3: the client, a streaming read that resumes, managed uploads, webdataset's opener.

S3 goes through boto3 with the standard AWS credential chain (environment, shared config
files, instance or pod roles); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points it at
any S3-compatible store, which boto3 reads itself. Retries use botocore's ``standard`` mode
unless ``AWS_RETRY_MODE=adaptive`` (or ``retry_mode=``) asks for the client-side rate limiter.
Reads stream; a connection dropped in the middle of an object is resumed with a ranged GET
from the byte where it broke (see :class:`ResumableS3Stream`). Uploads use boto3's managed
transfer, multipart above ``multipart_threshold``. Nothing here logs credentials: log lines
name the bucket and key only, and error messages never include request headers.

boto3 and webdataset are imported lazily, so ``import mult`` stays light.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO, Any

from mult.data.storage import Storage, StorageError, _check_rel

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


def s3_client(retry_mode: str | None = None, max_attempts: int | None = None) -> Any:
    """A boto3 S3 client, cached per process, endpoint and retry settings.

    Credentials come from boto3's standard chain; the endpoint from ``AWS_ENDPOINT_URL`` /
    ``AWS_ENDPOINT_URL_S3`` (read by boto3 itself). ``retry_mode`` is ``standard`` (default, or
    ``AWS_RETRY_MODE``) or ``adaptive``; ``max_attempts`` defaults to ``AWS_MAX_ATTEMPTS`` or 8.
    """
    import boto3
    from botocore.config import Config

    mode = _retry_mode(retry_mode)
    attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Credentials are part of the cache key only through a hash, so rotating keys in one
    # process (tests, several profiles) gets a fresh client and nothing secret is stored twice.
    cred_hash = hash((os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE")))
    key = (os.getpid(), endpoint, os.environ.get("AWS_DEFAULT_REGION"), mode, attempts, cred_hash)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            config = Config(
                retries={"mode": mode, "max_attempts": attempts},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=32,
            )
            session = boto3.session.Session()
            _install_redaction(session)
            client = session.client("s3", config=config)
            log.debug("S3 client: endpoint=%s retry_mode=%s", endpoint or "<aws default>", mode)
            _CLIENTS[key] = client
        return client


def _is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")
    return False


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors after which a streaming read is resumed with a ranged GET."""
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (
        ConnectionError,
        TimeoutError,
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
        Urllib3Error,
    )


class ResumableS3Stream(io.RawIOBase):
    """A streaming GET that survives dropped connections.

    It counts the bytes it has handed out; when the body breaks (reset, truncated response,
    timeout, the server restarting), it reopens the object with ``Range: bytes={pos}-`` and
    ``If-Match: {etag}`` (so a replaced object is an error, not silently spliced bytes) and
    goes on. After ``max_resumes`` consecutive failures it raises :class:`StorageError`: a read
    never ends early without an error.
    """

    def __init__(self, client: Any, bucket: str, key: str, *, max_resumes: int = 10,
                 backoff_s: float = 0.25, max_backoff_s: float = 5.0):
        super().__init__()
        self._client, self.bucket, self.key = client, bucket, key
        self.max_resumes, self.backoff_s, self.max_backoff_s = max_resumes, backoff_s, max_backoff_s
        self.pos = 0
        self.resumes = 0  # total reopenings, for tests and logs
        self._body = None
        try:
            response = client.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"s3://{bucket}/{key} does not exist") from None
            raise StorageError(f"cannot read s3://{bucket}/{key}: {type(exc).__name__}: {exc}") from None
        self.length = int(response["ContentLength"])
        self.etag = response.get("ETag")
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self.key, "Range": f"bytes={self.pos}-"}
        if self.etag:
            kwargs["IfMatch"] = self.etag
        self._body = self._client.get_object(**kwargs)["Body"]

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.length or len(buffer) == 0:
            return 0
        want = min(len(buffer), self.length - self.pos)
        failures = 0
        while True:
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
            except _transient_errors() as exc:
                failures += 1
                self._close_body()
                if failures > self.max_resumes:
                    raise StorageError(
                        f"s3://{self.bucket}/{self.key}: connection lost at byte {self.pos} of "
                        f"{self.length} and {self.max_resumes} resumes failed ({type(exc).__name__})"
                    ) from None
                delay = min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)
                log.warning("s3://%s/%s: read broke at byte %d (%s); resuming in %.2fs",
                            self.bucket, self.key, self.pos, type(exc).__name__, delay)
                self.resumes += 1
                time.sleep(delay)
            except Exception as exc:
                from botocore.exceptions import ClientError

                if isinstance(exc, ClientError):
                    code = exc.response.get("Error", {}).get("Code", "")
                    if code in ("PreconditionFailed", "412"):
                        raise StorageError(
                            f"s3://{self.bucket}/{self.key} changed while it was being read"
                        ) from None
                raise

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
    """``s3://bucket/prefix`` through boto3 (see the module docstring for settings)."""

    def __init__(self, bucket: str, prefix: str = "", *, retry_mode: str | None = None,
                 multipart_threshold: int = 64 * 2**20, multipart_chunksize: int = 16 * 2**20):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retry_mode = _retry_mode(retry_mode)
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize

    @property
    def client(self) -> Any:
        return s3_client(self.retry_mode)

    def _key(self, rel: str) -> str:
        rel = _check_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize, max_concurrency=4)

    def _fail(self, action: str, rel: str, exc: Exception) -> StorageError:
        # Only the error class and its message: boto's messages name the operation and code,
        # never the signing headers or keys.
        return StorageError(f"{action} s3://{self.bucket}/{self._key(rel)} failed: "
                            f"{type(exc).__name__}: {exc}")

    def open_read(self, rel: str) -> IO[bytes]:
        return io.BufferedReader(ResumableS3Stream(self.client, self.bucket, self._key(rel)),
                                 buffer_size=1 << 20)

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        except Exception as exc:
            raise self._fail("writing", rel, exc) from None

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        # A multipart upload becomes visible only when it completes, so an upload killed
        # half-way never publishes a partial object.
        try:
            self.client.upload_file(os.fspath(local_path), self.bucket, self._key(rel),
                                    Config=self._transfer_config())
        except Exception as exc:
            raise self._fail("uploading", rel, exc) from None

    def download_file(self, rel: str, local_path: str | os.PathLike) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(rel), os.fspath(local_path),
                                      Config=self._transfer_config())
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"{self.url(rel)} does not exist") from None
            raise self._fail("downloading", rel, exc) from None

    def size(self, rel: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["ContentLength"])
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise self._fail("inspecting", rel, exc) from None

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except Exception as exc:
            raise self._fail("listing", prefix, exc) from None
        return sorted(out)

    def delete(self, rel: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))
        except Exception as exc:
            raise self._fail("deleting", rel, exc) from None

    def url(self, rel: str = "") -> str:
        key = self._key(rel) if rel else self.prefix
        return f"s3://{self.bucket}/{key}"

    def __repr__(self) -> str:
        return f"S3Storage({self.url()!r})"


# ---------------------------------------------------------------------------------------------
# webdataset.
# ---------------------------------------------------------------------------------------------
def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    if mode != "rb":
        raise ValueError(f"the s3 opener only reads (mode 'rb'), got mode {mode!r}")
    bucket, _, key = url[len("s3://"):].partition("/")
    return io.BufferedReader(ResumableS3Stream(s3_client(), bucket, key), buffer_size=1 << 20)


def register_webdataset_s3() -> None:
    """Make ``webdataset.gopen`` open ``s3://`` URLs with :class:`ResumableS3Stream`."""
    import webdataset

    webdataset.gopen_schemes["s3"] = _gopen_s3
