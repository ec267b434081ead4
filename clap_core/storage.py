"""Local folders and s3:// prefixes behind one small API (pyarrow.fs), with atomic commits.

    fs, path = resolve_fs("s3://bucket/run")        # or a local path
    put_atomic("s3://bucket/run/x.parquet", data)    # the object appears whole or not at all
    read_bytes(uri), read_range(uri, offset, size), list_files(uri), list_file_stats(uri), exists(uri), delete(uri)

S3 credentials, region and endpoint come from the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for S3-compatible servers
such as MinIO or moto) or the instance/role chain; nothing here logs or returns them.

Atomic commit: locally the bytes go to a hidden temp file in the destination folder (same
filesystem), are fsync'ed, and `os.replace` renames them onto the final name. On S3 a single PUT
(pyarrow switches to a multipart upload for large bodies, which S3 completes in one call) makes the
key visible only once complete, so a crash leaves either the old state or the whole new object.
Temp files of crashed local writes start with TEMP_PREFIX; `clean_temp_files` removes them.
A failed multipart upload is never completed, so readers never see part of an object; S3 keeps its
uploaded parts until the bucket's AbortIncompleteMultipartUpload lifecycle rule removes them.

Retries (set here, deliberately, for every S3 client of the project):
- pyarrow: AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS): the AWS SDK's "standard" mode
  (exponential backoff with jitter, a retry quota) retries 5xx, SlowDown/throttling, resets and
  timeouts; 403/404 are not retried, so a missing bucket or wrong credentials fail at once.
- botocore (`boto_config()`, for tools that use boto3): retries mode "standard", same max attempts.
- CLAP_S3_MAX_ATTEMPTS overrides the attempts (default 10: at 10% faulted requests a request fails
  for good with probability 1e-10; the backoff of 10 attempts adds up to a few seconds).
A transient error left after those attempts becomes io_faults.TransientIOError and a refusal
(bucket missing, access denied, bad key) io_faults.StorageAccessError, both naming the URI.
"""
from __future__ import annotations

import contextlib
import functools
import os
import uuid
from pathlib import Path
from typing import Iterator, NamedTuple

import pyarrow.fs as pafs

from clap_core.io_faults import PERSISTENT, TRANSIENT, StorageAccessError, TransientIOError, classify

TEMP_PREFIX = ".tmp-"  # name prefix of uncommitted local writes
S3_MAX_ATTEMPTS = int(os.environ.get("CLAP_S3_MAX_ATTEMPTS", "10"))  # per request, first try included
S3_CONNECT_TIMEOUT_S = 10.0  # a node that cannot open a connection in 10 s is retried, not waited for
S3_REQUEST_TIMEOUT_S = 120.0  # one request (a 10 MB part on a slow link fits)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


