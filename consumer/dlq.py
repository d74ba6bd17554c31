"""`tagstream replay-dlq`: send chosen dead letters back to the topic they came from."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from tagsys.errors import TagstreamError

ERROR_HEADER_PREFIXES = ("__connect.errors.", "__tagstream.errors.")


@dataclass
class ReplayReport:
    scanned: int = 0
    matched: int = 0
    replayed: int = 0
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
    idle_timeout_s: float = 3.0,
    kafka: dict[str, Any] | None = None,
) -> ReplayReport:
    """Read the whole DLQ (no group offsets are touched), re-send the matching records.

    A record is re-sent with its original key, value and headers (the error-context headers
    are removed; `tagstream.replayed_from` says where it came from) to `to_topic`, or else to
    the topic named in its `__connect.errors.topic` header.
    """
    common = {"bootstrap.servers": bootstrap, "logger": logging.getLogger("librdkafka")} | (
        kafka or {}
    )
    consumer = Consumer(
        common
        | {
            "group.id": f"tagstream-replay-{time.time_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer(common | {"acks": "all", "enable.idempotence": True})
    report = ReplayReport()
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _m: Message) -> None:
        if err is not None:
            errors.append(str(err))

    try:
        md = consumer.list_topics(dlq_topic, timeout=10)
        topic_md = md.topics.get(dlq_topic)
        if topic_md is None or topic_md.error is not None:
            raise TagstreamError(f"dead-letter topic {dlq_topic!r} does not exist")
        consumer.assign(
            [TopicPartition(dlq_topic, p, OFFSET_BEGINNING) for p in topic_md.partitions]
        )
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < idle_timeout_s:
            if limit is not None and report.matched >= limit:
                break
            msgs = consumer.consume(500, 0.2)
            for m in msgs:
                if m.error() is not None:
                    continue
                idle_since = time.monotonic()
                report.scanned += 1
                headers = _headers(m)
                h = dict(headers)
                reason = h.get("__tagstream.errors.reason", b"").decode(errors="replace")
                key = (m.key() or b"").decode(errors="replace")
                if ids is not None and key not in ids:
                    continue
                if reasons is not None and reason not in reasons:
                    continue
                if limit is not None and report.matched >= limit:
                    break
                target = to_topic or h.get("__connect.errors.topic", b"").decode()
                if not target:
                    raise TagstreamError(
                        f"{dlq_topic}[{m.partition()}]@{m.offset()} names no source topic; "
                        "pass --to-topic"
                    )
                report.matched += 1
                report.by_reason[reason or "unknown"] += 1
                if dry_run:
                    continue
                kept: list[tuple[str, str | bytes | None]] = [
                    (k, v) for k, v in headers if not k.startswith(ERROR_HEADER_PREFIXES)
                ]
                kept.append(
                    (
                        "tagstream.replayed_from",
                        f"{dlq_topic}-{m.partition()}-{m.offset()}".encode(),
                    )
                )
                producer.produce(
                    target, key=m.key(), value=m.value(), headers=kept, on_delivery=on_delivery
                )
                producer.poll(0)
                report.replayed += 1
                report.by_target[target] += 1
        left = producer.flush(30)
        if left or errors:
            raise TagstreamError(
                f"{left} replayed records unsent, {len(errors)} failed: {errors[:3]}"
            )
    finally:
        consumer.close()
    return report
