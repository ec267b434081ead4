"""The one rule that tells a transient I/O error from a storage fault from bad data.

    kind = classify(exc)          # "transient" | "persistent" | "data"
    marker = retry_transient(lambda: process_unit(...), what=unit["key"])

- "transient": the storage or the network failed this time (5xx, SlowDown/throttling, a reset or
  refused connection, a timeout, EIO/ESTALE on a network filesystem). It says nothing about the data:
  retry with backoff; if it still fails, raise `TransientIOError` and commit nothing for the unit, so
  a re-run of the same command redoes it. Never a reject row.
- "persistent": the storage refuses us (bucket missing, credentials wrong, permission denied). Retrying
  cannot help and it is not the data's fault either: stop the job now with `StorageAccessError`,
  naming the URI.
- "data": everything else — the bytes are what they are (undecodable, truncated, missing file the
  manifest names). The caller rejects the row with a reason.

The S3 clients already retry each request (clap_core.storage sets pyarrow's AwsStandardS3RetryStrategy
and botocore's "standard" mode to S3_MAX_ATTEMPTS); `retry_transient` is the outer layer for a whole
unit of work once a request has used up those attempts (e.g. one object answering 503 several times).
Errors are recognised along the whole exception chain (`raise ... from e`), so a decoder that wraps a
failed read is still seen as transient.
"""
from __future__ import annotations

import errno
import random
import re
import time
from typing import Callable, TypeVar

T = TypeVar("T")
TRANSIENT, PERSISTENT, DATA = "transient", "persistent", "data"

# AWS SDK (pyarrow: "AWS Error SLOW_DOWN during ...") and S3 REST (botocore ClientError code) error names.
TRANSIENT_AWS = {"SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "NETWORK_CONNECTION", "THROTTLING",
                 "REQUEST_TIMEOUT", "REQUEST_TIME_TOO_SKEWED", "SlowDown", "ServiceUnavailable", "InternalError",
                 "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                 "RequestLimitExceeded", "500", "502", "503", "504"}
PERSISTENT_AWS = {"ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "NO_SUCH_BUCKET",
                  "INVALID_CLIENT_TOKEN_ID", "EXPIRED_TOKEN", "MISSING_AUTHENTICATION_TOKEN", "AccessDenied",
                  "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "ExpiredToken",
                  "InvalidToken", "AllAccessDisabled", "AccountProblem", "403"}
TRANSIENT_ERRNO = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                   errno.ECONNABORTED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH,
                   errno.ESTALE, errno.EBUSY}
AWS_ERROR = re.compile(r"AWS Error ([A-Za-z_]+)")
HTTP_STATUS = re.compile(r"(?:HTTP response code|HTTP status|status code)[: ]+(\d{3})")  # HEAD: no body, no code
TRANSIENT_NAMES = {"ConnectionError", "ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError",
                   "ConnectTimeoutError", "IncompleteReadError", "ResponseStreamingError", "ProtocolError",
                   "IncompleteRead", "RemoteDisconnected"}


class TransientIOError(OSError):
    """Storage failed after every retry; the unit of work was left uncommitted and a re-run redoes it."""


class StorageAccessError(OSError):
    """The storage refuses the request (bucket missing, credentials wrong, permission denied): the job stops."""


def _one(exc: BaseException) -> str | None:
    """The verdict on one exception of a chain, or None when it says nothing about I/O."""
    if isinstance(exc, TransientIOError):
        return TRANSIENT
    if isinstance(exc, (StorageAccessError, PermissionError)):
        return PERSISTENT
    if isinstance(exc, FileNotFoundError):
        return DATA  # a missing input file is a property of the manifest, not of the network
    code = getattr(exc, "response", None)
    code = (code or {}).get("Error", {}).get("Code") if isinstance(code, dict) else None  # botocore ClientError
    text = str(exc)
    match = AWS_ERROR.search(text)
    status = HTTP_STATUS.search(text)
    for name in filter(None, [code, match and match.group(1), status and status.group(1)]):
        if name in PERSISTENT_AWS:
            return PERSISTENT
        if name in TRANSIENT_AWS or (name.isdigit() and name.startswith("5")):
            return TRANSIENT
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in TRANSIENT_NAMES:
        return TRANSIENT
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNO:
        return TRANSIENT
    return None


def classify(exc: BaseException) -> str:
    """"transient", "persistent" or "data" for an exception raised while reading or decoding one input."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        verdict = _one(exc)
        if verdict is not None:
            return verdict
        exc = exc.__cause__ or exc.__context__
    return DATA


def is_data_error(exc: BaseException) -> bool:
    """True when the exception is a verdict on the input itself (reject the row); False: re-raise it."""
    return classify(exc) == DATA


def retry_transient(fn: Callable[[], T], what: str, attempts: int = 4, base_delay_s: float = 1.0,
                    max_delay_s: float = 20.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """fn(), called again after a transient error with exponential backoff and jitter (1, 2, 4 s ...).

    Persistent storage errors become StorageAccessError at once; data errors and anything else pass
    through unchanged; transient errors left after `attempts` calls become TransientIOError naming `what`.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            verdict = classify(e)
            if verdict == PERSISTENT and not isinstance(e, StorageAccessError):
                raise StorageAccessError(f"{what}: storage refused the request ({e})") from e
            if verdict != TRANSIENT:
                raise
            if attempt == attempts:
                raise TransientIOError(f"{what}: transient I/O error persisted after {attempts} attempts, left "
                                       f"uncommitted (re-run the same command to finish it): {e}") from e
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1))
            sleep(delay * random.uniform(0.5, 1.0))  # jitter: many workers do not come back in step
    raise AssertionError("unreachable")
