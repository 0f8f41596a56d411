"""`S3Store`: the farm's storage on S3 and S3-compatible servers (MinIO, moto), via boto3.

One client per store, shared by threads (boto3 clients are thread-safe); botocore's standard
retry mode; request checksums only where required (some S3-compatible servers refuse the CRC
headers boto3 >= 1.36 sends by default); path-style addressing for custom endpoints.

First writer wins (`put_new`): a conditional PUT, `If-None-Match: *` (boto3's `IfNoneMatch`),
which AWS S3 (since 2024-08), MinIO and moto honour: the server stores the object only if the
key holds none, else answers 412 PreconditionFailed, and the bytes are dropped. 409
ConditionalRequestConflict (another conditional write to the key in flight) is retried until one
of them has won. A retry of our own PUT whose first try did land answers 412 as well: the
object is there either way. A server that ignores the header would silently replace objects;
`conditional_writes_honoured` tells (the worker checks it at start).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from farm.errors import InvalidJob, TransientError
from farm.storage.base import (
    DEFAULT_URL_EXPIRES,
    MAX_URL_EXPIRES,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    _check_prefix,
    _content_type,
    check_key,
    split_s3,
)

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_EXISTS = {"PreconditionFailed", "412"}
"""A conditional PUT (`If-None-Match: *`) refused because the key holds an object."""
_CONFLICT = {"ConditionalRequestConflict", "409"}
"""Another conditional write to the same key was in flight: try again."""

CONFLICT_ATTEMPTS = 5


def _transient_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


class S3Store(ObjectStore):
    """A bucket (and optional prefix) on AWS S3, MinIO or any S3-compatible server.

    One boto3 client per store, shared by every thread. Credentials come from the standard
    AWS chain. With `endpoint_url` set, path-style addressing is used (MinIO, moto).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        allow_foreign: bool = False,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
        max_pool_connections: int = 32,
    ) -> None:
        if not _BUCKET.match(bucket):
            raise InvalidJob(f"{bucket!r} is not a valid S3 bucket name", field="bucket")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.allow_foreign = allow_foreign
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            signature_version="s3v4",  # presigned URLs too (botocore may pick SigV2 for them)
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self.client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    def __repr__(self) -> str:
        return f"S3Store({self.uri('')!r}, endpoint_url={self.endpoint_url!r})"

    @contextmanager
    def _errors(self, what: str, key: str) -> Iterator[None]:
        """Map botocore's errors onto the farm's tree, naming the operation and the key."""
        where = f"s3://{self.bucket}/{key}" if not key.startswith("s3://") else key
        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            line = f"{what} {where}: {code or status} {err.get('Message', '')}".rstrip()
            if code in _NOT_FOUND:
                raise ObjectNotFound(f"{what} {where}: no such object") from e
            if code in _THROTTLED or _transient_status(status):
                raise TransientError(line) from e
            raise StorageError(line) from e
        except NoCredentialsError as e:
            raise StorageError(f"{what} {where}: no AWS credentials found ({e})") from e
        except (BotoConnectionError, HTTPClientError, IncompleteReadError) as e:
            raise TransientError(f"{what} {where}: storage unavailable ({e})") from e
        except BotoCoreError as e:
            raise StorageError(f"{what} {where}: {e}") from e

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (embedded and dev setups; production has one)."""
        with self._errors("head bucket", ""):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket"):
                    raise
            region = self.client.meta.region_name
            kwargs: dict[str, Any] = {}
            if region and region not in ("us-east-1", "aws-global"):
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self.client.create_bucket(Bucket=self.bucket, **kwargs)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        full = self._full(key)
        with self._errors("put", full):
            self.client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=data,
                ContentType=_content_type(key, content_type),
            )
        return self.uri(key)

    def put_new(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        full = self._full(key)
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=full,
                    Body=data,
                    ContentType=_content_type(key, content_type),
                    IfNoneMatch="*",
                )
                return True
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code in _EXISTS:
                    return False
                if code not in _CONFLICT or attempt == CONFLICT_ATTEMPTS - 1:
                    with self._errors("put", full):
                        raise
            except Exception:
                with self._errors("put", full):
                    raise
        raise AssertionError("unreachable")

    def conditional_writes_honoured(self, probe: str = "farm-probe/") -> bool:
        """Whether the server refuses a second `If-None-Match: *` PUT of one key (a server
        that ignores the header would let a superseded attempt replace results)."""
        key = f"{probe}conditional-{uuid.uuid4().hex}"
        try:
            return self.put_new(key, b"1") and not self.put_new(key, b"2")
        finally:
            self.delete(key)

    def get(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors("get", full):
            return self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()

    def exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            with self._errors("head", full):
                self.client.head_object(Bucket=self.bucket, Key=full)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        full = self.prefix + _check_prefix(prefix)
        keys: list[str] = []
        with self._errors("list", full):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                keys += [o["Key"][len(self.prefix) :] for o in page.get("Contents", ())]
        return sorted(k for k in keys if k and not k.endswith("/"))

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors("delete", full):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def url(self, key: str, expires: int = DEFAULT_URL_EXPIRES) -> str:
        if not 1 <= expires <= MAX_URL_EXPIRES:
            raise InvalidJob(
                f"expires must be 1 to {MAX_URL_EXPIRES} s, got {expires}", field="expires"
            )
        full = self._full(key)
        with self._errors("presign", full):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=expires
            )

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{check_key(key) if key else ''}"

    def key_of(self, uri: str) -> str | None:
        bucket, full = split_s3(uri)
        if bucket != self.bucket or not full.startswith(self.prefix):
            return None
        key = full[len(self.prefix) :]
        try:
            return check_key(key)
        except InvalidJob:
            return None

    def _get_foreign(self, uri: str, field: str | None) -> bytes:
        bucket, key = split_s3(uri)
        if not bucket or not key:
            raise InvalidJob(
                f"{field or 'uri'}: {uri!r} is not an s3://bucket/key URI", field=field
            )
        with self._errors("get", uri):
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
