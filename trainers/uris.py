"""Local paths and pyarrow.fs URIs (``s3://``, ``gs://``, ``file://``) opened one way, for
data readers, ``raysweep data convert`` and whatever else reads a user's location."""

from __future__ import annotations

import functools
import os

import pyarrow.fs as pafs

from trainers.configtools import user_path
from trainers.data import DataError

# S3 defaults retry for minutes on a dead endpoint; a refused request should say so in seconds.
# (The request timeout stays the SDK's: a shard's upload may take long.)
S3_CONNECT_TIMEOUT_S, S3_MAX_ATTEMPTS = 3.0, 3
# GCS retries for 15 minutes by default, so a machine without credentials or network hung a
# command's storage check that long. Arrow's GCS URIs take this option; a user's own wins.
GCS_RETRY_LIMIT_S = 10


def short(e: Exception, limit: int = 300) -> str:
    """An exception's text on one line, at most ``limit`` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "…"


def open_location(location: str, role: str = "data.root") -> tuple[pafs.FileSystem, str]:
    """A local path or a pyarrow.fs URI -> (filesystem, path in it). S3 gets short timeouts
    and few retries so that an unreachable endpoint is reported within seconds; errors name
    ``role`` (the option or key) and the location."""
    if "://" not in location:
        return pafs.LocalFileSystem(), str(user_path(location, role).resolve())
    try:
        gcs_default = location.startswith("gs://") and "?" not in location
        fs, path = pafs.FileSystem.from_uri(f"{location}?retry_limit_seconds={GCS_RETRY_LIMIT_S}"
                                            if gcs_default else location)
        if isinstance(fs, pafs.S3FileSystem) and "?" not in location:
            # from_uri cannot set timeouts, so rebuild it. from_uri reads AWS_ENDPOINT_URL
            # but the constructor does not (pyarrow 26): pass it on explicitly.
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            fs = pafs.S3FileSystem(region=fs.region, endpoint_override=endpoint,
                                   connect_timeout=S3_CONNECT_TIMEOUT_S,
                                   retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{role} {location!r}: cannot open ({short(e)})") from None
    return fs, path.rstrip("/")


def file_info(fs: pafs.FileSystem, path: str, location: str, role: str = "data.root") -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as e:  # unreachable endpoint, bad credentials, missing bucket
        raise DataError(f"{role} {location!r}: unreachable or not readable ({short(e)})") from None


def as_uri(location: str, path: str) -> str:
    """A path found on ``location``'s filesystem, written as a URI again where ``location``
    was one (``s3://bucket/a`` + ``bucket/a/b`` -> ``s3://bucket/a/b``)."""
    if "://" not in location or "://" in path:
        return path
    scheme = location.split("://", 1)[0]
    return f"{scheme}://{path}" if scheme == "file" else f"{scheme}://{path.lstrip('/')}"


@functools.lru_cache(maxsize=16)
def _filesystem_for(prefix: str) -> pafs.FileSystem:
    return open_location(prefix, "input")[0]


def _fs_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or URI; one filesystem object per bucket and process."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + rest.lstrip("/")
    return _filesystem_for(f"{scheme}://{bucket}"), rest


def read_bytes(uri: str) -> bytes:
    """The whole file at a local path or URI; raises OSError when it cannot be read."""
    fs, path = _fs_of(uri)
    with fs.open_input_file(path) as f:
        return f.read()


def open_parquet(uri: str):
    """A ``pyarrow.parquet.ParquetFile`` at a local path or URI (raises pyarrow's errors)."""
    import pyarrow.parquet as pq

    fs, path = _fs_of(uri)
    return pq.ParquetFile(fs.open_input_file(path))
