"""Pieces of the Faust runtime without a broker: dead letters the broker refuses as too large,
lag series of partitions that come and go, liveness from progress."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import pytest
from aiokafka.errors import (  # type: ignore[import-untyped]
    KafkaConnectionError,
    MessageSizeTooLargeError,
)
from faust.exceptions import ProducerSendError
from faust.types import TP
from prometheus_client import CollectorRegistry

from consumer.service.faust_runtime import Progress, _on_dead_letter_acked, send_dead_letter, watch
from consumer.service.health import HealthState
from consumer.tagging.dead_letters import SHRINK_STEPS, connect_error_headers
from consumer.tagging.metrics import Metrics


class RefusingTopic:
    """A DLQ topic that refuses records over `limit` bytes, at send (the producer's check) or
    in the acknowledgement (the broker's MESSAGE_TOO_LARGE)."""

    def __init__(self, limit: int, where: str) -> None:
        self.limit, self.where = limit, where
        self.sent: list[tuple[bytes | None, list[tuple[str, bytes]]]] = []

    async def send(
        self,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Any,
        force: bool,
        timestamp: float | None = None,
    ) -> asyncio.Future[None]:
        size = len(value or b"") + sum(len(k) + len(v) for k, v in headers)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if size <= self.limit:
            self.sent.append((value, headers))
            fut.set_result(None)
        elif self.where == "send":  # what Faust raises for aiokafka's own check
            try:
                raise MessageSizeTooLargeError("too large")
            except MessageSizeTooLargeError as e:
                raise ProducerSendError("Error while sending") from e
        else:
            fut.set_exception(MessageSizeTooLargeError("broker: too large"))
        return fut


def _headers() -> Any:
    return connect_error_headers(
        "uploads", 0, 7, [("trace", b"t" * 3000)], "decode", ValueError("bad"), "schema"
    )


@pytest.mark.parametrize("where", ["send", "ack"])
def test_a_dead_letter_the_broker_refuses_is_sent_shrunk(where: str) -> None:
    value = b"x" * 600_000
    dlq = RefusingTopic(limit=20_000, where=where)
    cut = asyncio.run(send_dead_letter(dlq, b"k", value, _headers()))
    assert cut is True  # 256 KiB refused, 16 KiB (headers kept) fits
    [(body, headers)] = dlq.sent
    assert body == value[: SHRINK_STEPS[1]]
    h = dict(headers)
    assert h["__tagstream.errors.value.truncated"] == b"true"
    assert h["__tagstream.errors.value.original.bytes"] == b"600000"
    assert h["__tagstream.errors.value.sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert h["__tagstream.errors.reason"] == b"schema"


def test_dead_letters_are_counted_once_acknowledged_and_cut_ones_too() -> None:
    metrics = Metrics(CollectorRegistry())

    async def send(value: bytes) -> None:
        dlq = RefusingTopic(limit=20_000, where="ack")
        task = asyncio.ensure_future(send_dead_letter(dlq, None, value, _headers()))
        task.add_done_callback(_on_dead_letter_acked(metrics, "schema"))
        await task
        await asyncio.sleep(0)  # done callbacks run on the next loop turn

    asyncio.run(send(b"small"))
    asyncio.run(send(b"x" * 600_000))
    sample = metrics.registry.get_sample_value
    assert sample("tagstream_dlq_events_total", {"reason": "schema"}) == 2
    assert sample("tagstream_dlq_truncated_total") == 1


def test_a_dead_letter_that_fits_nowhere_fails_the_batch() -> None:
    value = b"x" * 10_000
    dlq = RefusingTopic(limit=10, where="ack")  # not even the error headers fit
    with pytest.raises(MessageSizeTooLargeError):
        asyncio.run(send_dead_letter(dlq, None, value, _headers()))
    assert dlq.sent == []


def test_other_send_errors_are_not_retried_shrunk() -> None:
    class Down:
        calls = 0

        async def send(self, **kw: Any) -> asyncio.Future[None]:
            Down.calls += 1
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_exception(KafkaConnectionError("down"))
            return fut

    with pytest.raises(KafkaConnectionError):
        asyncio.run(send_dead_letter(Down(), None, b"v", _headers()))
    assert Down.calls == 1


class FakeConsumer:
    """What `watch` reads of the Faust consumer: assignment, lag, fetch position, unacked."""

    def __init__(self) -> None:
        self.lags: dict[TP, int | None] = {}
        self.fetched: dict[TP, bool] = {}
        self.unacked: set[object] = set()

    def assignment(self) -> set[TP]:
        return set(self.lags)

    def lag(self, tp: TP) -> int | None:
        return self.lags[tp]

    async def caught_up(self, tp: TP) -> bool:
        return self.fetched.get(tp, True)


def test_lag_series_follow_the_assignment() -> None:
    metrics = Metrics(CollectorRegistry())
    progress = Progress(HealthState(max_poll_interval_s=10))
    c = FakeConsumer()
    c.lags = {TP("uploads", 0): 3, TP("uploads", 1): None, TP("other", 0): 9}

    def gauge(p: int) -> float | None:
        return metrics.registry.get_sample_value(
            "tagstream_consumer_lag_messages", {"topic": "uploads", "partition": str(p)}
        )

    asyncio.run(watch(c, "uploads", metrics, progress))
    assert (gauge(0), gauge(1)) == (3, None)  # None: no commit known yet, no series
    c.lags = {TP("uploads", 1): 0}  # partition 0 revoked: its series goes
    asyncio.run(watch(c, "uploads", metrics, progress))
    assert (gauge(0), gauge(1)) == (None, 0)


def test_alive_only_through_progress_or_idleness() -> None:
    metrics = Metrics(CollectorRegistry())
    health = HealthState(max_poll_interval_s=10)
    progress = Progress(health, queue=asyncio.Queue())
    c = FakeConsumer()
    c.lags = {TP("uploads", 0): 5}  # lag by the commit: not what idleness is judged by

    def stalled() -> None:
        health.last_poll = time.monotonic() - 60  # no beat for longer than max.poll

    def idle() -> bool:
        return asyncio.run(watch(c, "uploads", metrics, progress))

    stalled()
    assert idle() and health.alive()  # fetched to the end, nothing buffered: idle
    stalled()
    c.fetched = {TP("uploads", 0): False}  # records left to fetch: not idle
    assert not idle() and not health.alive()
    c.fetched = {}
    c.unacked = {object()}  # taken from the topic, not acked yet: not idle
    assert not idle()
    c.unacked = set()
    progress.queue.put_nowait(object())  # fetched, waiting for a batch: not idle
    assert not idle()
    progress.queue.get_nowait()
    progress.started()  # a batch running, however long: no beat but its own end
    assert not idle() and not health.alive()
    progress.finished()
    assert health.alive()
