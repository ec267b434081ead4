"""The reject record every job writes (preprocess, embed, evaluate, pretrain), and the one place where a
per-file exception becomes one.

    rec = reject({"id": "a", "source_path": "a.wav"}, "decode", "undecodable", "no decoder ...")
    rec = failure_reject(row, exc)            # any exception raised while reading one file -> a record

Records follow `clap_core.data.shards.REJECT_SCHEMA`: id, source_path, stage, reason, detail. `failure_reject`
turns bad data into a verdict: the project's AudioDecodeError keeps its reason, a MemoryError on hostile
bytes is `out_of_memory`, malformed files that crash a decoder library are `decode_error`, any other
OSError on one file is `io_error`. Storage faults are never a verdict on data: `failure_reject` applies
clap_core.io_faults' rule (transient and persistent faults are raised again, for the caller's retry or
stop), so every job follows it.
"""
from __future__ import annotations

from clap_core.audio.codec import AudioDecodeError
from clap_core.io_faults import is_data_error

REJECT_FIELDS = ("id", "source_path", "stage", "reason", "detail")
LENGTH_REASONS = ("too_long",)  # AudioDecodeError reasons that are validation verdicts (length rules)


def printable(text) -> str:
    """A string safe to store in a reject row: undecodable bytes shown as \\xNN."""
    if text is None:
        return ""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def reject(row: dict, stage: str, reason: str, detail: str = "") -> dict:
    """One reject record for `row` (anything with id / source_path)."""
    return {"id": printable(row.get("id")), "source_path": printable(row.get("source_path")), "stage": stage,
            "reason": reason, "detail": printable(detail)[:2000]}


def failure_reason(exc: BaseException, stage: str = "decode") -> tuple[str, str, str]:
    """(stage, reason, detail) for an exception raised while reading or decoding one file."""
    if isinstance(exc, AudioDecodeError):
        return ("validate" if exc.reason in LENGTH_REASONS else stage), exc.reason, exc.message
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError):
        return stage, "out_of_memory", detail
    if isinstance(exc, RecursionError):
        return stage, "too_deeply_nested", detail
    if isinstance(exc, OSError):
        return stage, "io_error", detail
    return stage, "decode_error", detail


def failure_reject(row: dict, exc: BaseException, stage: str = "decode") -> dict:
    """The reject record for one file whose reading raised `exc` (see the module docstring). A storage fault
    (clap_core.io_faults: transient or persistent) is no verdict on the data: it is raised again."""
    if not is_data_error(exc):
        raise exc
    return reject(row, *failure_reason(exc, stage))