@functools.lru_cache(maxsize=4)
def s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    """One S3FileSystem per (endpoint, region) per process: building one costs a few ms and sockets."""
    kwargs = {"region": region} if region else {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    return pafs.S3FileSystem(
        **kwargs, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S,
        allow_delayed_open=True)  # small objects: one PutObject at close instead of a 3-request multipart


def boto_config():
    """botocore Config with the same retry policy as the pyarrow client (for code that uses boto3)."""
    from botocore.config import Config

    return Config(retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
                  connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_REQUEST_TIMEOUT_S)


@contextlib.contextmanager
def naming(uri: str):
    """Re-raise storage failures with the URI: refusals as StorageAccessError, exhausted retries as
    TransientIOError (FileNotFoundError and everything else unchanged)."""
    try:
        yield
    except (FileNotFoundError, StorageAccessError, TransientIOError):
        raise
    except OSError as e:
        verdict = classify(e)
        if verdict == PERSISTENT:
            raise StorageAccessError(f"{uri}: access refused (bucket missing, credentials or permissions): {e}") from e
        if verdict == TRANSIENT:
            raise TransientIOError(f"{uri}: I/O failed after the client's retries: {e}") from e
        raise


def check_access(uri: str) -> None:
    """Fail fast, on the driver, when an s3:// URI's bucket is missing or the credentials are refused."""
    if not is_s3(uri):
        return
    fs, path = resolve_fs(uri)
    bucket = path.split("/", 1)[0]
    with naming(uri):
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageAccessError(f"{uri}: bucket {bucket!r} does not exist (or these credentials cannot see it)")
        fs.get_file_info(path)  # credentials and permission on the prefix itself


def resolve_fs(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """'s3://bucket/prefix' or a local path -> (filesystem, path inside it, no trailing slash)."""
    uri = str(uri)
    if is_s3(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return s3_filesystem(endpoint, region), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def absolute(uri: str | os.PathLike) -> str:
    """s3:// URIs as they are; local paths made absolute here, on the driver, because Ray workers run in
    other working directories and would resolve a relative path somewhere else."""
    uri = str(uri)
    return uri if is_s3(uri) else str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with '/' (both s3:// and POSIX paths use it)."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def parent(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[0]


def exists(uri: str) -> bool:
    fs, path = resolve_fs(uri)
    with naming(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve_fs(uri)
    with naming(uri):
        return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    """Whole file; FileNotFoundError when absent (also on S3)."""
    fs, path = resolve_fs(uri)
    with naming(uri), fs.open_input_stream(path) as f:
        return f.read()


STREAM_BLOCK_BYTES = 8 << 20  # what iter_blocks reads at a time


def iter_blocks(uri: str) -> Iterator[bytes]:
    """The file's bytes in order, STREAM_BLOCK_BYTES at a time: a hash or a scan of a big file holds one block."""
    fs, path = resolve_fs(uri)
    with naming(uri), fs.open_input_stream(path) as f:
        while block := f.read(STREAM_BLOCK_BYTES):
            yield block


def read_range(uri: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` (a member of a tar shard) without reading the rest of the file."""
    fs, path = resolve_fs(uri)
    with naming(uri), fs.open_input_file(path) as f:
        return f.read_at(size, offset)


def file_size(uri: str) -> int:
    fs, path = resolve_fs(uri)
    with naming(uri):
        info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(uri)
    return int(info.size)


def put_atomic(uri: str, data: bytes) -> None:
    """Write `data` to `uri` so that readers see the old state or all of `data`, never a part."""
    fs, path = resolve_fs(uri)
    if is_s3(uri):
        with naming(uri), fs.open_output_stream(path) as f:  # a failed write is never completed: not visible
            f.write(data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class FileStat(NamedTuple):
    """A listed file: its URI, and the size and modification time that the listing itself carries (on S3 each
    LIST page holds them for 1000 keys: no request per file)."""
    uri: str
    size: int
    mtime_ns: int | None


def list_file_stats(uri: str, recursive: bool = True) -> list[FileStat]:
    """The files under a folder/prefix with their sizes and modification times, sorted by URI; [] when it does
    not exist."""
    fs, path = resolve_fs(uri)
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    with naming(uri):
        infos = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(FileStat(prefix + i.path, i.size, i.mtime_ns) for i in infos)


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """URIs of the files under a folder/prefix (sorted); [] when it does not exist."""
    return [stat.uri for stat in list_file_stats(uri, recursive)]


def delete(uri: str) -> None:
    """Remove one file; no error when it is already gone."""
    fs, path = resolve_fs(uri)
    try:
        with naming(uri):
            fs.delete_file(path)
    except FileNotFoundError:
        pass


def clean_temp_files(uri: str) -> list[str]:
    """Delete the leftovers of interrupted local writes under a folder; returns what was removed."""
    stray = [f for f in list_files(uri) if f.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)]
    for f in stray:
        delete(f)
    return stray


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy a local file or folder to `uri` (a local path or s3:// prefix); a no-op when both are the same place."""
    local = Path(local)
    fs, path = resolve_fs(uri)
    if isinstance(fs, pafs.LocalFileSystem) and local.resolve() == Path(path).resolve():
        return
    with naming(uri):
        fs.create_dir(path if local.is_dir() else str(Path(path).parent), recursive=True)
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def local_copy(uri: str, cache_root: str | None = None) -> str:
    """A local folder holding `uri`: the path itself, or an s3:// folder downloaded once into a cache.

    The cache is keyed by the URI and by what is there now (every object's name, size and modification time,
    one LIST): a folder written again at the same URI (a re-exported checkpoint) is downloaded again, never
    served stale. The download lands in a `.partial-<pid>` folder renamed into place, so a crash mid-download
    never leaves a half cache behind."""
    if not is_s3(uri):
        return uri
    import hashlib
    import tempfile

    remote, path = resolve_fs(uri)
    with naming(uri):
        infos = remote.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True))
    listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    root = cache_root or os.path.join(tempfile.gettempdir(), "clap-cache")
    target = os.path.join(root, hashlib.sha256(repr((uri, listing)).encode()).hexdigest()[:16])
    if not os.path.isdir(target):
        partial = f"{target}.partial-{os.getpid()}"
        os.makedirs(partial, exist_ok=True)  # copy_files creates no missing parent folder
        with naming(uri):
            pafs.copy_files(path, partial, source_filesystem=remote, destination_filesystem=pafs.LocalFileSystem())
        os.replace(partial, target)
    return target
