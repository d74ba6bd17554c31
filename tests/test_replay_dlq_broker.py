"""`replay-dlq` and the decisions reader end after one pass, even on a live topic.

They read up to the high watermarks seen at start. The embedded Tansu reports a wrong high
watermark (DEVELOPERS.md), so these run on librdkafka's mock cluster (correct watermarks),
and the end logic itself on a scripted consumer.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import pytest
from confluent_kafka import KafkaError, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from consumer.tagging.core import TaggingCore
from consumer.tagging.dead_letters import TRUNCATED_HEADER, connect_error_headers, shrink
from consumer.tagging.metrics import Metrics
from consumer.tools.distill_topic import read_decisions
from consumer.tools.dlq import REPLAYED_FROM_HEADER, ReplayReport, replay_dlq, scan
from models_onnx import OnnxEncoder
from tagsys import TagSystem
from tests.conftest import cli_exit
from tests.kafka_helpers import TopicReader, read_topic, running, service, settings_for
from tests.mock_cluster import MockCluster

T = TypeVar("T")

BAD: list[tuple[bytes, str]] = [
    (b"{not json", "not_json"),
    (b'{"title": "no id"}', "missing_id"),
    (b'{"id": 5}', "schema"),
    (b"\xff\xfe\xfd", "not_utf8"),
]


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    with MockCluster(brokers=1) as mc:
        mc.create_topics({"uploads": 2, "tags": 2, "uploads.dlq": 1})
        yield mc


def _in_thread(fn: Callable[[], T], timeout_s: float) -> T:
    """fn() in a thread; fails (instead of hanging the suite) when it runs past timeout_s."""
    out: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"still running after {timeout_s} s"
    if errors:
        raise errors[0]
    return out[0]


def _send_bad(bootstrap: str) -> None:
    p = Producer({"bootstrap.servers": bootstrap})
    for j, (raw, _) in enumerate(BAD):
        p.produce("uploads", key=f"bad-{j}".encode(), value=raw, headers=[("trace", b"t")])
    assert p.flush(10) == 0


def _records(bootstrap: str, topic: str, count: int, timeout_s: float) -> list[Any]:
    """Every record of `topic` once there are `count` (or at timeout): unlike `read_topic`,
    counted by record, not by key (a replay comes back with the key it had)."""
    reader = TopicReader(bootstrap, topic)
    deadline = time.monotonic() + timeout_s
    try:
        while reader.poll() < count and time.monotonic() < deadline:
            pass
    finally:
        reader.close()
    return reader.records


def _wait(pred: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_replay_against_a_running_service_ends_after_one_pass(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    """The replayed records fail again and come back to the DLQ while replay-dlq reads it:
    it re-sends only what was there at start, once, and returns."""
    core = TaggingCore(encoder, sample_ts, metrics=Metrics(CollectorRegistry()))
    n = len(BAD)
    with running(service(settings_for(cluster.bootstrap), core)):
        _send_bad(cluster.bootstrap)
        assert len(read_topic(cluster.bootstrap, "uploads.dlq", expect=n)) == n
        # it must return while the service runs (the old idle timer never did)
        rep = _in_thread(lambda: replay_dlq(cluster.bootstrap, "uploads.dlq"), timeout_s=30)
        # every replay failed again: back in the DLQ, saying where it came from
        dlq = _records(cluster.bootstrap, "uploads.dlq", 2 * n, timeout_s=60)
        again = _records(cluster.bootstrap, "uploads.dlq", 3 * n, timeout_s=3)
    core.close()
    assert (rep.scanned, rep.matched, rep.replayed) == (n, n, n), rep
    assert rep.by_target == {"uploads": n}
    assert len(dlq) == 2 * n and len(again) == 2 * n  # nothing re-sent a second time
    back = [dict(m.headers()) for m in dlq[n:]]
    assert all(h[REPLAYED_FROM_HEADER].startswith(b"uploads.dlq-0-") for h in back)
    assert sorted(h[REPLAYED_FROM_HEADER] for h in back) == [
        f"uploads.dlq-0-{i}".encode() for i in range(n)
    ]


def test_follow_mode_does_not_replay_a_failed_replay_again(
    cluster: MockCluster, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    core = TaggingCore(encoder, sample_ts, metrics=Metrics(CollectorRegistry()))
    n = len(BAD)
    stop = threading.Event()
    live: list[ReplayReport] = []  # the report as it goes (follow mode runs until stopped)

    def follow() -> ReplayReport:
        return replay_dlq(
            cluster.bootstrap, "uploads.dlq", follow=True, stop=stop, progress=live.append
        )

    with running(service(settings_for(cluster.bootstrap), core)):
        _send_bad(cluster.bootstrap)
        read_topic(cluster.bootstrap, "uploads.dlq", expect=n)
        result: list[ReplayReport] = []
        t = threading.Thread(target=lambda: result.append(follow()), daemon=True)
        t.start()
        _wait(lambda: bool(live) and live[-1].scanned >= 2 * n)  # the failed replays are back
        time.sleep(1.0)  # room for a wrong re-send to show
        stop.set()
        t.join(10)
        assert not t.is_alive(), "follow mode did not stop"
        dlq = _records(cluster.bootstrap, "uploads.dlq", 3 * n, timeout_s=3)
    core.close()
    (rep,) = result
    assert (rep.scanned, rep.replayed, rep.skipped_replayed) == (2 * n, n, n), rep
    assert len(dlq) == 2 * n


def _dead_letter(key: str, value: bytes, truncate: bool) -> tuple[bytes, list[Any]]:
    headers = connect_error_headers(
        "uploads", 0, 0, [("trace", b"t")], "decode", ValueError("bad"), "oversize"
    )
    if not truncate:
        return value, headers
    cut = shrink(key.encode(), value, headers, 2)
    assert cut is not None and cut[1] is not None
    return cut[1], cut[2]


def test_truncated_dead_letters_are_skipped_and_counted(
    cluster: MockCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.create_topic("replayed", 1)
    p = Producer({"bootstrap.servers": cluster.bootstrap})
    whole = b'{"id": "w", "caption": "' + b"x" * 3000 + b'"}'
    for i, truncate in enumerate([False, True, False, True, True]):
        value, headers = _dead_letter(f"k{i}", whole, truncate)
        assert (TRUNCATED_HEADER in dict(headers)) == truncate
        p.produce("uploads.dlq", key=f"k{i}".encode(), value=value, headers=headers)
    assert p.flush(10) == 0
    argv = ["replay-dlq", "--bootstrap-servers", cluster.bootstrap, "--to-topic", "replayed"]
    assert cli_exit([*argv, "--dry-run", "--json"]) in (0, None)
    dry = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (dry["matched"], dry["replayed"], dry["skipped_truncated"]) == (2, 0, 3)
    assert cli_exit([*argv, "--json"]) in (0, None)
    captured = capsys.readouterr()
    out = orjson.loads(captured.out.strip().splitlines()[-1])
    assert (out["scanned"], out["replayed"], out["skipped_truncated"]) == (5, 2, 3)
    assert "skipped 3 truncated" in " ".join(captured.err.split())
    back = read_topic(cluster.bootstrap, "replayed", expect=2, settle_s=1.0)
    assert sorted(m.key() for m in back) == [b"k0", b"k2"]
    assert all(m.value() == whole for m in back)


def test_the_decisions_reader_stops_at_the_end_seen_at_start(cluster: MockCluster) -> None:
    """Records keep arriving while it reads: it returns with those there at start."""
    cluster.create_topic("decisions", 2)
    p = Producer({"bootstrap.servers": cluster.bootstrap, "linger.ms": 0})
    before = 300
    for i in range(before):
        p.produce("decisions", key=b"%d" % i, value=orjson.dumps({"id": f"d{i}"}))
    assert p.flush(10) == 0
    writing = threading.Event()
    done = threading.Event()
    written = [before]

    def keep_writing() -> None:
        i = before
        while not done.is_set():
            p.produce("decisions", key=b"%d" % i, value=orjson.dumps({"id": f"d{i}"}))
            p.poll(0)
            i += 1
            written[0] = i
            writing.set()
            time.sleep(0.002)
        p.flush(10)

    feeder = threading.Thread(target=keep_writing, daemon=True)
    feeder.start()
    try:
        writing.wait(5)
        records = _in_thread(lambda: read_decisions(cluster.bootstrap, "decisions"), 20)
        during = written[0]
        time.sleep(0.5)
        assert written[0] > during, "the writer stopped: the test proves nothing"
    finally:
        done.set()
        feeder.join(10)
    ids = {r["id"] for r in records}
    assert {f"d{i}" for i in range(before)} <= ids
    assert len(ids) == len(records)


# -- the end logic on a scripted consumer: no broker, every case exact ------------------


@dataclass
class _TopicMd:
    partitions: dict[int, object]
    error: object = None


@dataclass
class _Md:
    topics: dict[str, _TopicMd]


class ScriptedConsumer:
    """Answers `scan`'s calls: watermarks per partition, then the given batches, then none."""

    def __init__(
        self,
        listed: dict[int, int],
        batches: list[list[Message]],
        fetched: dict[int, int] | None = None,
    ) -> None:
        self.listed, self.fetched = listed, fetched or listed
        self.batches = list(batches)
        self.assigned: list[int] = []
        self.paused: list[int] = []

    def list_topics(self, topic: str, timeout: float) -> _Md:
        return _Md({topic: _TopicMd(dict.fromkeys(self.listed))})

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float = 0, cached: bool = False
    ) -> tuple[int, int]:
        return 0, (self.fetched if cached else self.listed)[tp.partition]

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = [tp.partition for tp in tps]

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused += [tp.partition for tp in tps]

    def consume(self, n: int, timeout: float) -> list[Message]:
        if self.batches:
            return self.batches.pop(0)
        time.sleep(min(timeout, 0.01))
        return []


