"""The Faust runtime (`tagstream run --runtime faust`) against the embedded broker: the same
core, events, DLQ, metrics and health; at-least-once across a kill -9, a broken core and
records of any size."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import faust
import jsonschema
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from consumer.service.faust_runtime import EXIT_BATCH_FAILED
from consumer.tagging.events import load_schema
from consumer.tools.broker import EmbeddedBroker, free_port
from consumer.tools.send import send_lines
from tests.kafka_helpers import (
    TopicReader,
    committed_total,
    http_get,
    make_events,
    make_topics,
    read_topic,
    reap,
    terminate,
)

pytestmark = pytest.mark.broker
REPO = Path(__file__).resolve().parents[1]


def test_faust_runtime_refuses_what_it_cannot_do() -> None:
    from consumer.service.faust_runtime import check_supported
    from consumer.tagging.config import Settings
    from tagsys.errors import TagstreamError

    with pytest.raises(TagstreamError, match="pause"):
        check_supported(Settings(runtime="faust", llm_unavailable="pause"))
    with pytest.raises(TagstreamError, match="decisions-topic"):
        check_supported(Settings(runtime="faust", decisions_topic="decisions"))
    check_supported(Settings(runtime="faust"))
    assert faust.__version__ == "0.15.3"  # the version whose ack/commit paths we rely on


def _launcher(tmp_path: Path, patch: str) -> Path:
    """`tagstream` with the tagging core patched first: a fault injected from the test, with
    no hook for it in the product."""
    script = tmp_path / "launch.py"
    script.write_text(
        "import sys\n"
        "from consumer.tagging.core import TaggingCore\n"
        f"{textwrap.dedent(patch)}\n"
        "from consumer.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    return script


def _start(
    bootstrap: str,
    model_dir: Path,
    log: Path,
    port: int,
    launcher: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    env = (
        os.environ
        | {
            "TAGSTREAM_MODEL_DIR": str(model_dir),
            "TAGSTREAM_SESSION_TIMEOUT_MS": "6000",
            "TAGSTREAM_FAUST_LOG_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        | (env or {})
    )
    program = [str(launcher)] if launcher else ["-m", "consumer.cli"]
    return subprocess.Popen(
        [
            sys.executable,
            *program,
            "run",
            "--runtime",
            "faust",
            "--bootstrap-servers",
            bootstrap,
            "--group-id",
            "faust",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            "--batch-size",
            "16",
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )


def _sample(body: str, name: str) -> float:
    """The value of one sample (name with labels, as exposed) in a /metrics body."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", body, re.M)
    assert m, f"no {name} in /metrics"
    return float(m.group(1))


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return {tp.partition: max(tp.offset, 0) for tp in tps}


def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-3000:]


