"""The confluent-kafka runtime: consume a batch, tag it, produce, commit what is safe.

At-least-once: an input offset is committed only when the tag event of that input and of
every earlier input of its partition has been acknowledged by the broker (OffsetTracker).
SIGTERM/SIGINT only set `stop`; the loop finishes the batch in flight, drains the producer,
commits and closes (quix-streams style).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.config import Settings
from consumer.core import TaggingCore
from consumer.events import DecodeError, UploadEvent, ce_headers, decode, now_iso
from consumer.health import HealthState
from consumer.metrics import Metrics
from tagsys.errors import TagstreamError

log = structlog.get_logger(__name__)
KAFKA_LOGGER = logging.getLogger("librdkafka")  # librdkafka's own log lines, via logging

TP = tuple[str, int]


class KafkaRuntimeError(TagstreamError):
    """A Kafka failure the loop cannot ride out; `code` is librdkafka's error code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class OffsetTracker:
    """Per partition, the offsets read but not finished; commit up to the lowest of them."""

    def __init__(self) -> None:
        self._inflight: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}

    def add(self, tp: TP, offset: int) -> None:
        self._inflight.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TP, offset: int) -> None:
        self._inflight.get(tp, set()).discard(offset)

    def pending(self) -> int:
        return sum(len(s) for s in self._inflight.values())

    def committable(self, only: set[TP] | None = None) -> dict[TP, int]:
        """Offsets (next to read) that may be committed and were not committed yet."""
        out: dict[TP, int] = {}
        for tp, nxt in self._next.items():
            if only is not None and tp not in only:
                continue
            inflight = self._inflight.get(tp)
            safe = min(inflight) if inflight else nxt
            if safe > self._committed.get(tp, -1):
                out[tp] = safe
        return out

    def mark_committed(self, offsets: dict[TP, int]) -> None:
        for tp, off in offsets.items():
            self._committed[tp] = max(self._committed.get(tp, -1), off)

    def unmark(self, tps: set[TP]) -> None:
        """A commit failed: let the next commit send these partitions again."""
        for tp in tps:
            self._committed.pop(tp, None)

    def forget(self, tps: set[TP]) -> None:
        for tp in tps:
            self._inflight.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)


def _where(m: Message) -> tuple[TP, int]:
    """(topic, partition), offset of a consumed record (never None for a record)."""
    topic, part, off = m.topic(), m.partition(), m.offset()
    assert topic is not None and part is not None and off is not None
    return (topic, part), off


@dataclass
class _Out:
    tp: TP
    offset: int
    key: bytes
    value: bytes
    headers: list[tuple[str, str | bytes | None]]
    decision: str
    input_ts_ms: int | None
    attempts: int = 0


