"""The S3 fetcher, and the one place S3 failures become AssetErrors.

boto3 does what it is good at: the default credential chain, endpoint and
addressing-style resolution, SigV4 signing (as presigned URLs, which live
seconds), and the resolved transport settings (``ca_bundle``, ``proxies``).
The bytes move over :mod:`assetd.fetcher.transport`: boto3's per-call
overhead (~2 ms here) dominated small fetches, urllib3 copies every chunk of
a large body once more than needed, and neither bounds a trickling response
by a deadline.

Everything that can fail at this boundary, an S3 error response, a socket
error or a botocore credential error, goes through :func:`translate_error`.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import time
from collections import Counter
from typing import Any, cast

import boto3
import botocore.exceptions as bce
from botocore.config import Config as BotoConfig

from assetd.config import S3Config
from assetd.errors import (
    AccessDenied,
    AssetError,
    BadRequest,
    InternalError,
    NotFound,
    Timeout,
    Unavailable,
)
from assetd.fetcher.base import (
    CHECKSUM_ALGORITHMS,
    Fetcher,
    NotModified,
    ObjectChanged,
    ObjectMeta,
    PartResponse,
    RetryPolicy,
)
from assetd.fetcher.transport import (
    Aborted,
    BadResponse,
    Pool,
    ProxyResolver,
    RequestTimeout,
    Response,
)
from assetd.log import get_logger

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
    (RequestTimeout, Timeout),
    (BadResponse, Unavailable),
    (Aborted, Unavailable),
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
    Timeout: "S3 did not answer {uri} in time",
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


log = get_logger("assetd.fetcher.s3")
_CONTENT_RANGE = re.compile(r"^bytes (\d{1,20})-(\d{1,20})/(\d{1,20})$")


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
            if isinstance(exc, Aborted):
                return Unavailable("assetd is shutting down", detail=str(exc))
            return cls(_MESSAGES[cls].format(uri=uri), detail=f"{type(exc).__name__}: {exc}")
    return InternalError("unexpected error while fetching from S3", detail=repr(exc))


def _length(value: str | None) -> int:
    if value is None or not re.fullmatch(r"[0-9]{1,20}", value.strip()):
        raise BadResponse(f"invalid Content-Length {value!r}")
    return int(value.strip())


class _S3Part:
    """A GET's answer as the base fetcher sees it (a :class:`PartResponse`)."""

    def __init__(
        self, resp: Response, meta: ObjectMeta, start: int, end: int, read_timeout: float
    ) -> None:
        self._resp, self.meta, self.start, self.end = resp, meta, start, end
        self._read_timeout = read_timeout
        self.arrived = time.monotonic()  # made as soon as the headers are read

    def readinto(self, buf: memoryview) -> int:
        try:
            return self._resp.readinto(buf)
        except Exception as exc:
            self._resp.close()
            err = translate_error(exc, self.meta.bucket, self.meta.key, self.meta.version_id)
            raise err from exc

    def set_deadline(self, deadline: float) -> None:
        self._resp.set_deadline(deadline, self._read_timeout)

    def close(self) -> None:
        self._resp.release()  # kept alive only if the body was read to its end


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
        stopping: threading.Event | None = None,
        requests: Counter[str] | None = None,
    ) -> None:
        super().__init__(
            retry or RetryPolicy(max_attempts=config.max_attempts),
            part_size=config.part_size,
            max_concurrency=config.max_concurrency,
            stopping=stopping,
            requests=requests,
        )
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
        self._verify = self._resolved_verify()
        self._ssl: ssl.SSLContext | None = None
        self._pool = Pool(
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            ssl_context=self._ssl_context,
            proxies=ProxyResolver(getattr(self.client.meta.config, "proxies", None)),
            max_idle=max(max_connections, 2 * config.max_concurrency),
            stop=self.stopping,
        )

    def _resolved_verify(self) -> bool | str:
        """botocore's own answer: ca_bundle from the config file, AWS_CA_BUNDLE, or its default."""
        http_session = getattr(getattr(self.client, "_endpoint", None), "http_session", None)
        verify = getattr(http_session, "_verify", True)
        return verify if isinstance(verify, bool | str) else True

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            from botocore.httpsession import get_cert_path

            if self._verify is False:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx = ssl.create_default_context(
                    cafile=get_cert_path(cast(Any, self._verify)) or None
                )
            self._ssl = ctx
        return self._ssl

    # [s3] keys the transport is built from; the others (allowlists, limits) are policy
    TRANSPORT_KEYS = (
        "endpoint_url",
        "region",
        "addressing_style",
        "connect_timeout_s",
        "read_timeout_s",
        "max_attempts",
        "part_size",
        "max_concurrency",
    )

    def reconfigured(self, s3: S3Config) -> Fetcher:
        """A new fetcher (new client, pool and settings) if a transport key changed.

        Downloads in flight finish on this one; both share the stop flag and
        the request counters.
        """
        changed = [k for k in self.TRANSPORT_KEYS if getattr(s3, k) != getattr(self.config, k)]
        if not changed:
            return self
        log.info("reload: new S3 settings apply to new downloads", keys=changed)
        return S3Fetcher(
            s3,
            max_connections=self._pool.max_idle,
            stopping=self.stopping,
            requests=self.requests,
        )

    def abort(self) -> None:
        super().abort()
        self._pool.abort()

    def close(self) -> None:
        self._pool.close()

    def credential_source(self) -> str | None:
        """Which provider in boto3's chain found credentials (never the secrets)."""
        creds = self.session.get_credentials()
        return None if creds is None else str(getattr(creds, "method", "unknown"))

    def _send(
        self,
        method: str,
        operation: str,
        params: dict[str, Any],
        headers: dict[str, str],
        deadline: float,
    ) -> Response:
        """Sign, send and read the headers; non-2xx (except 304) raises S3ErrorResponse."""
        url = self.client.generate_presigned_url(
            operation, Params=params, ExpiresIn=self.PRESIGN_EXPIRES_S
        )
        resp = self._pool.request(method, url, headers, deadline)
        if 200 <= resp.status < 300 or resp.status == 304:
            return resp
        body = resp.read(64 * 1024)
        resp.release()
        found = _ERROR_CODE.search(body)
        code = found.group(1).decode("utf-8", "replace") if found else ""
        raise S3ErrorResponse(resp.status, code, resp.reason)

    def _meta(self, resp: Response, bucket: str, key: str, version_id: str | None, size: int,
              *, whole: bool) -> ObjectMeta:  # fmt: skip
        h = resp.header
        vid = h("x-amz-version-id")
        sse = h("x-amz-server-side-encryption")
        encrypted = (sse not in (None, "AES256")) or bool(
            h("x-amz-server-side-encryption-customer-algorithm")
        )
        etag = h("ETag") or ""
        full: tuple[tuple[str, str], ...] = ()
        composite: tuple[tuple[str, str], ...] = ()
        if whole:  # a ranged answer's checksum headers, if any, are not the object's
            full, composite = ObjectMeta.split_checksums(
                {a: h(f"x-amz-checksum-{a}") for a in CHECKSUM_ALGORITHMS},
                h("x-amz-checksum-type"),
            )
        return ObjectMeta(
            bucket=bucket,
            key=key,
            size=size,
            etag=etag,
            version_id=vid if vid and vid != "null" else version_id,
            md5=ObjectMeta.md5_from_etag(etag, encrypted=encrypted),
            checksums=full,
            composite=composite,
        )

    def _head(
        self,
        bucket: str,
        key: str,
        version_id: str | None,
        deadline: float,
        *,
        if_match: str | None = None,
    ) -> ObjectMeta:
        params: dict[str, Any] = {"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if version_id:
            params["VersionId"] = version_id
        headers = {"x-amz-checksum-mode": "ENABLED"}
        if if_match:
            headers["If-Match"] = if_match
        self._count("head")
        try:
            resp = self._send("HEAD", "head_object", params, headers, deadline)
            resp.release()
            if resp.status == 304:
                raise S3ErrorResponse(304, "", resp.reason)
            size = _length(resp.header("Content-Length"))
            return self._meta(resp, bucket, key, version_id, size, whole=True)
        except BadResponse as exc:
            log.warning("nonsense answer from S3", op="HEAD", error=str(exc))
            raise translate_error(exc, bucket, key, version_id) from exc
        except Exception as exc:
            raise translate_error(exc, bucket, key, version_id) from exc

    def _get(
        self,
        bucket: str,
        key: str,
        version_id: str | None,
        *,
        start: int,
        end: int | None,
        deadline: float,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> PartResponse:
        params: dict[str, Any] = {"Bucket": bucket, "Key": key}
        headers: dict[str, str] = {}
        if version_id:
            params["VersionId"] = version_id
        if start == 0:  # a whole-object answer then carries S3's full-object checksums
            params["ChecksumMode"] = "ENABLED"
            headers["x-amz-checksum-mode"] = "ENABLED"
        if end is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        elif start:
            headers["Range"] = f"bytes={start}-"
        if if_match:
            headers["If-Match"] = if_match
        if if_none_match:
            headers["If-None-Match"] = if_none_match
        self._count("get")
        try:
            resp = self._send("GET", "get_object", params, headers, deadline)
        except S3ErrorResponse as exc:
            if exc.status == 416 and start == 0 and end is not None:
                # an empty object has no byte 0: ask for all of it instead
                return self._get(
                    bucket, key, version_id, start=0, end=None, deadline=deadline,
                    if_match=if_match, if_none_match=if_none_match,
                )  # fmt: skip
            raise translate_error(exc, bucket, key, version_id) from exc
        except BadResponse as exc:
            log.warning("nonsense answer from S3", op="GET", error=str(exc))
            raise translate_error(exc, bucket, key, version_id) from exc
        except Exception as exc:
            raise translate_error(exc, bucket, key, version_id) from exc
        if resp.status == 304:
            resp.release()
            raise NotModified(key)
        try:
            meta, got_start, got_end = self._framing(
                resp, bucket, key, version_id, start=start, end=end
            )
        except BadResponse as exc:
            resp.close()
            log.warning("nonsense answer from S3", op="GET", error=str(exc),
                        content_range=resp.header("Content-Range"),
                        content_length=resp.header("Content-Length"))  # fmt: skip
            raise translate_error(exc, bucket, key, version_id) from exc
        return _S3Part(resp, meta, got_start, got_end, self.config.read_timeout_s)

    def _framing(
        self,
        resp: Response,
        bucket: str,
        key: str,
        version_id: str | None,
        *,
        start: int,
        end: int | None,
    ) -> tuple[ObjectMeta, int, int]:
        """Object metadata and the body's byte range, checked against the request."""
        if resp.length is None:
            raise BadResponse("GET answer without a Content-Length")
        length = resp.length
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.header("Content-Range") or "")
            if m is None:
                raise BadResponse(f"unusable Content-Range {resp.header('Content-Range')!r}")
            first, last, total = (int(g) for g in m.groups())
            want_last = min(end if end is not None else total, total) - 1
            if first != start or last != want_last or last - first + 1 != length:
                raise BadResponse(
                    f"Content-Range {first}-{last}/{total} (length {length}) "
                    f"does not answer bytes {start}-{want_last}"
                )
            size, got_end = total, last + 1
        elif resp.status == 200:
            if start != 0:
                raise BadResponse("a whole object answered a request for a range")
            size, got_end = length, length
        else:
            raise BadResponse(f"unexpected status {resp.status}")
        whole = start == 0 and got_end == size
        return self._meta(resp, bucket, key, version_id, size, whole=whole), start, got_end
