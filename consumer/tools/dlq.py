"""`tagstream replay-dlq`: send chosen dead letters back to the topic they came from.

One pass reads each DLQ partition up to its high watermark as seen at start, then stops: run
against a live service, a replayed record that fails again comes back to the DLQ *after*
that watermark, so it is not re-sent in the same pass (an idle timer never ends such a pass:
the record keeps coming back). `follow` keeps reading new dead letters until stopped, and
skips the ones that are themselves failed replays, so it never loops on one record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from consumer.tagging.dead_letters import (
    BROKER_DEFAULT_MAX_BYTES,
    ERROR_HEADER_PREFIXES,
    TRUNCATED_HEADER,
    producer_max_bytes,
)
from tagsys.errors import TagstreamError

log = structlog.get_logger(__name__)

REPLAYED_FROM_HEADER = "tagstream.replayed_from"
# errors that no amount of waiting fixes: reading stops with them
_PERMANENT = {
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
}


def scan_consumer(
    bootstrap: str, group_prefix: str, kafka: dict[str, Any] | None = None
) -> Consumer:
    """A consumer for `scan`: partition EOF events on, no commits (its group is never joined)."""
    return Consumer(
        {"bootstrap.servers": bootstrap, "logger": logging.getLogger("librdkafka")}
        | (kafka or {})
        | {
            "group.id": f"{group_prefix}-{time.time_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )


def scan(
    consumer: Consumer,
    topic: str,
    *,
    follow: bool = False,
    stop: threading.Event | None = None,
    stall_s: float = 60.0,
    poll_s: float = 0.2,
) -> Iterator[Message]:
    """Every record of `topic` from the beginning, by assignment: up to each partition's high
    watermark as read at start (a live topic keeps growing, and a pass must end), or on and on
    with `follow` until `stop` is set.

    A partition is done when its position reaches that watermark or a `_PARTITION_EOF`
    arrives: in a compacted or transactional topic the watermark may point past the last
    readable record. An empty partition is done at once. Without `follow`, `stall_s` with
    neither a record nor an end of partition raises (a broker gone away must not hang it).

    A broker whose offsets answer lags its fetch answers (the embedded Tansu reports the
    last batch's first offset + 1) would cut the pass short: the end is raised to the high
    watermark of the partition's first fetch, still fixed near the start (Kafka: the same or
    a few records later)."""
    md = consumer.list_topics(topic, timeout=10)
    topic_md = md.topics.get(topic)
    if topic_md is None or topic_md.error is not None:
        raise TagstreamError(f"topic {topic!r} does not exist")
    ends: dict[int, int] = {}
    for p in sorted(topic_md.partitions):
        if follow:
            ends[p] = -1  # never reached
            continue
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=10, cached=False
            )
        except KafkaException as e:
            raise TagstreamError(f"cannot read the high watermark of {topic}[{p}]: {e}") from e
        if high > low:
            ends[p] = high
    pending, fetched = set(ends), set[int]()
    if not pending:
        return
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(pending)])

    def first_fetch(p: int) -> None:
        """Raise the end to the first fetch's high watermark (see above), once."""
        fetched.add(p)
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
        if high > ends[p]:
            log.debug("scan_end_raised", topic=topic, partition=p, listed=ends[p], fetched=high)
            ends[p] = high

    def done(p: int) -> None:
        pending.discard(p)
        consumer.pause([TopicPartition(topic, p)])  # fetch no further

    progress = time.monotonic()
    while pending and not (stop is not None and stop.is_set()):
        for m in consumer.consume(500, poll_s):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    progress = time.monotonic()
                    if not follow and m.partition() in pending:
                        done(m.partition() or 0)
                elif err.fatal() or err.code() in _PERMANENT:
                    raise TagstreamError(f"reading {topic}: {err}")
                else:
                    log.warning("scan_error", topic=topic, error=str(err))
                continue
            p, offset = m.partition() or 0, m.offset() or 0
            if p not in pending:
                continue  # fetched before its partition was done
            if not follow:
                if p not in fetched:
                    first_fetch(p)
                if offset >= ends[p]:
                    done(p)  # arrived after the start: the next pass's
                    continue
            progress = time.monotonic()
            yield m
            if not follow and offset + 1 >= ends[p]:
                done(p)
        if not follow and pending and time.monotonic() - progress > stall_s:
            raise TagstreamError(
                f"no record and no end of partition from {topic} {sorted(pending)} "
                f"in {stall_s:.0f} s"
            )


