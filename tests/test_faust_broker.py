"""The Faust runtime (`tagstream run --runtime faust`) against the embedded broker: the same
core, events, DLQ and metrics; at-least-once across a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import orjson
import pytest

from consumer.broker import EmbeddedBroker, free_port
from consumer.events import load_schema
from consumer.send import send_lines
from tests.kafka_helpers import (
    TopicReader,
    committed_total,
    make_events,
    make_topics,
    read_topic,
)

pytestmark = pytest.mark.broker
pytest.importorskip("faust", reason="the Faust runtime needs the [faust] extra")


def test_faust_runtime_refuses_what_it_cannot_do() -> None:
    from consumer.config import Settings
    from consumer.faust_runtime import check_supported
    from tagsys.errors import TagstreamError

    with pytest.raises(TagstreamError, match="pause"):
        check_supported(Settings(runtime="faust", llm_unavailable="pause"))
    with pytest.raises(TagstreamError, match="decisions-topic"):
        check_supported(Settings(runtime="faust", decisions_topic="decisions"))
    check_supported(Settings(runtime="faust"))


def _start(bootstrap: str, model_dir: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "TAGSTREAM_MODEL_DIR": str(model_dir),
        "TAGSTREAM_SESSION_TIMEOUT_MS": "6000",
        "TAGSTREAM_FAUST_LOG_LEVEL": "INFO",
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consumer.cli",
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
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )


def test_faust_runtime_tags_dead_letters_serves_metrics_and_commits(
    broker: EmbeddedBroker, model_dir: Path, tmp_path: Path
) -> None:
    make_topics(broker.bootstrap, 2)
    events = make_events(80, "f")
    send_lines(broker.bootstrap, "uploads", [*events[:40], b"{not json", b"[1, 2]", *events[40:]])
    port = free_port()
    log = tmp_path / "faust.log"
    proc = _start(broker.bootstrap, model_dir, log, port)
    try:
        out = read_topic(broker.bootstrap, "tags", expect=80, timeout_s=120)
        assert {m.key().decode() for m in out} == {orjson.loads(e)["id"] for e in events}
        schema = load_schema("tag-event")
        for m in out:
            jsonschema.validate(orjson.loads(m.value()), schema)
            assert dict(m.headers())["ce_type"] == b"dev.tagstream.tags.v1"
        dlq = read_topic(broker.bootstrap, "uploads.dlq", expect=1, timeout_s=30, settle_s=3)
        reasons = sorted(dict(m.headers())["__tagstream.errors.reason"] for m in dlq)
        assert reasons == [b"not_json", b"schema"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode()
        assert 'tagstream_events_consumed_total{outcome="ok"} 80.0' in body
        assert 'tagstream_dlq_events_total{reason="not_json"} 1.0' in body
        assert 'tagstream_stage_duration_seconds_count{stage="encode"}' in body
        proc.send_signal(signal.SIGTERM)
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        reader.close()
        if proc.poll() is None:
            proc.kill()
