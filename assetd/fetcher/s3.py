"""The boto3 fetcher, and the one place botocore errors become AssetErrors.

Credentials come from boto3's default chain only. botocore's own retries
are off: the base class retries with one deadline across HEAD and GET.
"""

from __future__ import annotations

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
    Unavailable,
)
from assetd.fetcher.base import Body, Fetcher, ObjectChanged, ObjectMeta, RetryPolicy

__all__ = ["CLIENT_ERROR_CODES", "EXCEPTION_TYPES", "S3Fetcher", "translate_error"]

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

# botocore exception types (checked in order: subclasses first) -> error class.
EXCEPTION_TYPES: tuple[tuple[type[Exception], type[AssetError]], ...] = (
    (bce.NoCredentialsError, AccessDenied),
    (bce.PartialCredentialsError, AccessDenied),
    (bce.CredentialRetrievalError, AccessDenied),
    (bce.ConnectTimeoutError, Unavailable),
    (bce.ReadTimeoutError, Unavailable),
    (bce.EndpointConnectionError, Unavailable),
    (bce.ConnectionClosedError, Unavailable),
    (bce.ResponseStreamingError, Unavailable),
    (bce.IncompleteReadError, Unavailable),
    (bce.HTTPClientError, Unavailable),
    (bce.ParamValidationError, BadRequest),
)

_MESSAGES: dict[type[AssetError], str] = {
    NotFound: "object {uri} does not exist",
    AccessDenied: "access to {uri} was denied by S3",
    BadRequest: "S3 rejected the request for {uri} as invalid",
    Unavailable: "S3 is unavailable",
}
_SPECIAL = {
    "RequestTimeTooSkewed": "access to {uri} was denied by S3: host clock is skewed",
    "NoSuchBucket": "bucket of {uri} does not exist",
    "NoSuchVersion": "version of {uri} does not exist",
    "SlowDown": "S3 is throttling requests",
    "Throttling": "S3 is throttling requests",
}


def _uri(bucket: str, key: str, version_id: str | None) -> str:
    return f"s3://{bucket}/{key}" + (f" (version {version_id})" if version_id else "")


def translate_error(
    exc: BaseException, bucket: str, key: str, version_id: str | None = None
) -> AssetError | ObjectChanged:
    """Map a botocore/boto3 failure to the error tree. The only place that does."""
    uri = _uri(bucket, key, version_id)
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "412") or status == 412:
            return ObjectChanged(uri)
        cls = CLIENT_ERROR_CODES.get(code) or CLIENT_ERROR_CODES.get(str(status))
        if cls is None:
            cls = Unavailable if isinstance(status, int) and status >= 500 else InternalError
        template = _SPECIAL.get(code) or _MESSAGES.get(cls, "unexpected S3 error for {uri}")
        return cls(template.format(uri=uri), detail=f"{code} {status}: {err.get('Message', '')}")
    for etype, cls in EXCEPTION_TYPES:
        if isinstance(exc, etype):
            if cls is AccessDenied:
                return AccessDenied("no usable S3 credentials on the daemon", detail=str(exc))
            return cls(_MESSAGES[cls].format(uri=uri), detail=f"{type(exc).__name__}: {exc}")
    return InternalError("unexpected error while fetching from S3", detail=repr(exc))


class _S3Body:
    """A botocore StreamingBody, with its read errors translated."""

    def __init__(self, body: Any, meta: ObjectMeta) -> None:
        self._body = body
        self._meta = meta

    def readinto(self, buf: memoryview) -> int:
        try:
            return int(self._body.readinto(buf))
        except Exception as exc:
            raise translate_error(
                exc, self._meta.bucket, self._meta.key, self._meta.version_id
            ) from exc

    def close(self) -> None:
        self._body.close()


class S3Fetcher(Fetcher):
    """Fetch from AWS S3 or an S3-compatible engine through boto3."""

    def __init__(
        self,
        config: S3Config,
        *,
        session: boto3.session.Session | None = None,
        max_connections: int = 16,
    ) -> None:
        super().__init__(RetryPolicy(max_attempts=config.max_attempts))
        self.config = config
        self.session = session or boto3.session.Session()
        boto_config = BotoConfig(
            region_name=config.region,
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_connections,
            s3=cast(Any, {"addressing_style": config.addressing_style}),
            # we hash every byte ourselves; botocore's CRC pass would be a second one
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
        )
        self.client: Any = self.session.client(
            "s3", endpoint_url=config.endpoint_url, config=boto_config
        )

    def credential_source(self) -> str | None:
        """Which provider in boto3's chain found credentials (never the secrets)."""
        creds = self.session.get_credentials()
        return None if creds is None else str(getattr(creds, "method", "unknown"))

    def _head(self, bucket: str, key: str, version_id: str | None, deadline: float) -> ObjectMeta:
        args: dict[str, Any] = {"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if version_id:
            args["VersionId"] = version_id
        self._count("head")
        try:
            resp = self.client.head_object(**args)
        except Exception as exc:
            raise translate_error(exc, bucket, key, version_id) from exc
        vid = resp.get("VersionId")
        encrypted = resp.get("ServerSideEncryption", "AES256") != "AES256" or bool(
            resp.get("SSECustomerAlgorithm")
        )
        etag = str(resp.get("ETag", ""))
        return ObjectMeta(
            bucket=bucket,
            key=key,
            size=int(resp["ContentLength"]),
            etag=etag,
            version_id=vid if vid and vid != "null" else version_id,
            md5=ObjectMeta.md5_from_etag(etag, encrypted=encrypted),
            sha256=ObjectMeta.sha256_from_checksum(
                resp.get("ChecksumSHA256"), resp.get("ChecksumType")
            ),
        )

    def _open(self, meta: ObjectMeta, deadline: float) -> Body:
        args: dict[str, Any] = {"Bucket": meta.bucket, "Key": meta.key}
        if meta.etag:
            args["IfMatch"] = meta.etag
        if meta.version_id:
            args["VersionId"] = meta.version_id
        self._count("get")
        try:
            resp = self.client.get_object(**args)
        except Exception as exc:
            raise translate_error(exc, meta.bucket, meta.key, meta.version_id) from exc
        return _S3Body(resp["Body"], meta)
