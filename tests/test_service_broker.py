"""The service against the real embedded broker (Tansu)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import numpy.typing as npt
import orjson
import pytest
from prometheus_client import CollectorRegistry

from consumer.tagging.core import Prepared, TaggingCore
from consumer.tagging.events import UploadEvent, load_schema
from consumer.tagging.metrics import Metrics
from consumer.tools.broker import EmbeddedBroker, free_port
from consumer.tools.send import send_lines
from models_onnx import OnnxEncoder
from tagsys import TagSystem
from tests.kafka_helpers import (
    committed_total,
    make_events,
    make_topics,
    read_topic,
    running,
    service,
    settings_for,
)

pytestmark = pytest.mark.broker


def _core(encoder: OnnxEncoder, ts: TagSystem) -> TaggingCore:
    return TaggingCore(encoder, ts, metrics=Metrics(CollectorRegistry()))


class _OverlapProbe(TaggingCore):
    """Records whether the next batch was prepared while the first one was encoding."""

    def __init__(self, *a: Any, wait_s: float, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.wait_s = wait_s
        self.prepared = 0
        self.second_prepared = threading.Event()
        self.overlapped: bool | None = None

    def prepare(self, events: list[UploadEvent], texts: list[str] | None = None) -> Prepared:
        self.prepared += 1
        if self.prepared == 2:
            self.second_prepared.set()
        return super().prepare(events, texts)

    def encode_prepared(self, prep: Prepared) -> npt.NDArray[np.float32]:
        if self.overlapped is None:  # the first batch: wait for the loop to read the next
            self.overlapped = self.second_prepared.wait(self.wait_s)
        return super().encode_prepared(prep)


@pytest.mark.parametrize("pipeline", [True, False])
def test_the_next_batch_is_tokenized_while_this_one_encodes(
    pipeline: bool, broker: EmbeddedBroker, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    make_topics(broker.bootstrap, 1)
    events = make_events(40)
    send_lines(broker.bootstrap, "uploads", events)
    core = _OverlapProbe(
        encoder, sample_ts, metrics=Metrics(CollectorRegistry()), wait_s=10 if pipeline else 2
    )
    s = settings_for(broker.bootstrap, batch_size=8, pipeline=pipeline)
    with running(service(s, core)):
        out = read_topic(broker.bootstrap, "tags", expect=40)
    assert core.overlapped is pipeline
    assert len({m.key() for m in out}) == 40 and len(out) == 40
    assert committed_total(broker.bootstrap, s.group_id, "uploads", 1) == 40
    core.close()


def test_n_events_in_n_tag_events_out_with_the_same_keys(
    broker: EmbeddedBroker, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    make_topics(broker.bootstrap, 3)
    events = make_events(200)
    send_lines(broker.bootstrap, "uploads", events)
    core = _core(encoder, sample_ts)
    s = settings_for(broker.bootstrap)
    with running(service(s, core)):
        out = read_topic(broker.bootstrap, "tags", expect=200)
    ids = {orjson.loads(e)["id"] for e in events}
    assert {m.key().decode() for m in out} == ids
    schema = load_schema("tag-event")
    for m in out:
        payload = orjson.loads(m.value())
        assert payload["id"] == m.key().decode()
        jsonschema.validate(payload, schema)
        h = dict(m.headers())
        assert h["ce_specversion"] == b"1.0" and h["ce_type"] == b"dev.tagstream.tags.v1"
        assert h["ce_subject"] == m.key() and h["ce_id"].startswith(b"uploads-")
    r = core.metrics.registry
    assert r.get_sample_value("tagstream_events_consumed_total", {"outcome": "ok"}) == 200
    produced = sum(
        r.get_sample_value("tagstream_events_produced_total", {"decision": d}) or 0
        for d in ("encoder", "llm", "review")
    )
    assert produced == 200
    assert r.get_sample_value("tagstream_end_to_end_seconds_count") == 200
    # after a clean stop every input offset is committed
    assert committed_total(broker.bootstrap, s.group_id, "uploads", 3) == 200
    core.close()


def test_restart_resumes_from_committed_offsets_without_loss(
    broker: EmbeddedBroker, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    make_topics(broker.bootstrap, 3)
    first, second = make_events(60, "a"), make_events(40, "b")
    s = settings_for(broker.bootstrap)
    send_lines(broker.bootstrap, "uploads", first)
    core1 = _core(encoder, sample_ts)
    with running(service(s, core1)):
        read_topic(broker.bootstrap, "tags", expect=60)
    assert committed_total(broker.bootstrap, s.group_id, "uploads", 3) == 60
    send_lines(broker.bootstrap, "uploads", second)
    core2 = _core(encoder, sample_ts)
    with running(service(s, core2)):
        out = read_topic(broker.bootstrap, "tags", expect=100, settle_s=2.0)
    keys = [m.key().decode() for m in out]
    assert set(keys) == {orjson.loads(e)["id"] for e in first + second}
    # the second run started at the committed offsets: nothing of the first run again
    assert len(keys) == 100
    assert (
        core2.metrics.registry.get_sample_value(
            "tagstream_events_consumed_total", {"outcome": "ok"}
        )
        == 40
    )
    core1.close()
    core2.close()


def test_malformed_events_in_the_middle_do_not_stop_the_rest(
    broker: EmbeddedBroker, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    make_topics(broker.bootstrap, 1)
    good = make_events(30)
    bad = [
        b"{not json",
        b'{"title": "no id"}',
        b'{"id": 5}',
        b"\xff\xfe\xfd",
        b"[]",
        b'{"id": "x", "schema_version": 9}',
    ]
    send_lines(broker.bootstrap, "uploads", good[:15] + bad + good[15:])
    core = _core(encoder, sample_ts)
    s = settings_for(broker.bootstrap)
    with running(service(s, core)):
        out = read_topic(broker.bootstrap, "tags", expect=30, settle_s=1.0)
    assert {m.key().decode() for m in out} == {orjson.loads(e)["id"] for e in good}
    r = core.metrics.registry
    reasons = {"not_json": 1, "missing_id": 1, "schema": 2, "not_utf8": 1, "schema_version": 1}
    for reason, n in reasons.items():
        assert r.get_sample_value("tagstream_events_consumed_total", {"outcome": reason}) == n
    assert committed_total(broker.bootstrap, s.group_id, "uploads", 1) == 36
    core.close()


def test_cli_run_serves_metrics_and_exits_0_on_sigterm_with_offsets_committed(
    broker: EmbeddedBroker, model_dir: Path, tmp_path: Path
) -> None:
    make_topics(broker.bootstrap, 2)
    events = make_events(50)
    send_lines(broker.bootstrap, "uploads", events)
    port = free_port()
    env = os.environ | {
        "TAGSTREAM_MODEL_DIR": str(model_dir),
        "TAGSTREAM_SESSION_TIMEOUT_MS": "6000",
    }
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consumer.cli",
            "run",
            "--bootstrap-servers",
            broker.bootstrap,
            "--input-topic",
            "uploads",
            "--output-topic",
            "tags",
            "--group-id",
            "cli",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            "--llm",
            "none",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        out = read_topic(broker.bootstrap, "tags", expect=50, timeout_s=90)
        assert len({m.key() for m in out}) == 50
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode()
        assert 'tagstream_events_consumed_total{outcome="ok"} 50.0' in body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            assert r.status == 200
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    assert committed_total(broker.bootstrap, "cli", "uploads", 2) == 50


def test_send_cli_and_a_tag_system_from_disk(
    broker: EmbeddedBroker, encoder: OnnxEncoder, sample_ts: TagSystem, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from consumer.cli import app
    from consumer.service.stack import build_stack

    make_topics(broker.bootstrap, 2)
    f = tmp_path / "events.jsonl"
    f.write_bytes(b"\n".join(make_events(20)) + b"\n\n")
    res = CliRunner().invoke(
        app, ["send", str(f), "--bootstrap-servers", broker.bootstrap, "--topic", "uploads"]
    )
    assert res.exit_code == 0, res.output
    sample_ts.save(tmp_path / "ts")
    s = settings_for(
        broker.bootstrap, tag_system=tmp_path / "ts", model_dir=encoder.folder.parent, device="cpu"
    )
    with build_stack(s, CollectorRegistry()) as stack, running(service(s, stack.core)):
        out = read_topic(broker.bootstrap, "tags", expect=20)
    versions = {orjson.loads(m.value())["tag_system_version"] for m in out}
    assert versions == {sample_ts.version_id}
