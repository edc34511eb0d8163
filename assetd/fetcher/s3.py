"""The S3 fetcher, and the one place S3 failures become AssetErrors.

boto3 does what it is good at: the default credential chain, endpoint and
addressing-style resolution, and SigV4 signing (as presigned URLs, which
live seconds). The bytes move over a small keep-alive pool of ``http.client``
connections: boto3's per-call overhead (~2 ms here) dominated small fetches,
and urllib3 copies every chunk of a large body once more than needed.

Everything that can fail at this boundary, an S3 error response, a socket
error or a botocore credential error, goes through :func:`translate_error`.
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, cast

import boto3
import botocore.exceptions as bce
from botocore.config import Config as BotoConfig

from assetd.config import S3Config
from assetd.errors import AccessDenied, AssetError, BadRequest, InternalError, NotFound, Unavailable
from assetd.fetcher.base import Body, Fetcher, ObjectChanged, ObjectMeta, RetryPolicy

__all__ = [
    "CLIENT_ERROR_CODES",
    "EXCEPTION_TYPES",
    "S3ErrorResponse",
    "S3Fetcher",
    "translate_error",
]

# S3 error codes (or bare HTTP statuses, which is all a HEAD gets) -> error class.
# Retryable classes are retried by the base fetcher; the rest end the fetch.
CLIENT_ERROR_CODES: dict[str, type[AssetError]] = {
    "404": NotFound,
    "NoSuchKey": NotFound,
    "NoSuchBucket": NotFound,
    "NoSuchVersion": NotFound,
    "NotFound": NotFound,
    "403": AccessDenied,
    "AccessDenied": AccessDenied,
    "Forbidden": AccessDenied,
    "InvalidAccessKeyId": AccessDenied,
    "SignatureDoesNotMatch": AccessDenied,
    "RequestTimeTooSkewed": AccessDenied,
    "ExpiredToken": AccessDenied,
    "InvalidToken": AccessDenied,
    "AccountProblem": AccessDenied,
    "AllAccessDisabled": AccessDenied,
    "KMS.AccessDeniedException": AccessDenied,
    "KMS.DisabledException": AccessDenied,
    "InvalidObjectState": AccessDenied,
    # wrong region or endpoint for the bucket: no retry helps until the config changes
    "301": AccessDenied,
    "PermanentRedirect": AccessDenied,
    "AuthorizationHeaderMalformed": AccessDenied,
    # HEAD or GET of a version that is a delete marker
    "405": NotFound,
    "MethodNotAllowed": NotFound,
    "400": BadRequest,
    "InvalidArgument": BadRequest,
    "InvalidRequest": BadRequest,
    "500": Unavailable,
    "502": Unavailable,
    "503": Unavailable,
    "504": Unavailable,
    "InternalError": Unavailable,
    "ServiceUnavailable": Unavailable,
    "SlowDown": Unavailable,
    "Throttling": Unavailable,
    "ThrottlingException": Unavailable,
    "RequestTimeout": Unavailable,
    "RequestLimitExceeded": Unavailable,
    "TooManyRequests": Unavailable,
    "429": Unavailable,
}

# Exception types (checked in order: subclasses first) -> error class.
EXCEPTION_TYPES: tuple[tuple[type[BaseException], type[AssetError]], ...] = (
    (bce.NoCredentialsError, AccessDenied),
    (bce.PartialCredentialsError, AccessDenied),
    (bce.CredentialRetrievalError, AccessDenied),
    (bce.ParamValidationError, BadRequest),
    (ssl.SSLError, Unavailable),
    (TimeoutError, Unavailable),
    (ConnectionError, Unavailable),
    (http.client.HTTPException, Unavailable),
    (OSError, Unavailable),
)

_MESSAGES: dict[type[AssetError], str] = {
    NotFound: "object {uri} does not exist",
    AccessDenied: "access to {uri} was denied by S3",
    BadRequest: "S3 rejected the request for {uri} as invalid",
    Unavailable: "S3 is unavailable",
}
_SPECIAL = {
    "RequestTimeTooSkewed": "access to {uri} was denied by S3: host clock is skewed",
    "PermanentRedirect": "S3 endpoint or region is wrong for the bucket of {uri}",
    "AuthorizationHeaderMalformed": "S3 endpoint or region is wrong for the bucket of {uri}",
    "301": "S3 endpoint or region is wrong for the bucket of {uri}",
    "NoSuchBucket": "bucket of {uri} does not exist",
    "NoSuchVersion": "version of {uri} does not exist",
    "SlowDown": "S3 is throttling requests",
    "Throttling": "S3 is throttling requests",
}
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")


class _NotModified(Exception):
    """A conditional HEAD answered 304: the object still has the ETag we hold."""


class S3ErrorResponse(Exception):
    """A non-2xx answer from S3: status plus the ``<Code>`` of its XML body, if any."""

    def __init__(self, status: int, code: str = "", message: str = "") -> None:
        super().__init__(f"{status} {code} {message}".strip())
        self.status = status
        self.code = code
        self.message = message


def _uri(bucket: str, key: str, version_id: str | None) -> str:
    return f"s3://{bucket}/{key}" + (f" (version {version_id})" if version_id else "")


def _from_status(status: int, code: str, uri: str, detail: str) -> AssetError | ObjectChanged:
    if code in ("PreconditionFailed", "412") or status == 412:
        return ObjectChanged(uri)
    cls = CLIENT_ERROR_CODES.get(code) or CLIENT_ERROR_CODES.get(str(status))
    if cls is None:
        cls = Unavailable if status >= 500 else InternalError
    template = _SPECIAL.get(code) or _MESSAGES.get(cls, "unexpected S3 error for {uri}")
    return cls(template.format(uri=uri), detail=detail)


def translate_error(
    exc: BaseException, bucket: str, key: str, version_id: str | None = None
) -> AssetError | ObjectChanged:
    """Map any failure at the S3 boundary to the error tree. The only place that does."""
    uri = _uri(bucket, key, version_id)
    if isinstance(exc, S3ErrorResponse):
        return _from_status(exc.status, exc.code, uri, f"{exc.status} {exc.code}: {exc.message}")
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(err.get("Code", ""))
        return _from_status(status, code, uri, f"{status} {code}: {err.get('Message', '')}")
    for etype, cls in EXCEPTION_TYPES:
        if isinstance(exc, etype):
            if cls is AccessDenied:
                return AccessDenied("no usable S3 credentials on the daemon", detail=str(exc))
            return cls(_MESSAGES[cls].format(uri=uri), detail=f"{type(exc).__name__}: {exc}")
    return InternalError("unexpected error while fetching from S3", detail=repr(exc))


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    netloc: str
    path: str


class _Pool:
    """Idle keep-alive connections per host; a connection is only ever used by one request."""

    def __init__(self, config: S3Config, size: int) -> None:
        self.config = config
        self.size = size
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            from botocore.httpsession import get_cert_path

            bundle = os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
            self._ssl = ssl.create_default_context(cafile=bundle or None)
        return self._ssl

    def get(self, target: _Target) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get((target.scheme, target.netloc))
            if idle:
                return idle.pop()
        timeout = self.config.connect_timeout_s
        if target.scheme == "https":
            return http.client.HTTPSConnection(
                target.netloc, timeout=timeout, context=self._ssl_context()
            )
        return http.client.HTTPConnection(target.netloc, timeout=timeout)

    def put(self, target: _Target, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault((target.scheme, target.netloc), [])
            if len(idle) < self.size:
                idle.append(conn)
                return
        conn.close()


class _HTTPBody:
    """A GET response body; its connection goes back to the pool once fully read."""

    def __init__(
        self,
        pool: _Pool,
        target: _Target,
        conn: http.client.HTTPConnection,
        resp: Any,
        meta: ObjectMeta,
    ) -> None:
        self._pool, self._target, self._conn, self._resp, self._meta = (
            pool,
            target,
            conn,
            resp,
            meta,
        )

    def readinto(self, buf: memoryview) -> int:
        try:
            return int(self._resp.readinto(buf))
        except Exception as exc:
            self._conn.close()
            raise translate_error(
                exc, self._meta.bucket, self._meta.key, self._meta.version_id
            ) from exc

    def close(self) -> None:
        if self._resp.isclosed() and not self._resp.will_close:
            self._pool.put(self._target, self._conn)
        else:
            self._conn.close()  # unread bytes left: the connection cannot be reused


class S3Fetcher(Fetcher):
    """Fetch from AWS S3 or an S3-compatible engine."""

    PRESIGN_EXPIRES_S = 300

    def __init__(
        self,
        config: S3Config,
        *,
        session: boto3.session.Session | None = None,
        max_connections: int = 16,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(retry or RetryPolicy(max_attempts=config.max_attempts))
        self.config = config
        self.session = session or boto3.session.Session()
        boto_config = BotoConfig(
            region_name=config.region,
            signature_version="s3v4",
            s3=cast(Any, {"addressing_style": config.addressing_style}),
        )
        self.client: Any = self.session.client(
            "s3", endpoint_url=config.endpoint_url, config=boto_config
        )
        self._pool = _Pool(config, max_connections)

    def credential_source(self) -> str | None:
        """Which provider in boto3's chain found credentials (never the secrets)."""
        creds = self.session.get_credentials()
        return None if creds is None else str(getattr(creds, "method", "unknown"))

    def _request(
        self,
        method: str,
        operation: str,
        params: dict[str, Any],
        headers: dict[str, str],
        deadline: float,
    ) -> tuple[_Target, http.client.HTTPConnection, Any]:
        """Sign, send and read the status line; non-2xx raises S3ErrorResponse."""
        url = self.client.generate_presigned_url(
            operation, Params=params, ExpiresIn=self.PRESIGN_EXPIRES_S
        )
        parts = urllib.parse.urlsplit(url)
        target = _Target(parts.scheme, parts.netloc, f"{parts.path}?{parts.query}")
        conn = self._pool.get(target)
        timeout = max(0.001, min(self.config.read_timeout_s, deadline - time.monotonic()))
        try:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            conn.timeout = min(self.config.connect_timeout_s, timeout)
            conn.request(method, target.path, headers=headers)
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            resp = conn.getresponse()
        except Exception:
            conn.close()
            raise
        if 200 <= resp.status < 300:
            return target, conn, resp
        try:
            body = resp.read() if method == "HEAD" else resp.read(64 * 1024)
        except Exception:
            conn.close()
            raise
        found = _ERROR_CODE.search(body)
        code = found.group(1).decode("utf-8", "replace") if found else ""
        if resp.isclosed() and not resp.will_close:
            self._pool.put(target, conn)
        else:
            conn.close()
        raise S3ErrorResponse(resp.status, code, resp.reason)

    def revalidate(self, bucket: str, key: str, etag: str, *, deadline: float) -> ObjectMeta | None:
        """A conditional HEAD (If-None-Match): 304 means unchanged, without a body."""
        try:
            meta = self._retrying(
                lambda: self._head(bucket, key, None, deadline, if_none_match=etag), deadline
            )
        except _NotModified:
            return None
        return meta

    def _head(
        self,
        bucket: str,
        key: str,
        version_id: str | None,
        deadline: float,
        *,
        if_none_match: str | None = None,
    ) -> ObjectMeta:
        params: dict[str, Any] = {"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if version_id:
            params["VersionId"] = version_id
        headers = {"x-amz-checksum-mode": "ENABLED"}
        if if_none_match:
            headers["If-None-Match"] = if_none_match
        self._count("head")
        try:
            target, conn, resp = self._request("HEAD", "head_object", params, headers, deadline)
            try:
                resp.read()
            except Exception:
                conn.close()
                raise
            self._pool.put(target, conn)
            size = int(resp.getheader("Content-Length", ""))
        except S3ErrorResponse as exc:
            if exc.status == 304 and if_none_match:
                raise _NotModified from None
            raise translate_error(exc, bucket, key, version_id) from exc
        except Exception as exc:
            raise translate_error(exc, bucket, key, version_id) from exc
        h = resp.getheader
        vid = h("x-amz-version-id")
        sse = h("x-amz-server-side-encryption")
        encrypted = (sse not in (None, "AES256")) or bool(
            h("x-amz-server-side-encryption-customer-algorithm")
        )
        etag = h("ETag", "")
        return ObjectMeta(
            bucket=bucket,
            key=key,
            size=size,
            etag=etag,
            version_id=vid if vid and vid != "null" else version_id,
            md5=ObjectMeta.md5_from_etag(etag, encrypted=encrypted),
            sha256=ObjectMeta.sha256_from_checksum(
                h("x-amz-checksum-sha256"), h("x-amz-checksum-type")
            ),
        )

    def _open(self, meta: ObjectMeta, deadline: float) -> Body:
        params: dict[str, Any] = {"Bucket": meta.bucket, "Key": meta.key}
        if meta.version_id:
            params["VersionId"] = meta.version_id
        headers = {"If-Match": meta.etag} if meta.etag else {}
        self._count("get")
        try:
            target, conn, resp = self._request("GET", "get_object", params, headers, deadline)
        except Exception as exc:
            raise translate_error(exc, meta.bucket, meta.key, meta.version_id) from exc
        return _HTTPBody(self._pool, target, conn, resp, meta)
