"""The transient-I/O / storage-refusal / bad-data rule and the unit-level retry around it."""
from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from clap_core.audio.codec import AudioDecodeError
from clap_core.io_faults import (
    DATA,
    PERSISTENT,
    TRANSIENT,
    StorageAccessError,
    TransientIOError,
    classify,
    retry_transient,
)

# Messages as pyarrow's S3 filesystem raises them (read off a moto server behind tests/fixtures/s3_fault_proxy.py).
SLOW_DOWN = OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
RESET = OSError("When reading information for key 'k/x.wav' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                "HeadObject operation: curlCode: 56, Failure when receiving data from the peer")
INTERNAL = OSError("When uploading part for key 'big' in bucket 'b': AWS Error INTERNAL_FAILURE during UploadPart")
HEAD_503 = OSError("When reading information for key 'k/x.wav' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) "
                   "during HeadObject operation: No response body.")
DENIED = OSError("When reading information for key 'k/x.wav' in bucket 'b': AWS Error ACCESS_DENIED during "
                 "HeadObject operation: No response body.")
NO_BUCKET = OSError("When initiating multiple part upload for key 'k/z' in bucket 'nob': AWS Error NO_SUCH_BUCKET")


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "GetObject")


def chained(outer: Exception, cause: Exception) -> Exception:
    try:
        try:
            raise cause
        except Exception as e:
            raise outer from e
    except Exception as e:
        return e


@pytest.mark.parametrize("exc, verdict", [
    (SLOW_DOWN, TRANSIENT), (RESET, TRANSIENT), (HEAD_503, TRANSIENT), (INTERNAL, TRANSIENT),
    (client_error("SlowDown"), TRANSIENT), (client_error("503"), TRANSIENT), (client_error("InternalError"), TRANSIENT),
    (EndpointConnectionError(endpoint_url="http://x"), TRANSIENT), (ConnectionResetError(), TRANSIENT),
    (TimeoutError(), TRANSIENT), (OSError(errno.EIO, "Input/output error"), TRANSIENT),
    (OSError(errno.ESTALE, "Stale file handle"), TRANSIENT),
    (DENIED, PERSISTENT), (NO_BUCKET, PERSISTENT), (client_error("AccessDenied"), PERSISTENT),
    (client_error("InvalidAccessKeyId"), PERSISTENT), (PermissionError(errno.EACCES, "denied"), PERSISTENT),
    (FileNotFoundError(errno.ENOENT, "no such file"), DATA), (client_error("NoSuchKey"), DATA),
    (AudioDecodeError("undecodable", "no decoder recognises the data"), DATA), (ValueError("bad header"), DATA),
    (RuntimeError("Error opening <_io.BytesIO>: Format not recognised."), DATA),
    (chained(AudioDecodeError("truncated", "stream ended"), SLOW_DOWN), TRANSIENT),  # a decoder wrapping a read
    (chained(AudioDecodeError("missing_file", "no such object"), FileNotFoundError()), DATA),
    (chained(RuntimeError("decoder failed"), RESET), TRANSIENT),
])
def test_classify(exc, verdict):
    assert classify(exc) == verdict


class Flaky:
    """Raises the given exceptions in turn, then returns 'ok'."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_three_transient_failures_in_a_row_are_absorbed_with_growing_backoff():
    waits = []
    fn = Flaky(SLOW_DOWN, RESET, SLOW_DOWN)
    assert retry_transient(fn, what="unit train-00001", attempts=4, base_delay_s=1.0, sleep=waits.append) == "ok"
    assert fn.calls == 4 and len(waits) == 3
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0 and 2.0 <= waits[2] <= 4.0


def test_persisting_transient_failure_is_a_retryable_error_not_a_verdict():
    fn = Flaky(*[SLOW_DOWN] * 5)
    with pytest.raises(TransientIOError, match="unit train-00001.*re-run") as err:
        retry_transient(fn, what="unit train-00001", attempts=3, sleep=lambda s: None)
    assert fn.calls == 3 and classify(err.value) == TRANSIENT


def test_refusal_stops_at_once_and_data_errors_pass_through():
    fn = Flaky(DENIED)
    with pytest.raises(StorageAccessError, match="s3://b/k/x.wav"):
        retry_transient(fn, what="s3://b/k/x.wav", sleep=lambda s: None)
    assert fn.calls == 1
    bad = AudioDecodeError("undecodable", "nope")
    fn = Flaky(bad)
    with pytest.raises(AudioDecodeError) as err:
        retry_transient(fn, what="x", sleep=lambda s: None)
    assert err.value is bad and fn.calls == 1
