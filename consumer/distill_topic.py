"""Read the decisions topic from the beginning to its end (for `distill --from-topic`)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition

from tagsys.errors import TagstreamError


def read_decisions(
    bootstrap: str, topic: str, *, idle_s: float = 3.0, timeout_s: float = 600.0
) -> list[dict[str, Any]]:
    """Every decision record, without joining a group (manual assignment, no commits).
    Stops after `idle_s` without a new record; a later record for the same id wins."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"tagstream-distill-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        md = c.list_topics(topic, timeout=10)
        if topic not in md.topics or md.topics[topic].error is not None:
            raise TagstreamError(f"topic {topic!r} does not exist on {bootstrap}")
        c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
        by_id: dict[str, dict[str, Any]] = {}
        last, start = time.monotonic(), time.monotonic()
        while time.monotonic() - last < idle_s and time.monotonic() - start < timeout_s:
            for m in c.consume(500, 0.5):
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise TagstreamError(f"reading {topic}: {err}")
                    continue
                last = time.monotonic()
                try:
                    rec = orjson.loads(m.value() or b"")
                except orjson.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "id" in rec:
                    by_id[str(rec["id"])] = rec
        return list(by_id.values())
    finally:
        c.close()
