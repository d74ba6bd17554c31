"""Dead letters, for both runtimes: Kafka Connect's error headers, and a record that fits.

Every record the consumer can read must be dead-letterable, whatever its size. A dead letter
is the value plus the original headers plus the error headers, so it is larger than the
record it carries: the producers are sized for it (`producer_max_bytes`), and when a broker
still refuses it (a DLQ topic with a smaller `max.message.bytes`), `shrink` cuts the value
(and at last the original headers) step by step; headers then give the original size and
the sha256 of the whole value, so the record can be found again at its source. A key or a
header too large is cut as well: no part of a record may keep its dead letter out.
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
KEY_BYTES_HEADER = "__tagstream.errors.key.original.bytes"


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


def _ours(k: str, v: str | bytes | None) -> bool:
    """An error header `connect_error_headers` wrote (small by construction); a record's own
    header of that name and larger is treated as the record's, and may be dropped."""
    return k.startswith(ERROR_HEADER_PREFIXES) and len(v or b"") <= MAX_ERROR_MESSAGE * 4


def is_truncated(headers: Headers) -> bool:
    return any(k == TRUNCATED_HEADER for k, _ in headers)


DeadLetter = tuple[bytes | None, bytes | None, Headers]  # key, value, headers


def shrink(
    key: bytes | None, value: bytes | None, headers: Headers, step: int
) -> DeadLetter | None:
    """The dead letter cut to `SHRINK_STEPS[step]`: the value, the key and the record's own
    headers each to at most that (at least 1 KiB for the key), with headers saying what was
    cut; None past the last step. Nothing is marked when nothing had to be cut (a small dead
    letter refused only because it shared a batch with a large one stays whole).

    `key`, `value` and `headers` are always the full dead letter's, so the sha256 and the
    original size are those of the record as read."""
    if step >= len(SHRINK_STEPS):
        return None
    limit = SHRINK_STEPS[step]
    body = value or b""
    errors = [(k, v) for k, v in headers if _ours(k, v)]
    original = [(k, v) for k, v in headers if not _ours(k, v)]
    kept = original if limit and _size(original) <= limit else []
    key_limit = max(limit, 1024)
    if len(body) <= limit and len(kept) == len(original) and len(key or b"") <= key_limit:
        return key, value, headers
    out: Headers = [*kept, *errors]
    out += [
        (TRUNCATED_HEADER, b"true"),
        (ORIGINAL_BYTES_HEADER, str(len(body)).encode()),
        (SHA256_HEADER, hashlib.sha256(body).hexdigest().encode()),
    ]
    if len(kept) < len(original):
        out.append((HEADERS_DROPPED_HEADER, str(len(original) - len(kept)).encode()))
    if key is not None and len(key) > key_limit:
        out.append((KEY_BYTES_HEADER, str(len(key)).encode()))
        key = key[:key_limit]
    return key, (body[:limit] if value is not None else None), out
