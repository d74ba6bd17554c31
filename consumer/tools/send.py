"""Produce upload events from JSONL lines (`tagstream send`, the demo, the tests)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer

from tagsys.errors import TagstreamError


def event_key(line: bytes) -> bytes | None:
    """The event's id as the record key, when the line is a JSON object with a string id."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("id"), str):
        return str(obj["id"]).encode()
    return None


def send_lines(
    bootstrap: str, topic: str, lines: Iterable[bytes], extra: dict[str, Any] | None = None
) -> int:
    """Send each non-blank line as one record (malformed ones too: the service must cope)."""
    conf = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "linger.ms": 5,
        "logger": logging.getLogger("librdkafka"),
    }
    producer = Producer(conf | (extra or {}))
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(str(err))

    n = 0
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        while True:
            try:
                producer.produce(topic, key=event_key(line), value=line, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
        n += 1
    left = producer.flush(30)
    if left or errors:
        raise TagstreamError(f"{left} records unsent, {len(errors)} failed: {errors[:3]}")
    return n
