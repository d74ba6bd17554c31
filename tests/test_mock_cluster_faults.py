"""Fault injection on librdkafka's mock cluster: produce errors, commit errors, a broker down."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from consumer.tagging.core import TaggingCore
from consumer.tagging.metrics import Metrics
from consumer.tools.send import send_lines
from models_onnx import OnnxEncoder
from tagsys import TagSystem
from tests.kafka_helpers import (
    committed_total,
    ids_of,
    make_events,
    read_topic,
    running,
    service,
    settings_for,
)
from tests.mock_cluster import (
    ERR_MSG_SIZE_TOO_LARGE,
    ERR_NOT_ENOUGH_REPLICAS,
    ERR_REBALANCE_IN_PROGRESS,
    OFFSET_COMMIT,
    PRODUCE,
    MockCluster,
)


@pytest.fixture
def cluster(mock_cluster: MockCluster) -> MockCluster:
    mock_cluster.create_topics({"uploads": 3, "tags": 3, "uploads.dlq": 1})
    return mock_cluster


def _core(encoder: OnnxEncoder, ts: TagSystem) -> TaggingCore:
    return TaggingCore(encoder, ts, metrics=Metrics(CollectorRegistry()))


def test_produce_errors_are_retried_and_nothing_is_lost(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    events = make_events(120)
    send_lines(cluster.bootstrap, "uploads", events)
    # retriable errors (librdkafka retries them) and permanent ones (the service re-sends)
    cluster.push_request_errors(PRODUCE, *([ERR_NOT_ENOUGH_REPLICAS] * 4))
    cluster.push_request_errors(PRODUCE, *([ERR_MSG_SIZE_TOO_LARGE] * 2))
    core = _core(encoder, sample_ts)
    s = settings_for(cluster.bootstrap)
    with running(service(s, core)):
        out = read_topic(cluster.bootstrap, "tags", expect=120, timeout_s=120)
    assert {m.key().decode() for m in out} == ids_of(events)
    r = core.metrics.registry
    recovered = (r.get_sample_value("tagstream_produce_errors_total") or 0) + (
        r.get_sample_value("tagstream_producer_recreated_total") or 0
    )
    assert recovered >= 1, "the permanent errors never reached the service"
    assert committed_total(cluster.bootstrap, s.group_id, "uploads", 3) == 120
    core.close()


def test_commit_errors_are_retried_on_the_next_commit(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    events = make_events(60)
    core = _core(encoder, sample_ts)
    s = settings_for(cluster.bootstrap)
    with running(service(s, core)):
        time.sleep(1.0)
        cluster.push_request_errors(OFFSET_COMMIT, *([ERR_REBALANCE_IN_PROGRESS] * 3))
        send_lines(cluster.bootstrap, "uploads", events)
        out = read_topic(cluster.bootstrap, "tags", expect=60, timeout_s=120)
        time.sleep(1.0)
    assert {m.key().decode() for m in out} == ids_of(events)
    r = core.metrics.registry
    assert r.get_sample_value("tagstream_commits_total", {"result": "error"}) >= 1
    # the final commit on stop got through: a restart would not re-read anything
    assert committed_total(cluster.bootstrap, s.group_id, "uploads", 3) == 60
    core.close()


def test_a_broker_down_and_back_loses_nothing(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    events = make_events(300)
    core = _core(encoder, sample_ts)
    s = settings_for(cluster.bootstrap, batch_size=16)
    with running(service(s, core)):
        send_lines(cluster.bootstrap, "uploads", events[:100])
        read_topic(cluster.bootstrap, "tags", expect=50, timeout_s=60)
        cluster.broker_down(2)
        feeder = threading.Thread(
            target=send_lines, args=(cluster.bootstrap, "uploads", events[100:])
        )
        feeder.start()
        time.sleep(3.0)
        cluster.broker_up(2)
        feeder.join(60)
        out = read_topic(cluster.bootstrap, "tags", expect=300, timeout_s=120)
    assert {m.key().decode() for m in out} == ids_of(events)
    core.close()
