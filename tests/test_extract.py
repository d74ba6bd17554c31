"""--llm-extract: the LLM states the item's facts before choosing tags (TagLLM's
chain-of-thought extraction); the facts are validated, bounded, recorded, optionally emitted,
and a tag beyond the first survives only when the facts name it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
from pydantic import SecretStr

from consumer.tagging.core import TaggingCore
from consumer.tagging.events import UploadEvent, load_schema
from consumer.tagging.llm import EXTRACT_PROMPT_VERSION, SelectiveTagger
from consumer.tagging.metrics import Metrics
from models_onnx import OnnxEncoder
from tagsys import Decision, TagSystem
from tests.conftest import FakeOpenAI, Responder, completion, shortlist_of

ITEM = UploadEvent(
    id="x1", title="Three days in Kyoto", caption="temples, matcha and a night market"
)
FACTS = {
    "subject": "a short trip to Kyoto",
    "entities": ["Kyoto"],
    "scene": "temples and street food at a night market",
    "intent": "share a travel diary",
}


def _core(
    encoder: OnnxEncoder, ts: TagSystem, server: FakeOpenAI, metrics: Metrics, **kw: Any
) -> TaggingCore:
    tagger = SelectiveTagger(server.base_url, "fake", SecretStr(""), metrics=metrics, extract=True)
    return TaggingCore(encoder, ts, tagger=tagger, metrics=metrics, **kw)


def test_the_schema_asks_for_the_facts_first_and_bounds_them() -> None:
    s = SelectiveTagger.response_schema(["a", "b"], 3, extract=True)
    assert list(s["properties"]) == ["extract", "tags"] and s["required"] == ["extract", "tags"]
    facts = s["properties"]["extract"]
    assert facts["additionalProperties"] is False and facts["properties"]["entities"]["maxItems"]
    assert "extract" not in SelectiveTagger.response_schema(["a"], 3)["properties"]


def test_extras_stay_only_when_the_facts_name_them(
    encoder: OnnxEncoder, sample_ts: TagSystem, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    seen: list[list[str]] = []

    def answer(req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        short = shortlist_of(req)
        # the first pick, one the facts name (street food), one they do not (yoga)
        picks = ["beach holiday", "street food", "yoga"]
        seen.append(short)
        tags = [t for t in picks if t in short]
        return 200, completion(json.dumps({"extract": FACTS, "tags": tags}))

    server = fake_llm(answer)
    metrics = Metrics()
    core = _core(encoder, sample_ts, server, metrics, emit_extract=True)
    (res,) = core.process([ITEM])
    names = [sample_ts.names[j] for j, _, _ in res.tags]
    assert set(["beach holiday", "street food", "yoga"]) <= set(seen[0]), seen  # all offered
    assert names == ["beach holiday", "street food"] and res.decision is Decision.LLM
    assert res.extract == FACTS
    system = server.requests[0]["messages"][0]["content"]
    assert "First fill `extract`" in system and "One tag is a complete answer" in system
    payload, record = core.to_payload(res), core.decision_record(res)
    assert payload["extract"] == FACTS
    assert record is not None and record["extract"] == FACTS
    assert record["prompt_version"] == EXTRACT_PROMPT_VERSION
    jsonschema.validate(payload, load_schema("tag-event"))
    jsonschema.validate(record, load_schema("decision"))
    assert metrics.registry.get_sample_value("tagstream_llm_extracts_total", {"result": "ok"}) == 1
    core.close()


def test_a_bad_extract_is_rejected_counted_and_the_item_goes_to_review(
    encoder: OnnxEncoder, sample_ts: TagSystem, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    bad = {**FACTS, "subject": "x" * 500}  # past its bound

    def answer(req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, completion(json.dumps({"extract": bad, "tags": shortlist_of(req)[:1]}))

    server = fake_llm(answer)
    metrics = Metrics()
    core = _core(encoder, sample_ts, server, metrics)
    (res,) = core.process([ITEM])
    assert res.decision is Decision.REVIEW and res.llm_status == "invalid" and res.extract is None
    assert len(server.requests) == 2  # retried once, as any unusable answer
    r = metrics.registry
    assert r.get_sample_value("tagstream_llm_extracts_total", {"result": "invalid"}) == 2
    assert "extract" not in core.to_payload(res)  # not emitted unless asked, and none here
    core.close()


def test_without_extract_the_prompt_and_answer_are_unchanged(
    encoder: OnnxEncoder, sample_ts: TagSystem, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    server = fake_llm(lambda req: (200, completion(json.dumps({"tags": shortlist_of(req)[:2]}))))
    metrics = Metrics()
    tagger = SelectiveTagger(server.base_url, "fake", SecretStr(""), metrics=metrics)
    core = TaggingCore(encoder, sample_ts, tagger=tagger, metrics=metrics)
    (res,) = core.process([ITEM])
    assert len(res.tags) == 2 and res.extract is None  # no extract, no pruning
    assert "extract" not in server.requests[0]["messages"][0]["content"]
    core.close()


def test_eval_asks_for_the_facts_with_llm_extract(
    model_dir: Any, tmp_path: Any, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    from consumer.tools.evaluate import run_eval

    data = tmp_path / "d.jsonl"
    rows = [{"id": "1", "title": "Sourdough starter", "labels": ["baking"]}]
    rows.append({"id": "2", "title": "Grilled ribs", "labels": ["grilling"]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def answer(req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, completion(json.dumps({"extract": FACTS, "tags": shortlist_of(req)[:1]}))

    server = fake_llm(answer)
    run_eval(data, "jsonl", model_dir=model_dir, llm=server.base_url, llm_extract=True)
    assert server.requests and all(
        "First fill `extract`" in r["messages"][0]["content"] for r in server.requests
    )
