from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from consumer.service.health import HealthServer, HealthState
from consumer.tagging.metrics import Metrics
from tests.kafka_helpers import http_get


def test_metric_names_follow_the_conventions(registry: CollectorRegistry) -> None:
    Metrics(registry)
    ours = [m for m in registry.collect() if not m.name.startswith(("process_", "python_"))]
    names = {m.name for m in ours}
    assert names and all(n.startswith("tagstream_") for n in names)
    for m in ours:
        if m.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in m.samples)
        if m.type == "histogram" and m.name != "tagstream_batch_size":
            assert m.name.endswith("_seconds")  # latencies in base units
    expected = {
        "tagstream_events_consumed",
        "tagstream_events_produced",
        "tagstream_stage_duration_seconds",
        "tagstream_end_to_end_seconds",
        "tagstream_batch_size",
        "tagstream_llm_requests",
        "tagstream_llm_tokens",
        "tagstream_llm_routed",
        "tagstream_consumer_lag_messages",
        "tagstream_build",
    }
    assert expected <= names


def test_two_registries_do_not_share_state() -> None:
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.llm_routed.inc()
    assert a.registry.get_sample_value("tagstream_llm_routed_total") == 1
    assert b.registry.get_sample_value("tagstream_llm_routed_total") == 0


def test_health_endpoints(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    m.set_build("enc/int8", "sample@1#abc")
    state = HealthState(max_poll_interval_s=0.5)
    server = HealthServer(registry, state, "127.0.0.1", 0).start()
    try:
        code, body = http_get(server.port, "/metrics")
        assert code == 200 and 'tagstream_build_info{encoder="enc/int8"' in body
        assert http_get(server.port, "/readyz")[0] == 503  # not warmed, not consuming
        state.warmed = True
        state.beat()
        assert http_get(server.port, "/healthz")[0] == 200
        # ready without a partition: an idle replica is not a broken one (rollouts finish)
        assert state.assigned == 0 and http_get(server.port, "/readyz")[0] == 200
        state.stopping = True
        assert http_get(server.port, "/readyz")[0] == 503
        state.stopping = False
        time.sleep(0.6)  # no poll within max.poll.interval: stalled
        assert http_get(server.port, "/healthz")[0] == 503
        assert http_get(server.port, "/readyz")[0] == 503
        assert http_get(server.port, "/nope")[0] == 404
    finally:
        server.stop()
