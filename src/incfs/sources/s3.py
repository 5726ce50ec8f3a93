"""S3 (or S3-compatible: MinIO, Ceph RGW, moto) objects as a Source.

boto3 is synchronous, so every call runs in a worker thread, at most
`max_connections` at a time (the same number as botocore's connection pool,
so threads never wait on the pool). botocore's own retries are switched off:
`RetryPolicy` is the one place that decides about retrying, with the same
transient/permanent split as the other backends.

Credentials come from boto3's usual chain (environment, shared config and
credentials files with `profile`, container/instance roles); pass
`endpoint_url` for S3-compatible servers and `client_kwargs` for anything
else `boto3.client()` accepts.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any, NamedTuple

import trio

from incfs.errors import UsageError
from incfs.sources.base import (
    AccessDeniedError,
    NotFoundError,
    ObjectChangedError,
    PermanentSourceError,
    RangeNotSatisfiableError,
    Source,
    SourceError,
    SourceIdentity,
    TransientSourceError,
    check_range,
    check_within,
)
from incfs.sources.http import parse_content_range
from incfs.sources.retry import RetryPolicy, call_with_retry

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound", "404"})
_DENIED = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                     "AllAccessDisabled", "AccountProblem"})
_TRANSIENT = frozenset({"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                        "RequestLimitExceeded", "InternalError", "ServiceUnavailable",
                        "ExpiredToken", "TokenRefreshRequired"})
# botocore errors that mean "configured wrongly", not "network trouble".
_CONFIG_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "NoRegionError",
                  "ParamValidationError", "ProfileNotFound", "UnknownServiceError",
                  "InvalidRegionError", "InvalidEndpointConfigurationError")


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key")."""
    parts = urllib.parse.urlsplit(url)
    key = urllib.parse.unquote(parts.path.lstrip("/"))
    if parts.scheme != "s3" or not parts.netloc or not key:
        raise UsageError(f"expected s3://bucket/key, got {url!r}")
    return parts.netloc, key


