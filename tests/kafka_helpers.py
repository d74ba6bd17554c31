"""Helpers for tests against the embedded broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from consumer.broker import create_topics
from consumer.config import Settings
from consumer.core import TaggingCore
from consumer.demo import sample_events
from consumer.runner import KafkaService


def make_topics(bootstrap: str, partitions: int, prefix: str = "") -> None:
    """uploads, tags and uploads.dlq (the service checks they exist)."""
    create_topics(
        bootstrap,
        {f"{prefix}uploads": partitions, f"{prefix}tags": partitions, f"{prefix}uploads.dlq": 1},
    )


def make_events(n: int, prefix: str = "ev") -> list[bytes]:
    base = [orjson.loads(line) for line in sample_events()]
    out = []
    for i in range(n):
        ev = dict(base[i % len(base)])
        ev["id"] = f"{prefix}-{i:05d}"
        out.append(orjson.dumps(ev))
    return out


def settings_for(bootstrap: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "input_topic": "uploads",
        "output_topic": "tags",
        "group_id": "tagstream-test",
        "session_timeout_ms": 6000,
        "metrics_port": 0,
        "batch_size": 32,
    }
    return Settings(**(base | kw))


@contextmanager
def running(service: KafkaService) -> Iterator[threading.Event]:
    """Run the service in a thread; on exit, stop it and re-raise anything it raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            service.run(stop)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(60)
        assert not t.is_alive(), "service did not stop within 60 s"
        if errors:
            raise errors[0]


def service(settings: Settings, core: TaggingCore) -> KafkaService:
    return KafkaService(settings, core, core.metrics)


class TopicReader:
    """Reads a whole topic by assignment (no consumer group, so no join wait)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{time.time_ns()}",
                "enable.auto.commit": False,
            }
        )
        md = self.consumer.list_topics(topic, timeout=10)
        parts = md.topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.records: list[Any] = []
        self.keys: set[bytes] = set()

    def poll(self, timeout_s: float = 0.2) -> int:
        for m in self.consumer.consume(500, timeout_s):
            if m.error() is None:
                self.records.append(m)
                self.keys.add(m.key() or b"")
        return len(self.records)

    def close(self) -> None:
        self.consumer.close()


def read_topic(
    bootstrap: str, topic: str, *, expect: int, timeout_s: float = 60.0, settle_s: float = 0.0
) -> list[Any]:
    """All records of `topic`, once `expect` distinct keys arrived (+settle), or at timeout."""
    reader = TopicReader(bootstrap, topic)
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            reader.poll()
            if len(reader.keys) >= expect:
                if settle_until is None:
                    settle_until = time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
    finally:
        reader.close()
    return reader.records


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return sum(max(tp.offset, 0) for tp in tps)
