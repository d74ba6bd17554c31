"""Learning from the LLM: decision records, distillation, hot reload mid-stream."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from consumer.tagging.core import TaggingCore
from consumer.tagging.events import load_schema
from consumer.tagging.llm import SelectiveTagger
from consumer.tagging.metrics import Metrics
from consumer.tools.broker import create_topics
from consumer.tools.distill import (
    Labelled,
    distill,
    folds_of,
    labelled_from_decisions,
    split_of,
)
from consumer.tools.distill_topic import read_decisions
from models_onnx import OnnxEncoder
from tagsys import TagSystem, TagSystemError
from tagsys.distill import fit_head
from tagsys.tagsystem import EMB_FILE
from tests.conftest import (
    FakeOpenAI,
    Responder,
    cli_exit,
    cli_ok,
    completion,
    shortlist_of,
    write_labelled_jsonl,
)
from tests.kafka_helpers import (
    KafkaKit,
    make_events,
)


def test_split_is_stable_and_near_the_asked_share() -> None:
    ids = [f"item-{i}" for i in range(4000)]
    held = [i for i in ids if split_of(i, 0.3) == "heldout"]
    assert 0.27 < len(held) / len(ids) < 0.33
    assert held == [i for i in ids if split_of(i, 0.3) == "heldout"]  # same every run


def test_head_learns_what_the_names_miss() -> None:
    """Two tags whose name embeddings point the wrong way: the head must fix it."""
    rng = np.random.default_rng(0)
    d = 16
    centres = np.eye(d, dtype=np.float32)[:2]
    x = np.vstack([centres[i % 2] + 0.3 * rng.standard_normal(d) for i in range(400)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels = [[i % 2] for i in range(400)]
    names = centres[::-1].copy()  # swapped: zero-shot gets everything wrong
    zero_shot_acc = float(np.mean((x @ names.T).argmax(1) == np.arange(400) % 2))
    head = fit_head(x, labels, names)
    acc = float(np.mean(head.scores(x).argmax(1) == np.arange(400) % 2))
    assert zero_shot_acc < 0.1 and acc > 0.95
    assert head.kind == "softmax"
    assert np.allclose(head.scores(x).sum(1), 1.0, atol=1e-5)


def test_the_gate_is_calibrated_on_scores_of_items_the_head_never_saw(
    encoder: OnnxEncoder,
) -> None:
    """Labels that are noise, on more dimensions than items: a head learns them by heart, so
    its scores on the items it learnt from are confident and right, and a gate calibrated on
    them would auto-accept most items. Out-of-fold, it finds next to nothing to trust."""
    base, _ = _labelled_toy(encoder)
    rng = np.random.default_rng(0)
    n = 300
    emb = rng.standard_normal((n, base.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    gold = [frozenset({int(rng.integers(len(base.tags)))}) for _ in range(n)]
    noise = Labelled([f"n{i}" for i in range(n)], emb, [""] * n, gold)
    new, rep = distill(base, noise, holdout=0.2, target_precision=0.9)
    assert new.head is not None
    seen = [i for i in range(n) if split_of(f"n{i}", 0.2) == "train"]
    right = new.head.scores(emb[seen]).argmax(1) == [min(gold[i]) for i in seen]
    assert right.mean() > 0.95  # where it learnt, the head is right almost everywhere
    assert new.provenance["calibrated"]["fit_items"] == rep["train_items"] > 200
    assert new.provenance["calibrated"]["fit_auto_fraction"] < 0.1
    assert rep["after"]["auto_fraction"] < 0.1
    # with nothing held out, the live head learns every item (by heart, here)
    every, _ = distill(base, noise, holdout=0.0, target_precision=0.9)
    assert every.head is not None
    assert (every.head.scores(emb).argmax(1) == [min(g) for g in gold]).mean() > 0.95


def _short_of_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next gate distil fits for the version it writes (its first `calibrated` call)
    falls short of its target; the gates its check fits stay as they are."""
    import consumer.tools.distill as d

    real = d.calibrated
    calls: list[int] = []

    def short(ts: TagSystem, *args: Any) -> Any:
        new, cal = real(ts, *args)
        calls.append(1)
        if len(calls) > 1:
            return new, cal
        prov = {**new.provenance, "calibrated": {**new.provenance["calibrated"], "reached": False}}
        return replace(new, provenance=prov), replace(cal, reached=False)

    monkeypatch.setattr(d, "calibrated", short)


