"""Where tables live: a local path or an object-store URI -> (pyarrow filesystem, path). No Ray, no torch.

The one place that turns a user's location into a filesystem: the shard reader, the output writer and the public
reader (schemas.reader) all call :func:`resolve_filesystem`.
"""
from __future__ import annotations

import functools
import os
import posixpath
import urllib.parse

import pyarrow.fs as pafs


class StorageError(OSError):
    """An output location that cannot be reached, read or written (no such bucket, no credentials, endpoint down):
    the jobs report it as one line naming the location."""


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or an object-store URI (s3://, gs://, hdfs://, file://).

    ``s3://`` honours the AWS SDK's endpoint variables ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
    (``http://127.0.0.1:9000`` for MinIO, moto or another S3-compatible store; pyarrow itself ignores them) with
    the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default us-east-1). Credentials come from the usual
    AWS sources (environment, ~/.aws, instance role), never from arguments.
    """
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            return _s3_at(endpoint, region), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), posixpath.abspath(uri) if not uri.startswith("/") else uri


@functools.lru_cache(maxsize=8)
def _s3_at(endpoint: str, region: str) -> pafs.S3FileSystem:
    """One S3FileSystem per (endpoint URL, region) and process: ``http(s)://host:port`` -> endpoint_override."""
    parsed = urllib.parse.urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    if not parsed.netloc:
        raise OSError(f"AWS_ENDPOINT_URL {endpoint!r} is not a URL like http://127.0.0.1:9000")
    return pafs.S3FileSystem(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme,
                             region=region)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


__all__ = ["StorageError", "first_line", "resolve_filesystem"]
