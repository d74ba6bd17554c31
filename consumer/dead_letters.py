"""Dead letters, for both runtimes: Kafka Connect's error headers, and a record that fits.

Every record the consumer can read must be dead-letterable, whatever its size. A dead letter
is the value plus the original headers plus the error headers, so it is larger than the
record it carries: the producers are sized for it (`producer_max_bytes`), and when a broker
still refuses it (a DLQ topic with a smaller `max.message.bytes`), `shrink` cuts the value
(and at last the original headers) step by step; headers then give the original size and
the sha256 of the whole value, so the record can be found again at its source.
"""

from __future__ import annotations

import hashlib
from typing import Any

Headers = list[tuple[str, str | bytes | None]]

MAX_ERROR_MESSAGE = 2000
ERROR_HEADER_PREFIXES = ("__connect.errors.", "__tagstream.errors.")
# Kafka's and Redpanda's default broker limit (message.max.bytes: 1 MiB + 12): the largest
# record a consumer reads from a cluster left at its defaults
BROKER_DEFAULT_MAX_BYTES = 1_048_588
# what a dead letter adds to the record it carries: error headers (the exception message is
# capped at MAX_ERROR_MESSAGE), record and batch overhead
DEAD_LETTER_HEADROOM = 64 * 1024
# the value is cut to these sizes in turn when a broker refuses the dead letter; at 0 the
# original headers go too
SHRINK_STEPS = (256 * 1024, 16 * 1024, 1024, 0)
TRUNCATED_HEADER = "__tagstream.errors.value.truncated"
ORIGINAL_BYTES_HEADER = "__tagstream.errors.value.original.bytes"
SHA256_HEADER = "__tagstream.errors.value.sha256"
HEADERS_DROPPED_HEADER = "__tagstream.errors.headers.dropped"


def producer_max_bytes(max_event_bytes: int) -> int:
    """`message.max.bytes` for a producer that dead-letters: room for the largest record a
    default broker serves (or `max_event_bytes`, if larger) plus the dead letter's headers.
    librdkafka's own default (1,000,000) is below a 1 MiB record with its headers."""
    return max(max_event_bytes, BROKER_DEFAULT_MAX_BYTES) + DEAD_LETTER_HEADROOM


def connect_error_headers(
    topic: str,
    partition: int,
    offset: int,
    original: Any,
    stage: str,
    exc: BaseException,
    reason: str,
) -> Headers:
    """The original headers plus Kafka Connect's error context headers (both runtimes)."""
    cls = type(exc)
    raw = original or []
    headers: Headers = list(raw.items() if isinstance(raw, dict) else raw)
    headers += [
        ("__connect.errors.topic", topic.encode()),
        ("__connect.errors.partition", str(partition).encode()),
        ("__connect.errors.offset", str(offset).encode()),
        ("__connect.errors.stage", stage.encode()),
        ("__connect.errors.exception.class.name", f"{cls.__module__}.{cls.__qualname__}".encode()),
        ("__connect.errors.exception.message", str(exc)[:MAX_ERROR_MESSAGE].encode()),
        ("__tagstream.errors.reason", reason.encode()),
    ]
    return headers


def _size(headers: Headers) -> int:
    return sum(len(k) + len(v or b"") for k, v in headers)


def is_truncated(headers: Headers) -> bool:
    return any(k == TRUNCATED_HEADER for k, _ in headers)


def shrink(value: bytes | None, headers: Headers, step: int) -> tuple[bytes | None, Headers] | None:
    """The dead letter cut to `SHRINK_STEPS[step]` (value, and original headers once they
    are larger than that), with headers saying what was cut; None past the last step.

    `value` and `headers` are the full dead letter's (shrinking always starts from them, so
    the sha256 and the original size are those of the record as read)."""
    if step >= len(SHRINK_STEPS):
        return None
    limit = SHRINK_STEPS[step]
    body = value or b""
    errors = [(k, v) for k, v in headers if k.startswith(ERROR_HEADER_PREFIXES)]
    original = [(k, v) for k, v in headers if not k.startswith(ERROR_HEADER_PREFIXES)]
    kept = original if limit and _size(original) <= limit else []
    out: Headers = [*kept, *errors]
    out += [
        (TRUNCATED_HEADER, b"true"),
        (ORIGINAL_BYTES_HEADER, str(len(body)).encode()),
        (SHA256_HEADER, hashlib.sha256(body).hexdigest().encode()),
    ]
    if len(kept) < len(original):
        out.append((HEADERS_DROPPED_HEADER, str(len(original) - len(kept)).encode()))
    return (body[:limit] if value is not None else None), out