def _recs(p: int, offsets: range) -> list[Message]:
    return [Message(topic="t", partition=p, offset=o, value=b"%d" % o) for o in offsets]


def _eof(p: int, offset: int) -> Message:
    return Message(
        topic="t", partition=p, offset=offset, error=KafkaError(KafkaError._PARTITION_EOF)
    )


def _scan(c: ScriptedConsumer, **kw: Any) -> list[tuple[int, int]]:
    consumer: Any = c
    out = _in_thread(lambda: list(scan(consumer, "t", stall_s=2.0, **kw)), timeout_s=10)
    return [(m.partition() or 0, m.offset() or 0) for m in out]


def test_scan_stops_at_the_watermark_without_an_end_of_partition() -> None:
    """A batch reaching past the watermark (records that arrived after the start), no EOF."""
    c = ScriptedConsumer({0: 3, 1: 2}, [_recs(0, range(0, 6)) + _recs(1, range(0, 5))])
    assert _scan(c) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert sorted(c.paused) == [0, 1]
    # compacted: 2 and 3 are gone, 5 and 6 arrived after the start (watermark 4)
    c = ScriptedConsumer({0: 4}, [_recs(0, range(0, 2)) + _recs(0, range(5, 7))])
    assert _scan(c) == [(0, 0), (0, 1)]