@pytest.mark.parametrize("holdout", [0.3, 0.0])
def test_a_gate_short_of_its_target_is_reported_as_the_service_runs_it(
    encoder: OnnxEncoder, monkeypatch: pytest.MonkeyPatch, holdout: float
) -> None:
    """The kept gate would accept items, but the service does not trust a gate short of its
    target, and the report's check shows what the service will do: accept nothing (with
    --holdout 0 too, where the check's own fold gates did reach it)."""
    base, data = _labelled_toy(encoder)
    fitted, ok = distill(base, data, holdout=holdout, target_precision=0.9)
    assert ok["reached"] and fitted.gate_fitted and ok["after"]["auto_fraction"] > 0.2
    _short_of_target(monkeypatch)
    new, rep = distill(base, data, holdout=holdout, target_precision=0.9)
    assert not rep["reached"] and not new.gate_fitted
    assert rep["fit_auto_fraction"] > 0.2  # the kept gate would accept items...
    assert rep["after"]["auto_fraction"] == 0.0  # ...which the service does not trust
    assert rep["after"]["llm_fraction"] == 1.0


def test_holdout_zero_learns_from_every_item_and_checks_out_of_fold(
    encoder: OnnxEncoder,
) -> None:
    base, data = _labelled_toy(encoder)
    new, rep = distill(base, data, holdout=0.0, target_precision=0.9)
    assert rep["checked_on"] == "out_of_fold" and rep["heldout_items"] == 0
    assert rep["train_items"] == rep["calibration_items"] == len(data.ids)
    assert new.provenance["distilled"]["fit_items"] == len(data.ids)  # the live head: all
    assert rep["after"]["recall_at_1"] > 0.9 and rep["after"]["auto_precision"] >= 0.9
    with pytest.raises(TagSystemError, match="cross"):
        distill(base, data, holdout=0.0, target_precision=0.9, calibration="split")
    with pytest.raises(TagSystemError, match="holdout"):
        distill(base, data, holdout=0.01, target_precision=0.9)
    _, quiet = distill(base, data, holdout=0.0, target_precision=0.9, check=False)
    assert quiet["after"] is None and quiet["fit_auto_precision"] is not None


