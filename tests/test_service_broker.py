"""The service against the real embedded broker (Tansu)."""

from __future__ import annotations

import signal
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
from consumer.tools.broker import free_port
from models_onnx import OnnxEncoder
from tagsys import TagSystem
from tests.kafka_helpers import (
    KafkaKit,
    make_events,
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

    def prepare(
        self, events: list[UploadEvent], texts: list[str] | None = None, **kw: Any
    ) -> Prepared:
        self.prepared += 1
        if self.prepared == 2:
            self.second_prepared.set()
        return super().prepare(events, texts, **kw)

    def encode_prepared(self, prep: Prepared) -> npt.NDArray[np.float32]:
        if self.overlapped is None:  # the first batch: wait for the loop to read the next
            self.overlapped = self.second_prepared.wait(self.wait_s)
        return super().encode_prepared(prep)


@pytest.mark.parametrize("pipeline", [True, False])
def test_the_next_batch_is_tokenized_while_this_one_encodes(
    pipeline: bool, kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    kafka.topics(1)
    events = make_events(40)
    kafka.send(events)
    core = _OverlapProbe(
        encoder, sample_ts, metrics=Metrics(CollectorRegistry()), wait_s=10 if pipeline else 2
    )
    s = kafka.settings(batch_size=8, pipeline=pipeline)
    with kafka.serve(s, core):
        out = kafka.read("tags", expect=40)
    assert core.overlapped is pipeline
    assert len({m.key() for m in out}) == 40 and len(out) == 40
    assert kafka.committed(s.group_id, 1) == 40
    core.close()


def test_n_events_in_n_tag_events_out_with_the_same_keys(
    kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    kafka.topics(3)
    events = make_events(200)
    kafka.send(events)
    core = _core(encoder, sample_ts)
    s = kafka.settings()
    with kafka.serve(s, core):
        out = kafka.read("tags", expect=200)
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
    assert kafka.committed(s.group_id, 3) == 200
    core.close()


def test_restart_resumes_from_committed_offsets_without_loss(
    kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    kafka.topics(3)
    first, second = make_events(60, "a"), make_events(40, "b")
    s = kafka.settings()
    kafka.send(first)
    core1 = _core(encoder, sample_ts)
    with kafka.serve(s, core1):
        kafka.read("tags", expect=60)
    assert kafka.committed(s.group_id, 3) == 60
    kafka.send(second)
    core2 = _core(encoder, sample_ts)
    with kafka.serve(s, core2):
        out = kafka.read("tags", expect=100, settle_s=2.0)
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
    kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    kafka.topics(1)
    good = make_events(30)
    bad = [
        b"{not json",
        b'{"title": "no id"}',
        b'{"id": 5}',
        b"\xff\xfe\xfd",
        b"[]",
        b'{"id": "x", "schema_version": 9}',
    ]
    kafka.send(good[:15] + bad + good[15:])
    core = _core(encoder, sample_ts)
    s = kafka.settings()
    with kafka.serve(s, core):
        out = kafka.read("tags", expect=30, settle_s=1.0)
    assert {m.key().decode() for m in out} == {orjson.loads(e)["id"] for e in good}
    r = core.metrics.registry
    reasons = {"not_json": 1, "missing_id": 1, "schema": 2, "not_utf8": 1, "schema_version": 1}
    for reason, n in reasons.items():
        assert r.get_sample_value("tagstream_events_consumed_total", {"outcome": reason}) == n
    assert kafka.committed(s.group_id, 1) == 36
    core.close()


def test_cli_run_serves_metrics_and_exits_0_on_sigterm_with_offsets_committed(
    kafka: KafkaKit, model_dir: Path, tmp_path: Path
) -> None:
    kafka.topics(2)
    events = make_events(50)
    kafka.send(events)
    port = free_port()
    log = tmp_path / "run.log"
    args = ["--input-topic", "uploads", "--output-topic", "tags", "--group-id", "cli"]
    proc = kafka.spawn(model_dir, log, *args, "--metrics-port", str(port), "--llm", "none")
    try:
        out = kafka.read("tags", expect=50, timeout_s=90)
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
    assert kafka.committed("cli", 2) == 50


def test_send_cli_and_a_tag_system_from_disk(
    kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from consumer.cli import app
    from consumer.service.stack import build_stack

    kafka.topics(2)
    f = tmp_path / "events.jsonl"
    f.write_bytes(b"\n".join(make_events(20)) + b"\n\n")
    res = CliRunner().invoke(
        app, ["send", str(f), "--bootstrap-servers", kafka.bootstrap, "--topic", "uploads"]
    )
    assert res.exit_code == 0, res.output
    sample_ts.save(tmp_path / "ts")
    s = kafka.settings(tag_system=tmp_path / "ts", model_dir=encoder.folder.parent, device="cpu")
    with build_stack(s, CollectorRegistry()) as stack, kafka.serve(s, stack.core):
        out = kafka.read("tags", expect=20)
    versions = {orjson.loads(m.value())["tag_system_version"] for m in out}
    assert versions == {sample_ts.version_id}
