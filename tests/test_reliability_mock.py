"""Loss and stall paths on librdkafka's mock cluster (correct watermarks, injected faults):
dead letters the broker refuses, unreadable records, decision records holding the commit,
lag series, commit results, lost partitions, a producer that keeps failing or is stuck."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from consumer.service.runner import KafkaRuntimeError, KafkaService, _Out
from consumer.tagging.core import TaggingCore
from consumer.tagging.dead_letters import (
    ORIGINAL_BYTES_HEADER,
    SHA256_HEADER,
    SHRINK_STEPS,
    TRUNCATED_HEADER,
)
from consumer.tagging.metrics import Metrics
from consumer.tools.send import send_lines
from models_onnx import OnnxEncoder
from tagsys import TagSystem
from tests.conftest import FakeOpenAI, Reply, Responder, answer_first
from tests.kafka_helpers import (
    committed_reaches,
    committed_total,
    ids_of,
    llm_core,
    make_events,
    metric,
    read_topic,
    running,
    settings_for,
    wait_until,
)
from tests.mock_cluster import (
    ERR_MSG_SIZE_TOO_LARGE,
    ERR_UNKNOWN_MEMBER_ID,
    HEARTBEAT,
    PRODUCE,
    MockCluster,
)


@pytest.fixture
def cluster(mock_cluster: MockCluster) -> MockCluster:
    return mock_cluster  # topics per test (`_topics`)


def _topics(mc: MockCluster, partitions: int, *extra: str) -> None:
    mc.create_topics({"uploads": partitions, "tags": partitions, "uploads.dlq": 1})
    mc.create_topics({topic: 1 for topic in extra})


def _lag(core: TaggingCore, labels: dict[str, str]) -> float | None:
    """None once the series is removed."""
    return core.metrics.registry.get_sample_value("tagstream_consumer_lag_messages", labels)


def _core(encoder: OnnxEncoder, ts: TagSystem, **kw: Any) -> TaggingCore:
    return TaggingCore(encoder, ts, metrics=Metrics(CollectorRegistry()), **kw)


def test_dead_letters_too_large_for_producer_or_broker_go_out_truncated(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    """A record whose dead letter is over the producer's limit (refused synchronously) and
    one the broker refuses as too large: both are dead-lettered cut, with headers saying so;
    nothing stops, everything is committed."""
    _topics(cluster, 1)
    huge = b'{"id": 1, "caption": "' + b"y" * 1_200_000 + b'"}'  # over producer_max_bytes
    big = b'{"id": 5, "caption": "' + b"x" * 999_700 + b'"}'
    p = Producer({"bootstrap.servers": cluster.bootstrap, "message.max.bytes": 2_000_000})
    p.produce("uploads", key=b"huge", value=huge)
    p.produce("uploads", key=b"big", value=big)
    assert p.flush(10) == 0
    # the broker refuses the service's first two produce requests as too large (as a DLQ
    # topic with a smaller max.message.bytes would): each refusal cuts the dead letters
    cluster.push_request_errors(PRODUCE, ERR_MSG_SIZE_TOO_LARGE, ERR_MSG_SIZE_TOO_LARGE)
    core = _core(encoder, sample_ts)
    svc = KafkaService(settings_for(cluster.bootstrap), core, core.metrics)
    with running(svc):
        dlq = read_topic(cluster.bootstrap, "uploads.dlq", expect=2, timeout_s=60)
        assert committed_reaches(cluster.bootstrap, "tagstream-test", 1, 2)
    by_key = {m.key(): m for m in dlq}
    assert set(by_key) == {b"huge", b"big"}
    for key, original, reason in ((b"huge", huge, b"oversize"), (b"big", big, b"schema")):
        m = by_key[key]
        h = dict(m.headers())
        assert h["__tagstream.errors.reason"] == reason
        assert h[TRUNCATED_HEADER] == b"true"
        assert int(h[ORIGINAL_BYTES_HEADER]) == len(original)
        assert h[SHA256_HEADER] == hashlib.sha256(original).hexdigest().encode()
        assert original.startswith(m.value()) and len(m.value()) in SHRINK_STEPS
    # `huge` is cut synchronously at least once (its dead letter is over the producer limit)
    assert len(by_key[b"huge"].value()) <= SHRINK_STEPS[0]
    assert metric(core, "tagstream_dlq_truncated_total") == 2
    core.close()


class _Proxy:
    """The real consumer, with a method or two of a test's own."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _ConsumerWithErrors(_Proxy):
    """The real consumer, except that the record at `offset` comes back as librdkafka's
    error event for it (what a corrupt batch or a failed decompression looks like)."""

    def __init__(self, real: Any, offset: int) -> None:
        super().__init__(real)
        self._offset = offset

    def consume(self, num: int, timeout: float) -> list[Message]:
        out = []
        for m in self._real.consume(num, timeout):
            if m.error() is None and m.offset() == self._offset:
                err = KafkaError(KafkaError._BAD_MSG, "corrupt record")
                m = Message(topic=m.topic(), partition=m.partition(), offset=m.offset(), error=err)
            out.append(m)
        return out