def test_holdout_zero_judges_each_item_by_a_gate_fitted_without_it(
    encoder: OnnxEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gate judged on the rows it was fitted to looks better than it is: with nothing held
    out, each fold's items are judged by a gate calibrated on the other folds only."""
    import consumer.tools.distill as d

    base, data = _labelled_toy(encoder)
    fitted: list[int] = []
    judged: list[int] = []
    real_cal, real_out = d.calibrated, d.gate_outcomes
    monkeypatch.setattr(
        d, "calibrated", lambda ts, i, s, g, t: fitted.append(len(g)) or real_cal(ts, i, s, g, t)
    )

    def judge(ts: TagSystem, i: Any, s: Any, g: Any, **kw: Any) -> Any:
        judged.append(len(g))
        return real_out(ts, i, s, g, **kw)

    monkeypatch.setattr(d, "gate_outcomes", judge)
    d.distill(base, data, holdout=0.0, target_precision=0.9)
    n = len(data.ids)
    assert fitted[0] == n  # the live gate: every item
    checks = list(zip(fitted[1:], judged, strict=True))  # before: 5 folds, after: 5 folds
    assert len(checks) == 10 and sum(j for _, j in checks) == 2 * n
    assert all(f + j == n and j < n for f, j in checks)


def test_copies_of_a_text_share_a_fold_and_textless_items_spread() -> None:
    """A re-upload decided twice must not be learnt in one fold and checked in another."""
    n = 200
    texts = [f"post {i % 40}" for i in range(n)] + [""] * n  # five copies of each; no text
    ids = [f"i{i}" for i in range(2 * n)]
    d = Labelled(ids, np.zeros((2 * n, 4), np.float32), texts, [frozenset({0})] * (2 * n))
    fold = folds_of(d, 5)
    for t in {x for x in texts if x}:
        assert len({int(fold[i]) for i, x in enumerate(texts) if x == t}) == 1
    assert len(set(fold[:n].tolist())) == 5  # the texts spread over every fold
    assert len(set(fold[n:].tolist())) == 5  # items without text by their ids


def _labelled_toy(encoder: OnnxEncoder) -> tuple[TagSystem, Labelled]:
    from consumer.tools.evaluate import zero_shot

    topics = {
        "kitchen": ["baking bread at home", "a cake recipe", "slow cooked stew", "pasta sauce"],
        "sport": ["football match", "marathon training", "tennis serve", "cycling climb"],
        "tech": ["new phone review", "python bug fix", "graphics card test", "laptop battery"],
    }
    ts = zero_shot(sorted(topics), encoder)
    texts, gold, ids = [], [], []
    for n in range(30):
        for tag, examples in topics.items():
            texts.append(f"{examples[n % 4]} #{n}")
            gold.append(frozenset({ts.index_of(tag) or 0}))
            ids.append(f"{tag}-{n}")
    emb = encoder.encode(texts, kind="query")
    return ts, Labelled(ids, emb, texts, gold)


def test_distill_writes_a_loadable_version_with_a_report(
    encoder: OnnxEncoder, tmp_path: Path
) -> None:
    base, data = _labelled_toy(encoder)
    new, rep = distill(base, data, holdout=0.3, target_precision=0.9)
    assert new.head is not None and new.version_id != base.version_id
    # cross calibration: the head learns from every train item, the gate is fitted on them all
    assert rep["calibration"] == "cross" and rep["checked_on"] == "heldout"
    assert rep["train_items"] == rep["calibration_items"]
    assert rep["heldout_items"] + rep["train_items"] == len(data.ids)
    _, split = distill(base, data, holdout=0.3, target_precision=0.9, calibration="split")
    assert split["heldout_items"] + split["train_items"] + split["calibration_items"] == 90
    assert rep["after"]["recall_at_1"] >= rep["before"]["recall_at_1"]
    for side in ("before", "after"):  # no gate auto-accepts more than the oracle's ceiling
        r = rep[side]
        assert r["auto_ceiling"] is not None and 0.0 <= r["auto_ceiling"] <= 1.0
        if r["auto_precision"] is not None and r["auto_precision"] >= 0.9:
            assert r["auto_fraction"] <= r["auto_ceiling"] + 1e-9
    new.save(tmp_path / "d")
    again = TagSystem.load(tmp_path / "d")
    assert again.content_hash == new.content_hash and again.head is not None
    _idx, scores = again.shortlist(data.emb[:3], data.texts[:3])
    assert (scores <= 1.0).all() and (scores >= 0.0).all()
    # the service's core runs the distilled version as it is (what `run --tag-system` does)
    from consumer.tagging.events import UploadEvent

    core = TaggingCore(encoder, again, metrics=Metrics(CollectorRegistry()))
    try:
        [res] = core.process([UploadEvent(id="x", title="marathon training plan")])
    finally:
        core.close()
    assert core.to_payload(res)["tag_system_version"] == again.version_id
    assert again.names[res.shortlist[0][0]] == "sport"


def _wait(pred: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.mark.broker
def test_running_consumer_switches_versions_mid_stream_without_loss(
    kafka: KafkaKit, encoder: OnnxEncoder, sample_ts: TagSystem, tmp_path: Path
) -> None:
    kafka.topics(1)
    live = tmp_path / "live"
    sample_ts.save(live)
    v2 = replace(sample_ts, version="2")
    staged = tmp_path / "staged"
    v2.save(staged)
    metrics = Metrics(CollectorRegistry())
    core = TaggingCore(encoder, TagSystem.load(live), metrics=metrics)
    s = kafka.settings(tag_system=live, reload_interval_s=0.2, batch_size=8)
    first, middle, second = make_events(120, "a"), make_events(40, "m"), make_events(120, "b")

    def errors() -> float:
        return float(metrics.tag_system_reloads.labels(result="error")._value.get())

    with kafka.serve(s, core):
        kafka.send(first)
        _wait(lambda: len(kafka.read("tags", expect=120, timeout_s=2)) >= 60)
        # a new version copied in place, seen with its .npy half-written, then empty (numpy
        # raises ValueError, then EOFError): refused, and the old version keeps tagging
        emb = live / EMB_FILE
        os.truncate(emb, emb.stat().st_size // 2)
        _wait(lambda: errors() >= 1)
        os.truncate(emb, 0)
        _wait(lambda: errors() >= 2)
        kafka.send(middle)
        _wait(lambda: len(kafka.read("tags", expect=160, timeout_s=2)) >= 160)
        # a broken artifact published by a rename: refused too
        broken = tmp_path / "broken"
        sample_ts.save(broken)
        meta = json.loads((broken / "tagsystem.json").read_text())
        meta["tags"][0]["name"] = "tampered"
        (broken / "tagsystem.json").write_text(json.dumps(meta))
        old = tmp_path / "old"
        live.rename(old)
        broken.rename(live)
        _wait(lambda: errors() >= 3)
        # then the good new version, published by an atomic rename
        shutil.rmtree(live)
        staged.rename(live)
        _wait(lambda: metrics.tag_system_reloads.labels(result="ok")._value.get() >= 1)
        kafka.send(second)
        out = kafka.read("tags", expect=280, timeout_s=90)
    payloads = [orjson.loads(m.value()) for m in out]
    assert {p["id"] for p in payloads} == {orjson.loads(e)["id"] for e in first + middle + second}
    assert errors() == 3
    versions = [p["tag_system_version"] for p in payloads]
    assert set(versions) == {sample_ts.version_id, v2.version_id}
    switch = versions.index(v2.version_id)
    assert all(v == v2.version_id for v in versions[switch:])  # one switch, never back
    assert all(
        p["tag_system_version"] == sample_ts.version_id for p in payloads if p["id"][0] == "m"
    )
    assert all(p["tag_system_version"] == v2.version_id for p in payloads if p["id"][0] == "b")


@pytest.mark.broker
def test_llm_decisions_are_recorded_and_distill_reads_them(
    kafka: KafkaKit,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    kafka.topics(1)
    create_topics(kafka.bootstrap, {"decisions": 1})
    server = fake_llm(lambda body: (200, completion(json.dumps({"tags": shortlist_of(body)[:1]}))))
    metrics = Metrics(CollectorRegistry())
    tagger = SelectiveTagger(server.base_url, "fake-llm", SecretStr(""), metrics=metrics)
    # every item is uncertain: the LLM decides all of them
    ts = replace(sample_ts, gate=replace(sample_ts.gate, accept_threshold=1.0, min_score=0.0))
    core = TaggingCore(encoder, ts, tagger=tagger, metrics=metrics)
    s = kafka.settings(decisions_topic="decisions")
    events = make_events(40, "d")
    kafka.send(events)
    with kafka.serve(s, core):
        kafka.read("tags", expect=40)
        _wait(lambda: metrics.decisions_recorded._value.get() >= 40)
    records = read_decisions(kafka.bootstrap, "decisions")
    assert {r["id"] for r in records} == {orjson.loads(e)["id"] for e in events}
    schema = load_schema("decision")
    for r in records:
        jsonschema.validate(r, schema)
        assert r["chosen"] == [r["shortlist"][0]["name"]] and r["llm_model"] == "fake-llm"
    labelled, skipped = labelled_from_decisions(records, ts)
    assert len(labelled.ids) == 40 and sum(skipped.values()) == 0
    # generative-mode records (their text could steer the tags) are left out unless asked
    mixed = [{**r, "steerable": True} if i < 10 else r for i, r in enumerate(records)]
    kept, skipped = labelled_from_decisions(mixed, ts)
    assert len(kept.ids) == 30 and skipped["steerable"] == 10
    kept, _ = labelled_from_decisions(mixed, ts, include_steerable=True)
    assert len(kept.ids) == 40
    # prompts are never mixed: older decisions made with another prompt or handbook are left
    # out, and the latest decision's prompt is the one learnt from
    old = [
        {**r, "handbook_version": "h@1#aa", "decided_at": "2000-01-01T00:00:00Z"} if i < 15 else r
        for i, r in enumerate(records)
    ]
    kept, skipped = labelled_from_decisions(old, ts)
    assert len(kept.ids) == 25 and skipped["other_prompt"] == 15
    newer = [
        {**r, "prompt_version": "selective-extract-v1"} if i < 5 else r
        for i, r in enumerate(records)
    ]
    newer[0]["decided_at"] = "2999-01-01T00:00:00Z"
    kept, skipped = labelled_from_decisions(newer, ts)
    assert len(kept.ids) == 5 and skipped["other_prompt"] == 35
    assert labelled.emb.shape == (40, encoder.dim)


@pytest.mark.broker
def test_audited_items_go_out_as_the_gate_decided_and_their_answers_are_recorded(
    kafka: KafkaKit,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """Through the Kafka runtime: every item is auto-accepted and audited; each tag event
    keeps the encoder's decision, each LLM answer is recorded (`audit: true`), and every
    input is committed once both are acknowledged."""
    kafka.topics(1)
    create_topics(kafka.bootstrap, {"decisions": 1})
    server = fake_llm(lambda body: (200, completion(json.dumps({"tags": shortlist_of(body)[:1]}))))
    metrics = Metrics(CollectorRegistry())
    tagger = SelectiveTagger(server.base_url, "fake-llm", SecretStr(""), metrics=metrics)
    gate = replace(sample_ts.gate, accept_threshold=-1.0, min_score=-1.0, min_margin=0.0)
    ts = replace(sample_ts, gate=gate)  # every item confident
    core = TaggingCore(
        encoder, ts, tagger=tagger, metrics=metrics, trust_unfitted_gate=True, audit_fraction=1.0
    )
    s = kafka.settings(decisions_topic="decisions")
    events = make_events(40, "a")
    kafka.send(events)
    with kafka.serve(s, core):
        out = [orjson.loads(m.value()) for m in kafka.read("tags", expect=40)]
        _wait(lambda: metrics.decisions_recorded._value.get() >= 40)
    assert {p["decision"] for p in out} == {"encoder"} and len(out) == 40
    assert all(t["source"] == "encoder" for p in out for t in p["tags"])
    records = read_decisions(kafka.bootstrap, "decisions")
    assert len(records) == 40 and all(r["audit"] for r in records)
    r = metrics.registry
    audited = sum(
        r.get_sample_value("tagstream_audits_total", {"result": k}) or 0
        for k in ("agree", "disagree")
    )
    assert audited == 40 and len(server.requests) == 40
    assert r.get_sample_value("tagstream_gate_agreement", {"tag_system": ts.version_id}) is not None
    assert kafka.committed(s.group_id, 1) == 40


def test_distilling_keeps_the_image_space_but_not_its_fit(encoder: OnnxEncoder) -> None:
    """A head scores in probabilities, not the cosines the image scale was fitted against:
    the distilled version keeps the tags' image vectors, which never decide until calibrate
    --image-model fits them again."""
    from tagsys import ImageSpace

    base, data = _labelled_toy(encoder)
    emb = np.eye(len(base.tags), 4, dtype=np.float32)
    space = ImageSpace("clip-a", emb, rule="weighted", weight=0.5, scale=4.0, shift=-0.6)
    base = replace(base, image=space)
    new, _ = distill(base, data, holdout=0.3, target_precision=0.9)
    assert new.image is not None and new.image.model == "clip-a"
    assert (new.image.rule, new.image.scale, new.image.shift) == ("max", 0.0, -2.0)
    assert np.array_equal(new.image.embeddings, base.image.embeddings)  # type: ignore[union-attr]
    # never decides: the shortlist with a (perfectly matching) image is the text's own
    img = emb[[0, 1, 2]]
    idx, scores, won = new.shortlist_fused(
        data.emb[:3], data.texts[:3], img, np.ones(3, dtype=bool)
    )
    plain_idx, plain_scores = new.shortlist(data.emb[:3], data.texts[:3])
    assert not won.any() and (idx == plain_idx).all() and np.allclose(scores, plain_scores)


def test_cli_distill_warns_or_refuses_when_no_gate_reaches_the_target(
    encoder: OnnxEncoder,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator is told that the version written will auto-accept nothing; with
    --require-reached (the CronJob's) nothing is written and the exit code says why."""
    base, labelled = _labelled_toy(encoder)
    rows = [(t, [base.names[min(g)]]) for t, g in zip(labelled.texts, labelled.gold, strict=True)]
    data = write_labelled_jsonl(tmp_path / "items.jsonl", rows)
    args = ["distill", "--data", str(data), "--format", "jsonl", "--model-dir", str(model_dir)]
    cli_ok(*args, "--out", str(tmp_path / "OK"))
    assert "auto-accepts nothing" not in capsys.readouterr().err
    _short_of_target(monkeypatch)
    cli_ok(*args, "--out", str(tmp_path / "R"))
    assert "auto-accepts nothing" in capsys.readouterr().err.replace("\n", " ")
    assert not TagSystem.load(tmp_path / "R").gate_fitted  # as saved and loaded
    _short_of_target(monkeypatch)
    assert cli_exit([*args, "--out", str(tmp_path / "N"), "--require-reached"]) == 3
    assert "no version written" in capsys.readouterr().err.replace("\n", " ")
    assert not list(tmp_path.glob("N*"))  # not even the held-out items