@dataclass
class ReplayReport:
    scanned: int = 0
    matched: int = 0
    replayed: int = 0
    # matched the filters but not replayable: the dead letter's value was cut to fit
    skipped_truncated: int = 0
    # follow mode: dead letters of records that were themselves replays (failed again)
    skipped_replayed: int = 0
    by_target: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)


def _headers(m: Message) -> list[tuple[str, bytes]]:
    raw = m.headers() or []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in items]


def replay_dlq(
    bootstrap: str,
    dlq_topic: str,
    *,
    to_topic: str | None = None,
    ids: set[str] | None = None,
    reasons: set[str] | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    follow: bool = False,
    stop: threading.Event | None = None,
    stall_s: float = 60.0,
    kafka: dict[str, Any] | None = None,
    progress: Callable[[ReplayReport], None] | None = None,
) -> ReplayReport:
    """Read the DLQ (no group offsets are touched), re-send the matching records.

    Without `follow`: one pass, up to the high watermarks seen at start. With it: until
    `stop` is set, skipping dead letters that carry `tagstream.replayed_from` (a replay that
    failed again; a later one-pass run replays those). Dead letters whose value was cut to fit
    the DLQ are never replayed (the value is not whole): they are counted.

    A record is re-sent with its original key, value and headers (the error-context headers
    are removed; `tagstream.replayed_from` says where it came from) to `to_topic`, or else to
    the topic named in its `__connect.errors.topic` header. `progress` sees the report after
    each record read (follow mode runs until stopped: what it did so far is worth showing).
    """
    consumer = scan_consumer(bootstrap, "tagstream-replay", kafka)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "logger": logging.getLogger("librdkafka")}
        | (kafka or {})
        | {
            "acks": "all",
            "enable.idempotence": True,
            # a replayed record is as large as the input it was (up to a default broker's max)
            "message.max.bytes": producer_max_bytes(BROKER_DEFAULT_MAX_BYTES),
        }
    )
    report = ReplayReport()
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _m: Message) -> None:
        if err is not None:
            errors.append(str(err))

    def replay(m: Message) -> None:
        """Re-send one dead letter when it is chosen and replayable; count it either way."""
        headers = _headers(m)
        h = dict(headers)
        reason = h.get("__tagstream.errors.reason", b"").decode(errors="replace")
        key = (m.key() or b"").decode(errors="replace")
        if (ids is not None and key not in ids) or (reasons is not None and reason not in reasons):
            return
        if TRUNCATED_HEADER in h:
            report.skipped_truncated += 1
            return
        if follow and REPLAYED_FROM_HEADER in h:
            report.skipped_replayed += 1
            return
        target = to_topic or h.get("__connect.errors.topic", b"").decode()
        if not target:
            raise TagstreamError(
                f"{dlq_topic}[{m.partition()}]@{m.offset()} names no source topic; pass --to-topic"
            )
        report.matched += 1
        report.by_reason[reason or "unknown"] += 1
        if dry_run:
            return
        kept: list[tuple[str, str | bytes | None]] = [
            (k, v)
            for k, v in headers
            if not k.startswith(ERROR_HEADER_PREFIXES) and k != REPLAYED_FROM_HEADER
        ]
        kept.append((REPLAYED_FROM_HEADER, f"{dlq_topic}-{m.partition()}-{m.offset()}".encode()))
        producer.produce(
            target, key=m.key(), value=m.value(), headers=kept, on_delivery=on_delivery
        )
        producer.poll(0)
        report.replayed += 1
        report.by_target[target] += 1

    try:
        for m in scan(consumer, dlq_topic, follow=follow, stop=stop, stall_s=stall_s):
            if limit is not None and report.matched >= limit:
                break
            report.scanned += 1
            replay(m)
            if progress is not None:
                progress(report)
            if errors or (limit is not None and report.matched >= limit):
                break
        left = producer.flush(30)
        if left or errors:
            raise TagstreamError(
                f"{left} replayed records unsent, {len(errors)} failed: {errors[:3]}"
            )
    finally:
        consumer.close()
    return report