def test_faust_runtime_tags_dead_letters_serves_metrics_and_health_and_commits(
    broker: EmbeddedBroker, model_dir: Path, tmp_path: Path
) -> None:
    make_topics(broker.bootstrap, 2)
    events = make_events(80, "f")
    send_lines(broker.bootstrap, "uploads", [*events[:40], b"{not json", b"[1, 2]", *events[40:]])
    port = free_port()
    log = tmp_path / "faust.log"
    # the least max.poll.interval: idle for longer than that, the worker must stay alive
    proc = _start(
        broker.bootstrap, model_dir, log, port, env={"TAGSTREAM_MAX_POLL_INTERVAL_MS": "10000"}
    )
    try:
        out = read_topic(broker.bootstrap, "tags", expect=80, timeout_s=120)
        all_tagged = time.monotonic()
        assert {m.key().decode() for m in out} == {orjson.loads(e)["id"] for e in events}
        schema = load_schema("tag-event")
        for m in out:
            jsonschema.validate(orjson.loads(m.value()), schema)
            assert dict(m.headers())["ce_type"] == b"dev.tagstream.tags.v1"
        dlq = read_topic(broker.bootstrap, "uploads.dlq", expect=1, timeout_s=30, settle_s=3)
        reasons = sorted(dict(m.headers())["__tagstream.errors.reason"] for m in dlq)
        assert reasons == [b"not_json", b"schema"]
        assert http_get(port, "/healthz")[0] == 200
        assert http_get(port, "/readyz")[0] == 200
        body = http_get(port, "/metrics")[1]
        assert 'tagstream_events_consumed_total{outcome="ok"} 80.0' in body
        assert 'tagstream_dlq_events_total{reason="not_json"} 1.0' in body
        assert 'tagstream_stage_duration_seconds_count{stage="encode"}' in body
        # parity with the default runtime: stages, end-to-end latency, commits, lag
        for stage in ("decode", "produce"):
            assert _sample(body, f'tagstream_stage_duration_seconds_count{{stage="{stage}"}}') > 0
        assert _sample(body, "tagstream_end_to_end_seconds_count") == 80
        assert _sample(body, 'tagstream_commits_total{result="ok"}') >= 1
        assert _sample(body, 'tagstream_commits_total{result="error"}') == 0  # exists, at 0
        for p in (0, 1):  # values not asserted: Tansu's high watermark is not to be trusted
            _sample(body, f'tagstream_consumer_lag_messages{{partition="{p}",topic="uploads"}}')
        # idle past max.poll.interval with nothing to do: still alive and ready
        time.sleep(max(0.0, all_tagged + 12 - time.monotonic()))
        assert http_get(port, "/healthz")[0] == 200, log.read_text()[-3000:]
        assert http_get(port, "/readyz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        codes: list[int] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not codes or codes[-1] == 200):
            codes.append(http_get(port, "/readyz")[0])
            time.sleep(0.02)
        assert codes[-1] == 503, codes  # not ready while stopping, before the port closes
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert committed_total(broker.bootstrap, "faust", "uploads", 2) == 82


def test_faust_runtime_restart_after_kill_loses_nothing(
    broker: EmbeddedBroker, model_dir: Path, tmp_path: Path
) -> None:
    make_topics(broker.bootstrap, 2)
    events = make_events(600, "k")
    send_lines(broker.bootstrap, "uploads", events)
    log = tmp_path / "faust.log"
    reader = TopicReader(broker.bootstrap, "tags")
    proc = _start(broker.bootstrap, model_dir, log, free_port())
    try:
        deadline = time.monotonic() + 120
        while len(reader.keys) < 150 and time.monotonic() < deadline:
            reader.poll()
        assert len(reader.keys) >= 150, log.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)  # no commit, no flush: a crash
        proc.wait(30)
        proc = _start(broker.bootstrap, model_dir, log, free_port())
        deadline = time.monotonic() + 180
        while len(reader.keys) < 600 and time.monotonic() < deadline:
            reader.poll()
        ids = {orjson.loads(e)["id"].encode() for e in events}
        assert ids <= reader.keys, f"lost {len(ids - reader.keys)}; {log.read_text()[-2000:]}"
        assert terminate(proc) == 0
    finally:
        reader.close()
        reap(proc)


BROKEN_AFTER_FIRST_BATCH = """
import itertools
import time

_decide = TaggingCore.decide
_calls = itertools.count()


def decide(self, *args, **kwargs):
    if next(_calls) >= 1:  # the first batch is tagged; then the model is broken
        time.sleep(1.5)  # failing slowly: commit ticks (1 s) pass while the batch fails
        raise RuntimeError("the model is broken")
    return _decide(self, *args, **kwargs)


TaggingCore.decide = decide
"""


def test_faust_runtime_exits_nonzero_on_a_failed_batch_and_commits_nothing_of_it(
    broker: EmbeddedBroker, model_dir: Path, tmp_path: Path
) -> None:
    make_topics(broker.bootstrap, 2)
    events = make_events(40, "b")
    send_lines(broker.bootstrap, "uploads", events)
    log = tmp_path / "faust.log"
    broken = _launcher(tmp_path, BROKEN_AFTER_FIRST_BATCH)
    proc = _start(broker.bootstrap, model_dir, log, free_port(), launcher=broken)
    try:
        # CoreBrokenError: the canary fails too; the worker must stop, not skip the batch
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == EXIT_BATCH_FAILED, log.read_text()[-3000:]
    assert "batch_failed_exiting" in log.read_text()
    tagged = {m.key() for m in read_topic(broker.bootstrap, "tags", expect=1, timeout_s=5)}
    assert len(tagged) <= 16  # the first batch at most: nothing of the failed one
    assert read_topic(broker.bootstrap, "uploads.dlq", expect=1, timeout_s=2) == []
    committed = _committed(broker.bootstrap, "faust", "uploads", 2)
    assert sum(committed.values()) > 0  # the first batch was committed: commits did run
    for m in read_topic(broker.bootstrap, "uploads", expect=40, timeout_s=30):
        if m.offset() < committed[m.partition()]:  # committed only what was tagged
            assert m.key() in tagged, (m.partition(), m.offset(), committed)

    # a restart with a working model re-reads the failed batch: everything is tagged
    reader = TopicReader(broker.bootstrap, "tags")
    proc = _start(broker.bootstrap, model_dir, log, free_port())
    try:
        ids = {orjson.loads(e)["id"].encode() for e in events}
        deadline = time.monotonic() + 120
        while not ids <= reader.keys and time.monotonic() < deadline:
            reader.poll()
        assert ids <= reader.keys, f"lost {len(ids - reader.keys)}; {log.read_text()[-2000:]}"
        _stop(proc, log)
    finally:
        reader.close()
        if proc.poll() is None:
            proc.kill()
    assert committed_total(broker.bootstrap, "faust", "uploads", 2) == 40