def test_scan_stops_at_an_end_of_partition_below_the_watermark() -> None:
    """Compacted or transactional: the watermark points past the last readable record."""
    c = ScriptedConsumer({0: 10}, [_recs(0, range(0, 4)), [_eof(0, 9)]])
    assert _scan(c) == [(0, o) for o in range(4)]


def test_scan_skips_empty_partitions_at_once() -> None:
    c = ScriptedConsumer({0: 0, 1: 2}, [_recs(1, range(0, 2))])
    assert _scan(c) == [(1, 0), (1, 1)]
    assert c.assigned == [1]
    assert _scan(ScriptedConsumer({0: 0}, [])) == []


def test_scan_raises_the_end_to_the_first_fetch_watermark() -> None:
    """Tansu lists the last batch's first offset + 1; its fetch answers say the truth."""
    batch = _recs(0, range(0, 7))
    c = ScriptedConsumer({0: 1}, [batch, _recs(0, range(7, 9))], fetched={0: 7})
    assert _scan(c) == [(0, o) for o in range(7)]


def test_scan_raises_when_a_pass_stalls() -> None:
    from tagsys import TagstreamError

    c = ScriptedConsumer({0: 5}, [_recs(0, range(0, 2))])
    with pytest.raises(TagstreamError, match="no record and no end of partition"):
        _scan(c)


def test_follow_mode_stops_on_sigterm_with_its_report(cluster: MockCluster) -> None:
    cluster.create_topic("replayed", 1)
    p = Producer({"bootstrap.servers": cluster.bootstrap})
    value, headers = _dead_letter("k", b'{"id": "k"}', truncate=False)
    p.produce("uploads.dlq", key=b"k", value=value, headers=headers)
    assert p.flush(10) == 0
    argv = ["replay-dlq", "--bootstrap-servers", cluster.bootstrap, "--to-topic", "replayed"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", *argv, "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        (back,) = read_topic(cluster.bootstrap, "replayed", expect=1, timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and back.key() == b"k"
    rep = orjson.loads(out.decode().strip().splitlines()[-1])
    assert (rep["scanned"], rep["replayed"], rep["skipped_replayed"]) == (1, 1, 0)
