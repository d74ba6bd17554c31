"""Dead letters, poison items and LLM faults against the embedded broker: nothing is lost."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from consumer.service.runner import KafkaRuntimeError, KafkaService
from consumer.tagging.core import TaggingCore, TagResult
from consumer.tagging.events import UploadEvent
from consumer.tagging.metrics import Metrics
from consumer.tagging.resilience import CircuitBreaker
from consumer.tools.dlq import replay_dlq
from models_onnx import OnnxEncoder
from tagsys import TagSystem
from tagsys.errors import EXIT_CONFIG, TagstreamError
from tests.conftest import FakeOpenAI, Reply, Responder, completion, shortlist_of
from tests.kafka_helpers import (
    KafkaKit,
    llm_core,
    make_events,
    service,
)

pytestmark = pytest.mark.broker

BAD: list[tuple[bytes | None, str]] = [
    (b"{not json", "not_json"),
    (b'{"title": "no id"}', "missing_id"),
    (b'{"id": 5}', "schema"),
    (b"\xff\xfe\xfd", "not_utf8"),
    (b'{"id": "x", "schema_version": 9}', "schema_version"),
    (b'{"id": "big", "caption": "' + b"x" * 5000 + b'"}', "oversize"),
    (None, "empty"),
]


def _core(encoder: OnnxEncoder, ts: TagSystem, **kw: Any) -> TaggingCore:
    return TaggingCore(encoder, ts, metrics=Metrics(CollectorRegistry()), **kw)


def test_every_malformed_event_lands_in_the_dlq_with_context(
    kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    kafka.topics(1)
    good = make_events(20)
    p = Producer({"bootstrap.servers": kafka.bootstrap})
    for i, line in enumerate(good):
        p.produce("uploads", key=orjson.loads(line)["id"].encode(), value=line)
        if i == 9:  # the bad ones in the middle, with a header of their own and a timestamp
            for j, (raw, _) in enumerate(BAD):
                p.produce(
                    "uploads",
                    key=f"bad-{j}".encode(),
                    value=raw,
                    headers=[("trace", b"t-%d" % j)],
                    timestamp=1_700_000_000_000 + j,
                )
    assert p.flush(10) == 0
    core = _core(encoder, sample_ts)
    s = kafka.settings(max_event_bytes=4096)
    with kafka.serve(s, core):
        out = kafka.read("tags", expect=20)
        dlq = kafka.read("uploads.dlq", expect=len(BAD))
    assert {m.key().decode() for m in out} == {orjson.loads(e)["id"] for e in good}
    assert len(dlq) == len(BAD)
    for m in dlq:
        j = int(m.key().decode().split("-")[1])
        raw, reason = BAD[j]
        h = dict(m.headers())
        assert m.value() == raw and m.timestamp()[1] == 1_700_000_000_000 + j
        assert h["trace"] == b"t-%d" % j  # original headers kept
        assert h["__connect.errors.topic"] == b"uploads"
        assert h["__connect.errors.partition"] == b"0"
        assert int(h["__connect.errors.offset"]) == 10 + j
        assert h["__connect.errors.stage"] == b"decode"
        assert h["__connect.errors.exception.class.name"] == b"consumer.tagging.events.DecodeError"
        assert h["__connect.errors.exception.message"]
        assert h["__tagstream.errors.reason"] == reason.encode()
    r = core.metrics.registry
    for _, reason in BAD:
        assert r.get_sample_value("tagstream_dlq_events_total", {"reason": reason}) == 1
    assert kafka.committed(s.group_id, 1) == 20 + len(BAD)

    # replay: to another topic, original key/value/headers back, error headers gone
    rep = replay_dlq(kafka.bootstrap, "uploads.dlq", to_topic="replayed", reasons={"not_json"})
    assert (rep.scanned, rep.matched, rep.replayed) == (len(BAD), 1, 1)
    (back,) = kafka.read("replayed", expect=1)
    hb = dict(back.headers())
    assert back.value() == b"{not json" and hb["trace"] == b"t-0"
    assert not any(k.startswith("__connect") for k in hb)
    assert hb["tagstream.replayed_from"].startswith(b"uploads.dlq-0-")
    # by id, to the original topic (where it fails again: counted, not lost)
    rep = replay_dlq(kafka.bootstrap, "uploads.dlq", ids={"bad-2"}, dry_run=True)
    assert (rep.matched, rep.replayed) == (1, 0)
    rep = replay_dlq(kafka.bootstrap, "uploads.dlq", ids={"bad-2"})
    assert rep.by_target == {"uploads": 1}
    core.close()


class PoisonCore(TaggingCore):
    """Fails on items whose id starts with 'poison' (or on everything); counts the batches
    that had to be isolated item by item."""

    fail_all = False
    isolated = 0

    def decide(
        self,
        events: list[UploadEvent],
        emb: npt.NDArray[np.float32],
        texts: list[str],
        *,
        wait_llm: bool = True,
        images: Any = None,
    ) -> list[TagResult]:
        if self.fail_all or any(e.id.startswith("poison") for e in events):
            raise RuntimeError("boom")
        return super().decide(events, emb, texts, wait_llm=wait_llm, images=images)

    def isolate(
        self,
        events: list[UploadEvent],
        batch_exc: BaseException,
        *,
        wait_llm: bool = True,
        prep: Any = None,
    ) -> list[TagResult | BaseException]:
        self.isolated += 1
        return super().isolate(events, batch_exc, wait_llm=wait_llm, prep=prep)


def test_a_poison_item_goes_to_the_dlq_and_the_batch_goes_on(
    kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    kafka.topics(1)
    events = [*make_events(10), b'{"id": "poison-1", "title": "x"}', *make_events(10, "z")]

    kafka.send(events)
    core = PoisonCore(encoder, sample_ts, metrics=Metrics(CollectorRegistry()))
    s = kafka.settings(batch_size=8)  # three batches, one of them poisoned
    with kafka.serve(s, core):
        out = kafka.read("tags", expect=20)
        (dead,) = kafka.read("uploads.dlq", expect=1)
    assert len({m.key() for m in out}) == 20
    h = dict(dead.headers())
    assert dead.key() == b"poison-1" and h["__connect.errors.stage"] == b"process"
    assert h["__connect.errors.exception.class.name"] == b"builtins.RuntimeError"
    assert kafka.committed(s.group_id, 1) == 21
    # only the batch with the poison item went item by item; the others took the batch path
    assert core.isolated == 1


def test_a_systemic_failure_stops_the_service_without_committing(
    kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    kafka.topics(1)

    kafka.send(make_events(5))
    core = PoisonCore(encoder, sample_ts, metrics=Metrics(CollectorRegistry()))
    core.fail_all = True
    s = kafka.settings()
    with pytest.raises(KafkaRuntimeError, match="canary"):
        service(s, core).run(threading.Event())
    assert kafka.committed(s.group_id, 1) == 0
    assert kafka.read("uploads.dlq", expect=1, timeout_s=3) == []


def test_missing_topics_fail_fast_with_the_fix(
    kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    core = _core(encoder, sample_ts)
    svc = KafkaService(kafka.settings(), core, core.metrics)
    with pytest.raises(TagstreamError, match=r"uploads\.dlq") as e:
        svc.run(threading.Event())
    assert e.value.exit_code == EXIT_CONFIG  # a topic to create, not a crash (exit 3)


FAULTS: list[Callable[[dict[str, Any]], Reply]] = [
    lambda req: (500, {"error": {"message": "boom"}}),
    lambda req: (429, {"error": {"message": "slow"}}, {"Retry-After": "0"}),
    lambda req: (200, completion("{definitely not json")),
    lambda req: (200, completion('{"tags": ["crypto giveaway", "not on any list"]}')),
    lambda req: (200, completion("")),
    lambda req: (200, completion('{"tags": []}')),
    lambda req: (200, completion(f'{{"tags": ["{shortlist_of(req)[0]}"]}}')),
]


def _slow(req: dict[str, Any]) -> Reply:
    time.sleep(1.0)  # past the client's timeout
    return 200, completion("{}")


def test_every_llm_fault_loses_nothing(
    kafka: KafkaKit,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    kafka.topics(2)
    faults = [*FAULTS, _slow]
    # Each distinct item keeps one fault across its retries, so every final status shows up
    # whatever order the concurrent requests arrive in (a global round-robin let a retry land
    # on the next fault, and a final "timeout" then depended on the interleaving).
    fault_of: dict[str, int] = {}
    lock = threading.Lock()

    def reply(req: dict[str, Any]) -> Reply:
        item = req["messages"][-1]["content"]
        with lock:
            k = fault_of.setdefault(item, len(fault_of) % len(faults))
        return faults[k](req)

    core = llm_core(
        encoder,
        sample_ts,
        fake_llm(reply),
        timeout_s=0.5,
        attempts=2,
        backoff_s=(0.01, 0.02),
        llm_concurrency=4,
    )
    metrics = core.metrics
    events = make_events(48)

    kafka.send(events)
    s = kafka.settings()
    with kafka.serve(s, core):
        out = kafka.read("tags", expect=48, timeout_s=120)
    payloads = [orjson.loads(m.value()) for m in out]
    assert {p["id"] for p in payloads} == {orjson.loads(e)["id"] for e in events}
    assert all(p["llm_asked"] for p in payloads)
    names = set(sample_ts.names)
    assert all(t["name"] in names for p in payloads for t in p["tags"])
    decisions = {p["decision"] for p in payloads}
    assert decisions == {"llm", "review"}
    r = metrics.registry
    for status in ("ok", "error", "timeout", "invalid", "empty"):
        assert (r.get_sample_value("tagstream_llm_requests_total", {"status": status}) or 0) > 0
    assert r.get_sample_value("tagstream_llm_rejected_tags_total") > 0
    assert kafka.committed(s.group_id, 2) == 48
    core.close()


@pytest.mark.parametrize("batch_size", [32, 4])
def test_pause_mode_waits_for_the_llm_instead_of_giving_up(
    batch_size: int,
    kafka: KafkaKit,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    kafka.topics(2)
    calls = itertools.count()

    def reply(req: dict[str, Any]) -> Reply:
        if next(calls) < 8:  # the first requests find the LLM down
            return 503, {"error": {"message": "warming up"}}
        return 200, completion(f'{{"tags": ["{shortlist_of(req)[0]}"]}}')

    core = llm_core(
        encoder,
        sample_ts,
        fake_llm(reply),
        CircuitBreaker(failures=3, reset_s=0.5),
        timeout_s=2,
        defer_when_llm_unavailable=True,
    )
    metrics = core.metrics
    events = make_events(30)

    kafka.send(events)
    # batch_size 4: later batches are already read and encoding when a partition is rewound;
    # their records of it must not go out (they are read again after the pause)
    s = kafka.settings(llm_unavailable="pause", llm_pause_s=0.5, batch_size=batch_size)
    with kafka.serve(s, core):
        out = kafka.read("tags", expect=30, timeout_s=120, settle_s=1.0)
    payloads = [orjson.loads(m.value()) for m in out]
    assert {p["id"] for p in payloads} == {orjson.loads(e)["id"] for e in events}
    # nothing went out while the LLM was down: every event was decided by it
    assert {p["decision"] for p in payloads} == {"llm"} and len(payloads) == 30
    assert metrics.registry.get_sample_value("tagstream_partition_pauses_total") >= 1
    assert kafka.committed(s.group_id, 2) == 30
    core.close()


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_slow_llm_answer_does_not_hold_up_the_items_after_it(
    pipeline: bool,
    kafka: KafkaKit,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """The first LLM request hangs; with the pipeline every other item still goes out, and
    the offset stays committed below the hung item until its answer arrives."""
    kafka.topics(1)
    release = threading.Event()
    calls = itertools.count()

    def reply(req: dict[str, Any]) -> Reply:
        if next(calls) == 0:
            release.wait(40)
        return 200, completion(f'{{"tags": ["{shortlist_of(req)[0]}"]}}')

    core = llm_core(encoder, sample_ts, fake_llm(reply))
    metrics = core.metrics

    kafka.send(make_events(40))
    s = kafka.settings(batch_size=8, pipeline=pipeline)
    with kafka.serve(s, core):
        early = kafka.read("tags", expect=39, timeout_s=8 if pipeline else 4)
        held_at = kafka.committed(s.group_id, 1)
        waiting = metrics.registry.get_sample_value("tagstream_llm_waiting_items")
        release.set()
        out = kafka.read("tags", expect=40, timeout_s=60)
    if pipeline:
        assert len({m.key() for m in early}) == 39
        assert held_at < 8  # the hung item is in the first batch: nothing past it committed
        assert waiting == 1
    else:  # without the pipeline the batch waits for the answer, and so does the rest
        assert len({m.key() for m in early}) < 8
    assert len({m.key() for m in out}) == 40
    assert {orjson.loads(m.value())["decision"] for m in out} == {"llm"}
    assert kafka.committed(s.group_id, 1) == 40
    core.close()