def test_faust_runtime_dead_letters_1mb_records_with_default_settings(
    broker: EmbeddedBroker, model_dir: Path, tmp_path: Path
) -> None:
    make_topics(broker.bootstrap, 2)
    events = make_events(40, "m")
    # under max_event_bytes (1 MiB) but not an event (id is no string): the dead letter, value
    # plus headers, is larger than a producer's default request size
    poison = [orjson.dumps({"id": n, "caption": c * 999_700}) for n, c in ((5, "x"), (6, "y"))]
    lines = [*events[:13], poison[0], *events[13:29], poison[1], *events[29:]]
    send_lines(broker.bootstrap, "uploads", lines, extra={"message.max.bytes": 2_000_000})
    log = tmp_path / "faust.log"
    port = free_port()
    proc = _start(broker.bootstrap, model_dir, log, port)
    dlq = TopicReader(broker.bootstrap, "uploads.dlq")
    try:
        out = read_topic(broker.bootstrap, "tags", expect=40, timeout_s=120)
        assert {m.key().decode() for m in out} == {orjson.loads(e)["id"] for e in events}
        deadline = time.monotonic() + 30
        while len(dlq.records) < 2 and time.monotonic() < deadline:
            dlq.poll()
        assert sorted(m.value() for m in dlq.records) == sorted(poison)  # whole, not cut
        assert [dict(m.headers())["__tagstream.errors.reason"] for m in dlq.records] == [
            b"schema",
            b"schema",
        ]
        deadline = time.monotonic() + 30
        while committed_total(broker.bootstrap, "faust", "uploads", 2) < 42:
            assert time.monotonic() < deadline, "offsets not committed to the end"
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]  # alive: no crash loop
        body = http_get(port, "/metrics")[1]
        assert _sample(body, 'tagstream_dlq_events_total{reason="schema"}') == 2
        assert _sample(body, "tagstream_dlq_truncated_total") == 0
        _stop(proc, log)
    finally:
        dlq.close()
        if proc.poll() is None:
            proc.kill()


STUCK_ENCODER = """
import time

_encode = TaggingCore.encode_prepared
_calls = []


def encode_prepared(self, prep):
    _calls.append(1)
    if len(_calls) == 1:  # the first batch hangs in the encoder for a while
        time.sleep(25)
    return _encode(self, prep)


TaggingCore.encode_prepared = encode_prepared
"""


def test_faust_runtime_health_fails_while_a_batch_is_stuck(
    broker: EmbeddedBroker, model_dir: Path, tmp_path: Path
) -> None:
    make_topics(broker.bootstrap, 1)
    events = make_events(5, "h")
    send_lines(broker.bootstrap, "uploads", events)
    log = tmp_path / "faust.log"
    port = free_port()
    stuck = _launcher(tmp_path, STUCK_ENCODER)
    proc = _start(
        broker.bootstrap,
        model_dir,
        log,
        port,
        launcher=stuck,
        env={"TAGSTREAM_MAX_POLL_INTERVAL_MS": "10000"},
    )
    reader = TopicReader(broker.bootstrap, "tags")
    try:
        seen: list[tuple[int, int]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not reader.poll(0.5):
            seen.append((http_get(port, "/healthz")[0], http_get(port, "/readyz")[0]))
        codes = [c for c in seen if c != (0, 0)]
        assert (503, 503) in codes, seen  # stuck past max.poll.interval (10 s): not alive
        # alive before that (while starting, and early in the stuck batch)
        assert 200 in [h for h, _ in codes[: codes.index((503, 503))]], seen
        deadline = time.monotonic() + 30
        while len(reader.keys) < 5 and time.monotonic() < deadline:
            reader.poll()
        assert len(reader.keys) == 5
        assert http_get(port, "/healthz")[0] == 200  # the batch finished: progress again
        _stop(proc, log)
    finally:
        reader.close()
        if proc.poll() is None:
            proc.kill()