def classify_boto_error(name: str, exc: Exception) -> SourceError:
    """Map a botocore/boto3 exception to transient or permanent."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"{name}: {code or status} {error.get('Message', '')}".rstrip()
        if code in _NOT_FOUND or status == 404:
            return NotFoundError(message)
        if code in _DENIED or status in (401, 403):
            return AccessDeniedError(message)
        if code == "InvalidRange" or status == 416:
            return RangeNotSatisfiableError(message)
        if code == "PreconditionFailed" or status == 412:
            return ObjectChangedError(message)
        if code in _TRANSIENT or status >= 500 or status in (408, 429):
            return TransientSourceError(message)
        return PermanentSourceError(message)
    message = f"{name}: {type(exc).__name__}: {exc}"
    if type(exc).__name__ in _CONFIG_ERRORS:
        return PermanentSourceError(message)
    return TransientSourceError(message)  # connection, timeout, truncated stream


class _Answer(NamedTuple):
    """What one GetObject returned, handed from the worker thread back to trio
    (state is only updated on the trio side)."""

    data: bytes | None
    content_range: str | None
    content_length: int | None
    etag: str | None


class S3Source(Source):
    """Byte ranges of `s3://bucket/key` via GetObject with a Range header."""

    SCHEMES = ("s3",)
    OPTIONS = frozenset({"endpoint_url", "region", "profile", "version_id", "retry",
                         "max_connections", "connect_timeout", "timeout", "client_kwargs",
                         "name"})

    @classmethod
    def spec_args(cls, spec: str) -> dict[str, Any]:
        bucket, key = parse_s3_url(spec)
        return {"bucket": bucket, "key": key}

    def __init__(
        self,
        bucket: str,
        key: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        version_id: str | None = None,
        retry: RetryPolicy | None = None,
        max_connections: int = 16,
        connect_timeout: float = 10.0,
        timeout: float = 30.0,
        client_kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        if not bucket or not key:
            raise UsageError("S3Source needs a bucket and a key")
        super().__init__(name or f"s3://{bucket}/{key}", max_concurrency=max_connections)
        self.bucket, self.key = bucket, key
        self.endpoint_url, self.region, self.profile = endpoint_url, region, profile
        self.version_id = version_id
        self.retry = retry or RetryPolicy()
        self._connect_timeout, self._timeout = connect_timeout, timeout
        self._client_kwargs = dict(client_kwargs or {})
        self._client: Any = None
        self._client_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(max_connections)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Source:
        """Build from an `s3://bucket/key` URL."""
        bucket, key = parse_s3_url(url)
        return cls(bucket, key, **options)

    # -- client -------------------------------------------------------------

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=self._connect_timeout,
            read_timeout=self._timeout,
            max_pool_connections=self.max_concurrency,
            retries={"mode": "standard", "total_max_attempts": 1},
        )
        session = boto3.session.Session(profile_name=self.profile, region_name=self.region)
        return session.client("s3", endpoint_url=self.endpoint_url, config=config,
                              **self._client_kwargs)

    async def _get_client(self) -> Any:
        """Create the client on first use, in a thread: it loads service
        models from disk (tens of ms) and may read credential files."""
        async with self._client_lock:
            if self._client is None:
                self._client = await trio.to_thread.run_sync(self._guarded, self._make_client)
            return self._client

    def _guarded(self, fn: Any, *args: Any) -> Any:
        """Run a boto call in the worker thread, classifying its errors there."""
        try:
            return fn(*args)
        except SourceError:
            raise
        except Exception as exc:
            raise classify_boto_error(self.name, exc) from exc

    async def _call(self, fn: Any, *args: Any) -> Any:
        self.stats.requests += 1
        return await trio.to_thread.run_sync(self._guarded, fn, *args, limiter=self._limiter)

    # -- identity -----------------------------------------------------------

    def _check_identity(self, etag: str | None, total: int | None) -> None:
        self.adopt_identity(SourceIdentity(total, etag))

    def _object_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.version_id:
            args["VersionId"] = self.version_id
        return args

    # -- API ----------------------------------------------------------------

    async def size(self) -> int:
        """ContentLength from HeadObject (cached)."""
        if self._size is None:
            client = await self._get_client_retrying()

            async def attempt() -> None:
                head = await self._call(lambda: client.head_object(**self._object_args()))
                self._check_identity(head.get("ETag"), int(head["ContentLength"]))

            await call_with_retry(self.retry, attempt, name=self.name, stats=self.stats)
        assert self._size is not None
        return self._size

    async def _get_client_retrying(self) -> Any:
        return await call_with_retry(self.retry, self._get_client, name=self.name,
                                     stats=self.stats)

    def _get_sync(self, client: Any, offset: int, length: int) -> _Answer:
        args = self._object_args()
        args["Range"] = f"bytes={offset}-{offset + length - 1}"
        if self._etag:
            # Let S3 refuse (412) rather than send bytes of another version.
            args["IfMatch"] = self._etag
        response = client.get_object(**args)
        body = response["Body"]
        try:
            declared = response.get("ContentLength")
            # Do not download a whole object that ignored our Range.
            data = body.read() if declared == length else None
        finally:
            body.close()
        return _Answer(data, response.get("ContentRange"), declared, response.get("ETag"))

    def _validate(self, answer: _Answer, offset: int, length: int) -> bytes:
        end = offset + length - 1
        parsed = parse_content_range(answer.content_range)
        if parsed is not None:
            start, stop, total = parsed
            self._check_identity(answer.etag, total)
            if (start, stop) != (offset, end):
                if total is not None:
                    check_within(self.name, offset, length, total)
                raise PermanentSourceError(f"{self.name}: asked for bytes {offset}-{end}, got "
                                           f"ContentRange {answer.content_range!r}")
        elif answer.content_range or offset != 0 or answer.content_length != length:
            raise PermanentSourceError(f"{self.name}: response without a matching "
                                       f"ContentRange ({answer.content_range!r})")
        else:
            self._check_identity(answer.etag, answer.content_length)  # whole object
        if answer.data is None and (answer.content_length or 0) > length:
            raise PermanentSourceError(f"{self.name}: ContentLength {answer.content_length} "
                                       f"for a {length}-byte range")
        got = 0 if answer.data is None else len(answer.data)
        if answer.data is None or got < length:
            raise TransientSourceError(f"{self.name}: short body, {got} of {length} bytes")
        if got > length:
            raise PermanentSourceError(f"{self.name}: body longer than the {length} bytes asked")
        return answer.data

    async def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, retried per `self.retry`."""
        check_range(offset, length)
        if length == 0:
            return b""
        if self._size is not None:
            check_within(self.name, offset, length, self._size)
        client = await self._get_client_retrying()

        async def attempt() -> bytes:
            answer = await self._call(self._get_sync, client, offset, length)
            return self._validate(answer, offset, length)

        data = await call_with_retry(self.retry, attempt, name=self.name, stats=self.stats)
        self.stats.bytes += len(data)
        return data

    async def aclose(self) -> None:
        async with self._client_lock:
            client, self._client = self._client, None
        if client is not None and hasattr(client, "close"):
            await trio.to_thread.run_sync(client.close)