def test_an_unreadable_record_is_dead_lettered_before_the_commit_passes_it(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    _topics(cluster, 1)
    events = make_events(30)
    send_lines(cluster.bootstrap, "uploads", events)
    core = _core(encoder, sample_ts)
    svc = KafkaService(settings_for(cluster.bootstrap), core, core.metrics)
    svc.consumer = _ConsumerWithErrors(svc.consumer, 12)  # type: ignore[assignment]
    with running(svc):
        (dead,) = read_topic(cluster.bootstrap, "uploads.dlq", expect=1, timeout_s=60)
        out = read_topic(cluster.bootstrap, "tags", expect=29, timeout_s=60)
        assert committed_reaches(cluster.bootstrap, "tagstream-test", 1, 30)
    h = dict(dead.headers())
    assert dead.value() is None
    assert h["__connect.errors.offset"] == b"12" and h["__connect.errors.stage"] == b"consume"
    assert h["__tagstream.errors.reason"] == b"consume_error"
    assert b"corrupt record" in h["__connect.errors.exception.message"]
    lost_id = orjson.loads(events[12])["id"]
    assert {m.key().decode() for m in out} == ids_of(events) - {lost_id}
    assert metric(core, "tagstream_events_consumed_total", {"outcome": "consume_error"}) == 1
    core.close()


def test_a_decision_record_not_acknowledged_holds_back_its_input(
    cluster: MockCluster,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """The decisions topic lives on a broker that is down: tag events go out, but no input
    is committed until its decision record is acknowledged too."""
    _topics(cluster, 1, "decisions")
    cluster.set_group_coordinator("tagstream-test", 1)
    cluster.set_leader("uploads", 0, 1)
    cluster.set_leader("tags", 0, 1)
    cluster.set_leader("uploads.dlq", 0, 1)
    cluster.set_leader("decisions", 0, 3)
    events = make_events(20)
    send_lines(cluster.bootstrap, "uploads", events)
    core = llm_core(encoder, sample_ts, fake_llm(answer_first))
    s = settings_for(cluster.bootstrap, decisions_topic="decisions")
    svc = KafkaService(s, core, core.metrics)
    cluster.broker_down(3)
    with running(svc):
        out = read_topic(cluster.bootstrap, "tags", expect=20, timeout_s=60)
        time.sleep(1.0)
        held = committed_total(cluster.bootstrap, s.group_id, "uploads", 1)
        cluster.broker_up(3)
        decided = read_topic(cluster.bootstrap, "decisions", expect=20, timeout_s=60)
        assert committed_reaches(cluster.bootstrap, s.group_id, 1, 20)
    assert {m.key().decode() for m in out} == ids_of(events)
    assert held == 0, "inputs were committed before their decision records were acked"
    assert {m.key().decode() for m in decided} == ids_of(events)
    core.close()


def test_lag_is_exported_per_partition_and_removed_when_given_up(
    cluster: MockCluster,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """The first LLM request hangs, so the commit stays below it: the lag of its partition
    is the high watermark minus the commit; once answered it falls to 0; on stop (revoke)
    the series is gone."""
    _topics(cluster, 1)
    hang, release = threading.Event(), threading.Event()

    def reply(req: dict[str, Any]) -> Reply:
        if hang.is_set():
            release.wait(60)
        return answer_first(req)

    core = llm_core(encoder, sample_ts, fake_llm(reply))
    s = settings_for(cluster.bootstrap, batch_size=8)
    events = make_events(40)
    svc = KafkaService(s, core, core.metrics, stats_interval_ms=200)
    labels = {"topic": "uploads", "partition": "0"}
    group = s.group_id
    try:
        with running(svc):
            send_lines(cluster.bootstrap, "uploads", events[:16])
            assert committed_reaches(cluster.bootstrap, group, 1, 16)
            hang.set()  # from now on the LLM answers nothing: the commit stays at 16
            send_lines(cluster.bootstrap, "uploads", events[16:])
            assert wait_until(lambda: _lag(core, labels) == 24)
            assert committed_total(cluster.bootstrap, group, "uploads", 1) == 16
            release.set()
            assert wait_until(lambda: _lag(core, labels) == 0)
    finally:
        release.set()
    assert _lag(core, labels) is None
    core.close()


class _ConsumerFailingCommits(_Proxy):
    """The real consumer; `commit` reports an error for `partition` in its result (the
    per-partition shape of librdkafka's answer) without committing that partition."""

    def __init__(self, real: Any, partition: int, times: int) -> None:
        super().__init__(real)
        self._partition, self.times = partition, times

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> Any:
        if self.times <= 0:
            return self._real.commit(offsets=offsets, asynchronous=asynchronous)
        self.times -= 1
        keep = [tp for tp in offsets if tp.partition != self._partition]
        result = self._real.commit(offsets=keep, asynchronous=asynchronous) if keep else []
        failed = [
            SimpleNamespace(
                topic=tp.topic,
                partition=tp.partition,
                offset=tp.offset,
                error=KafkaError(KafkaError.REQUEST_TIMED_OUT),
            )
            for tp in offsets
            if tp.partition == self._partition
        ]
        return [*result, *failed]


def test_a_partition_whose_commit_failed_is_committed_again(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    _topics(cluster, 2)
    events = make_events(60)
    core = _core(encoder, sample_ts)
    s = settings_for(cluster.bootstrap, batch_size=8)
    svc = KafkaService(s, core, core.metrics)
    failing = _ConsumerFailingCommits(svc.consumer, 1, times=1_000_000)
    svc.consumer = failing  # type: ignore[assignment]
    with running(svc):
        send_lines(cluster.bootstrap, "uploads", events)
        read_topic(cluster.bootstrap, "tags", expect=60, timeout_s=60)
        time.sleep(0.5)
        failing.times = 0  # the broker takes commits again: the next commit sends it
        # an idle poll commits; a final commit on stop as well
        time.sleep(1.0)
    assert (metric(core, "tagstream_commits_total", {"result": "error"}) or 0) >= 1
    assert committed_total(cluster.bootstrap, s.group_id, "uploads", 2) == 60
    core.close()


def test_lost_partitions_are_forgotten_and_reread_without_loss(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    """The coordinator says this member is unknown (fenced): librdkafka reports the
    partitions lost; the service drops what it had of them, rejoins and tags everything."""
    _topics(cluster, 3)
    events = make_events(300)
    core = _core(encoder, sample_ts)
    s = settings_for(cluster.bootstrap, batch_size=16)
    with running(KafkaService(s, core, core.metrics)):
        send_lines(cluster.bootstrap, "uploads", events[:100])
        read_topic(cluster.bootstrap, "tags", expect=50, timeout_s=60)
        cluster.push_request_errors(HEARTBEAT, *([ERR_UNKNOWN_MEMBER_ID] * 3))
        assert wait_until(
            lambda: (metric(core, "tagstream_rebalance_events_total", {"event": "lost"}) or 0) >= 1
        )
        send_lines(cluster.bootstrap, "uploads", events[100:])
        out = read_topic(cluster.bootstrap, "tags", expect=300, timeout_s=120)
        assert committed_reaches(cluster.bootstrap, s.group_id, 3, 300)
    assert {m.key().decode() for m in out} == ids_of(events)
    core.close()


def test_a_producer_that_keeps_failing_stops_the_service_without_committing_past(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    _topics(cluster, 1)
    send_lines(cluster.bootstrap, "uploads", make_events(20))
    cluster.push_request_errors(PRODUCE, *([ERR_MSG_SIZE_TOO_LARGE] * 200))
    core = _core(encoder, sample_ts)
    s = settings_for(cluster.bootstrap)
    with pytest.raises(KafkaRuntimeError, match="not acknowledged after 5 attempts"):
        KafkaService(s, core, core.metrics).run(threading.Event())
    assert committed_total(cluster.bootstrap, s.group_id, "uploads", 1) == 0
    assert (metric(core, "tagstream_produce_errors_total") or 0) >= 5
    core.close()


def test_a_stuck_producer_is_replaced_and_nothing_is_lost(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    """The output's leader goes silent: no acknowledgement for `stuck_after_s`, so the
    producer is replaced and every unacknowledged record re-sent once it is back."""
    _topics(cluster, 1)
    cluster.set_group_coordinator("tagstream-test", 1)
    cluster.set_leader("uploads", 0, 1)
    cluster.set_leader("tags", 0, 2)
    events = make_events(60)
    core = _core(encoder, sample_ts)
    s = settings_for(cluster.bootstrap, batch_size=16)
    svc = KafkaService(s, core, core.metrics, stuck_after_s=1.0)
    with running(svc):
        cluster.broker_down(2)
        send_lines(cluster.bootstrap, "uploads", events)
        assert wait_until(
            lambda: (metric(core, "tagstream_producer_recreated_total") or 0) >= 1, 60
        )
        cluster.broker_up(2)
        out = read_topic(cluster.bootstrap, "tags", expect=60, timeout_s=120)
        assert committed_reaches(cluster.bootstrap, s.group_id, 1, 60)
    assert {m.key().decode() for m in out} == ids_of(events)
    core.close()


def test_an_ack_from_before_a_partition_was_lost_does_not_complete_its_reread(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    """A tag event in flight when its partition is lost; the partition comes back and the
    input is read again; then the old acknowledgement arrives. It must not count for the
    re-read input (whose own outputs are not even produced): the commit stays below it."""
    _topics(cluster, 1)
    core = _core(encoder, sample_ts)
    svc = KafkaService(settings_for(cluster.bootstrap), core, core.metrics)
    tp = ("uploads", 0)
    svc.tracker.add(tp, 5)
    svc._submit(_Out("tags", tp, 5, b"id-5", b"{}", [], "tag", "encoder"))
    svc._on_lost(svc.consumer, [TopicPartition(*tp)])
    svc.tracker.add(tp, 5)  # read again after the partition came back
    assert svc.producer.flush(10) == 0  # the old ack is served now
    assert svc.tracker.committable() == {tp: 5}
    assert metric(core, "tagstream_events_produced_total", {"decision": "encoder"}) == 0
    svc.consumer.close()
    core.close()


def test_a_broker_that_takes_nothing_stops_the_service_without_committing(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    """The output's leader is down for good: after half of max.poll.interval spent waiting
    without a single acknowledgement, the service stops (a restart re-reads everything)."""
    _topics(cluster, 1)
    cluster.set_group_coordinator("tagstream-test", 1)
    cluster.set_leader("uploads", 0, 1)
    cluster.set_leader("tags", 0, 2)
    send_lines(cluster.bootstrap, "uploads", make_events(20))
    cluster.broker_down(2)
    core = _core(encoder, sample_ts)
    s = settings_for(cluster.bootstrap, max_poll_interval_ms=10_000)
    svc = KafkaService(s, core, core.metrics)
    t0 = time.monotonic()
    with pytest.raises(KafkaRuntimeError, match="no acknowledgement for 5s"):
        svc.run(threading.Event())
    assert time.monotonic() - t0 < 60
    assert committed_total(cluster.bootstrap, s.group_id, "uploads", 1) == 0
    core.close()