class KafkaService:
    def __init__(
        self,
        settings: Settings,
        core: TaggingCore,
        metrics: Metrics,
        health: HealthState | None = None,
        *,
        max_produce_attempts: int = 5,
        drain_timeout_s: float = 60.0,
    ) -> None:
        self.s = settings
        self.core = core
        self.metrics = metrics
        self.health = health or HealthState(settings.max_poll_interval_ms / 1000)
        self.tracker = OffsetTracker()
        self.max_produce_attempts = max_produce_attempts
        self.drain_timeout_s = drain_timeout_s
        self._retry: list[_Out] = []
        self._failed: list[_Out] = []
        self.consumer = Consumer(self._consumer_conf())
        self.producer = Producer(self._producer_conf())

    # ---- configuration -------------------------------------------------------------------
    def _consumer_conf(self) -> dict[str, Any]:
        return self.s.kafka_common() | {
            "group.id": self.s.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": self.s.session_timeout_ms,
            "max.poll.interval.ms": self.s.max_poll_interval_ms,
            "statistics.interval.ms": 5000,
            "stats_cb": self._on_stats,
            "on_commit": self._on_commit,
            "error_cb": self._on_error,
            "logger": KAFKA_LOGGER,
        }

    def _producer_conf(self) -> dict[str, Any]:
        return self.s.kafka_common() | {
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "error_cb": self._on_error,
            "logger": KAFKA_LOGGER,
        }

    # ---- callbacks -----------------------------------------------------------------------
    def _on_stats(self, raw: str) -> None:
        try:
            stats = orjson.loads(raw)
            parts = stats.get("topics", {}).get(self.s.input_topic, {}).get("partitions", {})
            for pid, p in parts.items():
                lag = p.get("consumer_lag", -1)
                if pid != "-1" and lag is not None and lag >= 0:
                    self.metrics.lag.labels(topic=self.s.input_topic, partition=pid).set(lag)
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            log.warning("bad_librdkafka_stats")

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self.metrics.commits.labels(result="error" if err else "ok").inc()
        if err:
            log.warning("commit_failed", error=str(err))
            self.tracker.unmark({(p.topic, p.partition) for p in partitions})

    @staticmethod
    def _on_error(err: KafkaError) -> None:
        if err.fatal():
            log.error("kafka_fatal_error", error=str(err))
        else:
            log.warning("kafka_error", error=str(err))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions_assigned", partitions=[(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        log.info("partitions_revoked", partitions=sorted(revoked))
        # Work is finished batch by batch, so whatever is done here can be committed.
        self._drain()
        self._commit(asynchronous=False, only=revoked)
        self.tracker.forget(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {(p.topic, p.partition) for p in partitions}
        log.warning("partitions_lost", partitions=sorted(lost))
        self.tracker.forget(lost)

    def _on_delivery(self, out: _Out, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.metrics.produce_errors.inc()
            out.attempts += 1
            log.warning(
                "produce_failed",
                id=out.key.decode(errors="replace"),
                error=str(err),
                attempt=out.attempts,
            )
            (self._retry if out.attempts < self.max_produce_attempts else self._failed).append(out)
            return
        self.tracker.done(out.tp, out.offset)
        self.metrics.produced.labels(decision=out.decision).inc()
        if out.input_ts_ms:
            self.metrics.e2e_seconds.observe(max(0.0, time.time() - out.input_ts_ms / 1000))

    # ---- the loop ------------------------------------------------------------------------
    def run(self, stop: threading.Event, on_batch: Callable[[int], None] | None = None) -> None:
        """Consume until `stop` is set; then finish, commit and close. Raises on fatal errors."""
        self.consumer.subscribe(
            [self.s.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "consuming", topic=self.s.input_topic, group=self.s.group_id, output=self.s.output_topic
        )
        try:
            while not stop.is_set():
                msgs = self.consumer.consume(self.s.batch_size, self.s.batch_timeout_s)
                self.health.beat()
                n = self._handle(msgs)
                if on_batch is not None and n:
                    on_batch(n)
        finally:
            self.health.stopping = True
            try:
                self._drain()
                self._commit(asynchronous=False)
            finally:
                self.consumer.close()
                log.info("stopped", pending=self.tracker.pending())

    def _handle(self, msgs: list[Message]) -> int:
        records: list[Message] = []
        for m in msgs:
            err = m.error()
            if err is None:
                records.append(m)
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.fatal():
                raise KafkaRuntimeError(f"fatal consumer error: {err}", err.code())
            else:
                log.warning("consumer_error", error=str(err))
        if not records:
            self._commit(asynchronous=True)
            return 0
        self.metrics.batch_size.observe(len(records))
        good: list[tuple[Message, UploadEvent]] = []
        t0 = time.perf_counter()
        for m in records:
            tp, off = _where(m)
            self.tracker.add(tp, off)
            try:
                ev = decode(m.value(), max_bytes=self.s.max_event_bytes)
            except DecodeError as e:
                # Nothing to produce for it yet (the dead-letter topic comes in issue C):
                # counted, logged, and its offset may be committed.
                self.metrics.consumed.labels(outcome=e.reason).inc()
                log.warning(
                    "malformed_event",
                    topic=tp[0],
                    partition=tp[1],
                    offset=off,
                    reason=e.reason,
                    error=str(e),
                )
                self.tracker.done(tp, off)
                continue
            self.metrics.consumed.labels(outcome="ok").inc()
            good.append((m, ev))
        self.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - t0)
        results = self.core.process([ev for _, ev in good])
        t0 = time.perf_counter()
        stamp = now_iso()
        for (m, ev), res in zip(good, results, strict=True):
            ts_type, ts = m.timestamp()
            tp, off = _where(m)
            self._produce(
                _Out(
                    tp=tp,
                    offset=off,
                    key=ev.id.encode(),
                    value=orjson.dumps(self.core.to_payload(res)),
                    headers=ce_headers(
                        event_id=ev.id,
                        source_ref=f"{tp[0]}-{tp[1]}-{off}",
                        ce_source=self.s.ce_source,
                        time_iso=stamp,
                    ),
                    decision=res.decision.value,
                    input_ts_ms=ts if ts_type != 0 and ts > 0 else None,
                )
            )
        self._drain()
        self.metrics.stage_seconds.labels(stage="produce").observe(time.perf_counter() - t0)
        self._commit(asynchronous=True)
        return len(records)

    def _produce(self, out: _Out) -> None:
        while True:
            try:
                self.producer.produce(
                    self.s.output_topic,
                    key=out.key,
                    value=out.value,
                    headers=out.headers,
                    on_delivery=partial(self._on_delivery, out),
                )
                return
            except BufferError:
                self.producer.poll(0.1)  # local queue full: serve callbacks, then retry

    def _drain(self) -> None:
        """Wait until every produced event is acknowledged; re-send failures a few times."""
        deadline = time.monotonic() + self.drain_timeout_s
        while True:
            self.producer.flush(1.0)
            if self._failed:
                bad = self._failed[0]
                raise KafkaRuntimeError(
                    f"tag event for {bad.key.decode(errors='replace')} not acknowledged after "
                    f"{bad.attempts} attempts; not committing past it"
                )
            if self._retry:
                retry, self._retry = self._retry, []
                for out in retry:
                    self._produce(out)
                continue
            if len(self.producer) == 0:
                return
            if time.monotonic() > deadline:
                raise KafkaRuntimeError(f"producer not drained within {self.drain_timeout_s}s")

    def _commit(self, *, asynchronous: bool, only: set[TP] | None = None) -> None:
        offsets = self.tracker.committable(only)
        if not offsets:
            return
        tps = [TopicPartition(t, p, off) for (t, p), off in offsets.items()]
        try:
            if asynchronous:
                self.consumer.commit(offsets=tps, asynchronous=True)
            else:
                self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as e:
            self.metrics.commits.labels(result="error").inc()
            log.warning("commit_failed", error=str(e))
            return
        self.tracker.mark_committed(offsets)
