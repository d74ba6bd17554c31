"""Loss and stall paths against the embedded broker, run as a user would: a ~1 MB poison
record with default settings, permanent LLM errors and endless outages in pause mode, a
revoke and a poll loop bounded by their clocks, SIGTERM with LLM answers pending, a stalled
loop seen by the probes, and kill -9 with decision records."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import CollectorRegistry

from consumer.service.health import HealthServer, HealthState
from consumer.service.runner import KafkaService
from consumer.tagging.core import Prepared, TaggingCore
from consumer.tagging.metrics import Metrics
from consumer.tagging.resilience import CircuitBreaker
from consumer.tools.broker import EmbeddedBroker, create_topics, free_port
from consumer.tools.send import send_lines
from models_onnx import OnnxEncoder
from tagsys import TagSystem
from tests.conftest import FakeOpenAI, Reply, Responder, answer_first
from tests.kafka_helpers import (
    KafkaKit,
    TopicReader,
    committed_reaches,
    committed_total,
    http_get,
    ids_of,
    llm_core,
    make_events,
    make_topics,
    metric,
    read_topic,
    reap,
    running,
    settings_for,
    spawn_run,
    terminate,
    wait_until,
)

pytestmark = pytest.mark.broker


def _breaker() -> CircuitBreaker:
    """Opens after 3 failures, probes again after 0.2 s (a test's pace)."""
    return CircuitBreaker(failures=3, reset_s=0.2)


def _status(port: int, path: str) -> int:
    return http_get(port, path)[0]


def test_a_1mb_poison_record_is_dead_lettered_with_default_settings(
    broker: EmbeddedBroker, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    """Under max_event_bytes, but its dead letter (value + headers) is over librdkafka's
    default message.max.bytes: it must go to the DLQ whole, and the consumer go on."""
    make_topics(broker.bootstrap, 2)
    events = make_events(200)
    poison = [b'{"id": %d, "caption": "' % i + b"x" * 999_700 + b'"}' for i in (5, 6)]
    send_lines(broker.bootstrap, "uploads", [*events[:70], poison[0], *events[70:140]])
    send_lines(broker.bootstrap, "uploads", [poison[1], *events[140:]])
    core = TaggingCore(encoder, sample_ts, metrics=Metrics(CollectorRegistry()))
    s = settings_for(broker.bootstrap, batch_size=64)  # the batch size `run` defaults to
    assert s.max_event_bytes == 1 << 20
    with running(KafkaService(s, core, core.metrics)):
        out = read_topic(broker.bootstrap, "tags", expect=200, timeout_s=120)
        dlq = read_topic(broker.bootstrap, "uploads.dlq", expect=1, timeout_s=60, settle_s=2)
        assert committed_reaches(broker.bootstrap, s.group_id, 2, 202)
    assert {m.key().decode() for m in out} == ids_of(events)
    assert sorted(m.value() for m in dlq) == sorted(poison)  # whole: no need to cut them
    assert metric(core, "tagstream_dlq_events_total", {"reason": "schema"}) == 2
    core.close()


def test_permanent_llm_errors_in_pause_mode_go_out_as_review(
    broker: EmbeddedBroker,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """A 401 never passes: deferring it would re-read the partition forever."""
    make_topics(broker.bootstrap, 2)
    events = make_events(30)
    send_lines(broker.bootstrap, "uploads", events)
    server = fake_llm(lambda req: (401, {"error": {"message": "invalid api key"}}))
    core = llm_core(encoder, sample_ts, server, _breaker(), defer_when_llm_unavailable=True)
    s = settings_for(broker.bootstrap, llm_unavailable="pause", llm_pause_s=0.5)
    with running(KafkaService(s, core, core.metrics)):
        out = read_topic(broker.bootstrap, "tags", expect=30, timeout_s=60)
    payloads = [orjson.loads(m.value()) for m in out]
    assert {p["id"] for p in payloads} == ids_of(events)
    assert {p["decision"] for p in payloads} == {"review"}
    assert metric(core, "tagstream_partition_pauses_total") == 0
    assert metric(core, "tagstream_llm_requests_total", {"status": "refused"}) == 30
    core.close()


def test_an_item_deferred_too_often_goes_out_as_review(
    broker: EmbeddedBroker,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """An LLM that is down for good: pause mode re-reads each item a few times, then sends
    it as review; the partition moves on and everything is committed."""
    make_topics(broker.bootstrap, 1)
    events = make_events(12)
    send_lines(broker.bootstrap, "uploads", events)
    server = fake_llm(lambda req: (503, {"error": {"message": "down"}}))
    core = llm_core(encoder, sample_ts, server, _breaker(), defer_when_llm_unavailable=True)
    s = settings_for(
        broker.bootstrap, llm_unavailable="pause", llm_pause_s=0.1, llm_max_deferrals=2
    )
    with running(KafkaService(s, core, core.metrics)):
        out = read_topic(broker.bootstrap, "tags", expect=12, timeout_s=120)
        assert committed_reaches(broker.bootstrap, s.group_id, 1, 12)
    payloads = [orjson.loads(m.value()) for m in out]
    assert {p["id"] for p in payloads} == ids_of(events)
    assert {p["decision"] for p in payloads} == {"review"}
    assert metric(core, "tagstream_partition_pauses_total") >= 2
    assert metric(core, "tagstream_llm_deferrals_exhausted_total") >= 1
    core.close()


class _TimedRevokes(KafkaService):
    revokes: list[float]

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        t0 = time.monotonic()
        try:
            super()._on_revoke(consumer, partitions)
        finally:
            self.revokes.append(time.monotonic() - t0)


def test_a_revoke_does_not_wait_for_a_slow_llm(
    broker: EmbeddedBroker,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """Consumer A has LLM answers pending that will not come for a minute; B joins. A's
    revoke ends within its budget (the group is not held up), B gets its partition, and once
    the LLM answers every event is tagged by one of them."""
    make_topics(broker.bootstrap, 2)
    events = make_events(40)
    release = threading.Event()

    def reply(req: dict[str, Any]) -> Reply:
        release.wait(90)
        return answer_first(req)

    server = fake_llm(reply)
    # max.poll.interval 10 s: a revoke's budget is 1 s (min(30 s, a tenth of it))
    s = settings_for(broker.bootstrap, batch_size=8, max_poll_interval_ms=10_000)
    core_a = llm_core(encoder, sample_ts, server, _breaker())
    core_b = llm_core(encoder, sample_ts, server, _breaker())
    a = _TimedRevokes(s, core_a, core_a.metrics)
    a.revokes = []
    b = KafkaService(s, core_b, core_b.metrics)
    try:
        with running(a):
            send_lines(broker.bootstrap, "uploads", events)
            assert wait_until(lambda: metric(core_a, "tagstream_llm_waiting_items") > 0, 60)
            assert a.health.assigned == 2
            with running(b):
                assert wait_until(lambda: b.health.assigned >= 1, 40), f"revokes: {a.revokes}"
                release.set()
                out = read_topic(broker.bootstrap, "tags", expect=40, timeout_s=90)
                assert committed_reaches(broker.bootstrap, s.group_id, 2, 40)
    finally:
        release.set()
    assert a.revoke_timeout_s == 1.0
    assert a.revokes and max(a.revokes) < a.revoke_timeout_s + 1.5, a.revokes
    assert {m.key().decode() for m in out} == ids_of(events)
    core_a.close()
    core_b.close()


class _Beats(HealthState):
    """Records the longest gap between two polls of the loop."""

    def __init__(self, max_poll_interval_s: float) -> None:
        super().__init__(max_poll_interval_s)
        self.longest = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if self.consuming:
            self.longest = max(self.longest, now - self.last_poll)
        super().beat()


@pytest.mark.parametrize("mode", ["pause", "no-pipeline"])
def test_the_loop_polls_within_max_poll_interval_while_the_llm_hangs(
    mode: str,
    broker: EmbeddedBroker,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """Both modes wait for a batch's LLM answers; an LLM that hangs for 25 s must not keep
    the loop from polling for max.poll.interval (10 s here), or the member is thrown out."""
    make_topics(broker.bootstrap, 1)
    events = make_events(16)
    send_lines(broker.bootstrap, "uploads", events)
    hung_until = time.monotonic() + 25

    def reply(req: dict[str, Any]) -> Reply:
        time.sleep(max(0.0, hung_until - time.monotonic()))
        return answer_first(req)

    pause = mode == "pause"
    core = llm_core(
        encoder, sample_ts, fake_llm(reply), _breaker(), defer_when_llm_unavailable=pause
    )
    s = settings_for(
        broker.bootstrap,
        batch_size=8,
        max_poll_interval_ms=10_000,
        llm_unavailable="pause" if pause else "review",
        llm_pause_s=0.5,
        pipeline=pause,  # pause mode waits for the answers with the pipeline on, too
    )
    health = _Beats(s.max_poll_interval_ms / 1000)
    with running(KafkaService(s, core, core.metrics, health)):
        out = read_topic(broker.bootstrap, "tags", expect=16, timeout_s=120)
        assert committed_reaches(broker.bootstrap, s.group_id, 1, 16)
    assert {m.key().decode() for m in out} == ids_of(events)
    assert {orjson.loads(m.value())["decision"] for m in out} == {"llm"}
    assert health.longest < 10.0, health.longest
    core.close()


class _StuckEncoder(TaggingCore):
    """The second batch's encode blocks until released (a wedged GPU, say)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.release = threading.Event()
        self.calls = 0

    def encode_prepared(self, prep: Prepared) -> npt.NDArray[np.float32]:
        self.calls += 1
        if self.calls == 2:
            self.release.wait(60)
        return super().encode_prepared(prep)


def test_probes_say_a_stalled_loop_is_neither_alive_nor_ready(
    broker: EmbeddedBroker, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    make_topics(broker.bootstrap, 1)
    core = _StuckEncoder(encoder, sample_ts, metrics=Metrics(CollectorRegistry()))
    s = settings_for(broker.bootstrap, batch_size=8, max_poll_interval_ms=10_000)
    svc = KafkaService(s, core, core.metrics)
    svc.health.warmed = True
    server = HealthServer(core.metrics.registry, svc.health, "127.0.0.1", 0).start()
    port = server.port
    try:
        with running(svc):
            assert wait_until(lambda: _status(port, "/readyz") == 200, 40)
            send_lines(broker.bootstrap, "uploads", make_events(8))
            time.sleep(0.5)
            send_lines(broker.bootstrap, "uploads", make_events(8, "b"))
            assert wait_until(lambda: core.calls >= 2, 30)
            assert wait_until(lambda: _status(port, "/healthz") == 503, 20)
            assert _status(port, "/readyz") == 503
            core.release.set()
            assert wait_until(lambda: _status(port, "/healthz") == 200, 20)
            assert wait_until(lambda: _status(port, "/readyz") == 200, 20)
            read_topic(broker.bootstrap, "tags", expect=16, timeout_s=60)
    finally:
        core.release.set()
        server.stop()
    core.close()


def _scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def test_sigterm_mid_stream_with_llm_answers_pending(
    broker: EmbeddedBroker,
    model_dir: Path,
    tmp_path: Path,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """SIGTERM while LLM answers are pending: /readyz turns 503 at once, the service finishes
    what it can within its shutdown budget, commits only what was produced and exits 0; a
    restart tags the rest."""
    make_topics(broker.bootstrap, 1)
    events = make_events(150)
    send_lines(broker.bootstrap, "uploads", events)

    def slow(req: dict[str, Any]) -> Reply:
        time.sleep(0.5)
        return answer_first(req)

    server = fake_llm(slow)
    log, port = tmp_path / "run.log", free_port()
    args = ["--group-id", "term", "--llm", server.base_url, "--llm-model", "fake"]
    budget = {"TAGSTREAM_SHUTDOWN_TIMEOUT_S": "5"}
    reader = TopicReader(broker.bootstrap, "tags")
    proc = spawn_run(
        broker.bootstrap, model_dir, log, *args, "--metrics-port", str(port), env=budget
    )
    try:
        assert 20 <= reader.wait_for(20, 90) < 150, log.read_text()[-3000:]
        assert _scrape(port, "tagstream_llm_waiting_items") > 0  # answers are pending
        assert _status(port, "/readyz") == 200
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: _status(port, "/readyz") == 503, 5)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert time.monotonic() - t0 < 20  # the 5 s budget, then drain and commit
        committed = committed_total(broker.bootstrap, "term", "uploads", 1)
        for _ in range(10):
            reader.poll()
        # one partition: every input below the commit has its tag event
        below = {orjson.loads(e)["id"].encode() for e in events[:committed]}
        assert committed > 0 and below <= reader.keys
        port = free_port()
        proc = spawn_run(broker.bootstrap, model_dir, log, *args, "--metrics-port", str(port))
        reader.wait_for(150, 120)
        assert {k.decode() for k in reader.keys} == ids_of(events)
        assert wait_until(lambda: _status(port, "/readyz") == 200, 60)  # up, signal handlers on
        assert terminate(proc) == 0
    finally:
        reader.close()
        reap(proc)


def test_kill_9_keeps_every_llm_decision_record(
    broker: EmbeddedBroker,
    model_dir: Path,
    tmp_path: Path,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """Each input is committed only once its tag event and its decision record are acked:
    after kills in the middle of the stream, every `decision: llm` event has its record."""
    make_topics(broker.bootstrap, 2)
    create_topics(broker.bootstrap, {"decisions": 2})
    events = make_events(600)
    send_lines(broker.bootstrap, "uploads", events)
    server = fake_llm(answer_first)
    log = tmp_path / "run.log"
    args = ["--group-id", "kd", "--metrics-port", "0", "--llm", server.base_url]
    args += ["--llm-model", "fake", "--decisions-topic", "decisions", "--batch-size", "32"]
    reader = TopicReader(broker.bootstrap, "tags")
    for _ in range(2):
        proc = spawn_run(broker.bootstrap, model_dir, log, *args)
        before = reader.poll()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and reader.poll() < before + 100:
            pass
        assert proc.poll() is None and before < len(reader.keys) < 600, "not mid-stream"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    port = free_port()
    last = [*args[: args.index("--metrics-port")], *args[args.index("--metrics-port") + 2 :]]
    proc = spawn_run(broker.bootstrap, model_dir, log, *last, "--metrics-port", str(port))
    try:
        reader.wait_for(600, 180)
        # the killed runs may have sent the last events already: wait until this one is up
        # (its signal handlers installed) before SIGTERM, which must then end it cleanly
        assert wait_until(lambda: _status(port, "/readyz") == 200, 60), log.read_text()[-2000:]
        assert terminate(proc) == 0
    finally:
        reader.close()
        reap(proc)
    assert {k.decode() for k in reader.keys} == ids_of(events)
    llm_ids = {
        orjson.loads(m.value())["id"]
        for m in reader.records
        if orjson.loads(m.value())["decision"] == "llm"
    }
    assert llm_ids, "the LLM decided nothing: the test shows nothing"
    decided = read_topic(broker.bootstrap, "decisions", expect=len(llm_ids), timeout_s=60)
    missing = llm_ids - {m.key().decode() for m in decided}
    assert not missing, f"{len(missing)} LLM decisions without their record"


def test_a_replica_beyond_the_partition_count_is_ready_and_takes_over(
    kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    """A rollout with as many replicas as partitions: the new pod gets no partition under
    cooperative-sticky, yet it must be ready (or the rollout never finishes); when the old
    one leaves, its partition moves to the new one, which tags what comes next."""
    kafka.topics(1)
    s = kafka.settings(batch_size=8)
    core_a = TaggingCore(encoder, sample_ts, metrics=Metrics(CollectorRegistry()))
    core_b = TaggingCore(encoder, sample_ts, metrics=Metrics(CollectorRegistry()))
    a = KafkaService(s, core_a, core_a.metrics)
    b = KafkaService(s, core_b, core_b.metrics)
    a.health.warmed = b.health.warmed = True
    owned = "tagstream_assigned_partitions"
    stop_a = threading.Event()
    thread_a = threading.Thread(target=a.run, args=(stop_a,), daemon=True)
    thread_a.start()
    try:
        assert wait_until(lambda: a.health.assigned == 1, 40)
        with running(b):
            assert wait_until(lambda: b.health.consuming, 40)
            time.sleep(8)  # past the rebalance b's join starts: the partition stays with a
            assert metric(core_a, owned) == 1 and metric(core_b, owned) == 0
            assert b.health.ready(), "an idle replica must be ready"
            stop_a.set()  # the old pod goes: its partition moves to b
            thread_a.join(60)
            assert wait_until(lambda: b.health.assigned == 1, 40)
            events = make_events(20, "after")
            kafka.send(events)
            out = kafka.read("tags", expect=20)
            assert {m.key().decode() for m in out} == ids_of(events)
            assert metric(core_b, owned) == 1
    finally:
        stop_a.set()
        thread_a.join(60)
    core_a.close()
    core_b.close()
