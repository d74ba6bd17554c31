"""Cutting a dead letter to fit: what is kept, what is marked, and when nothing is cut."""

from __future__ import annotations

import hashlib

from consumer.tagging.dead_letters import (
    HEADERS_DROPPED_HEADER,
    KEY_BYTES_HEADER,
    ORIGINAL_BYTES_HEADER,
    SHA256_HEADER,
    SHRINK_STEPS,
    TRUNCATED_HEADER,
    connect_error_headers,
    is_truncated,
    shrink,
)


def _headers(own: list[tuple[str, str | bytes | None]]) -> list[tuple[str, str | bytes | None]]:
    return connect_error_headers("uploads", 0, 7, own, "decode", ValueError("bad"), "schema")


def test_a_dead_letter_that_already_fits_is_sent_as_it_is() -> None:
    """Refused only because it shared a batch with a large one: nothing to cut, nothing
    marked (a marked record is never replayed)."""
    headers = _headers([("trace", b"t")])
    assert shrink(b"k", b"small", headers, 0) == (b"k", b"small", headers)
    assert not is_truncated(headers)


def test_each_step_cuts_the_value_and_says_what_the_record_was() -> None:
    value = b"x" * 600_000
    headers = _headers([("trace", b"t" * 3000)])
    for step, limit in enumerate(SHRINK_STEPS):
        cut = shrink(b"k", value, headers, step)
        assert cut is not None
        key, body, out = cut
        h = dict(out)
        assert key == b"k" and body == value[:limit]
        assert h[TRUNCATED_HEADER] == b"true" and h[ORIGINAL_BYTES_HEADER] == b"600000"
        assert h[SHA256_HEADER] == hashlib.sha256(value).hexdigest().encode()
        assert h["__tagstream.errors.reason"] == b"schema"  # the error context always stays
        assert ("trace" in h) == (limit >= 3005)  # the record's own headers while they fit
        assert (HEADERS_DROPPED_HEADER in h) == (limit < 3005)
    assert shrink(b"k", value, headers, len(SHRINK_STEPS)) is None


def test_a_huge_key_and_a_huge_header_posing_as_an_error_header_are_cut_too() -> None:
    key = b"k" * 50_000
    headers = _headers([("__connect.errors.topic", b"h" * 50_000)])
    cut = shrink(key, b"v", headers, 1)
    assert cut is not None
    k, body, out = cut
    h = dict(out)
    assert k == key[: SHRINK_STEPS[1]] and body == b"v"
    assert h[KEY_BYTES_HEADER] == b"50000" and h[HEADERS_DROPPED_HEADER] == b"1"
    assert sum(len(n) + len(v or b"") for n, v in out) < 4096
    # at the last step the key keeps 1 KiB (the id a replay by --id looks for, mostly)
    last = shrink(key, b"v", headers, len(SHRINK_STEPS) - 1)
    assert last is not None and last[0] == key[:1024] and last[1] == b""
