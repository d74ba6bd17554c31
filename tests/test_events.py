from __future__ import annotations

import json

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.tagging.events import (
    DecodeError,
    UploadEvent,
    ce_headers,
    decode,
    event_text,
    load_schema,
    unmark_hashtags,
)
from consumer.tools.demo import sample_events


def test_valid_event_and_unknown_fields_ignored() -> None:
    ev = decode(b'{"id": "a1", "title": "Hi", "hashtags": ["x"], "views": 12, "nested": {"a": 1}}')
    assert ev.id == "a1" and ev.title == "Hi" and ev.hashtags == ["x"]
    assert not hasattr(ev, "views")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (None, "empty"),
        (b"\xff\xfe not utf8", "not_utf8"),
        (b"{not json", "not_json"),
        (b"[1, 2]", "schema"),
        (b'"just a string"', "schema"),
        (b'{"title": "no id"}', "missing_id"),
        (b'{"id": 42}', "schema"),
        (b'{"id": ""}', "schema"),
        (b'{"id": "a", "hashtags": "not-a-list"}', "schema"),
        (b'{"id": "a", "title": 7}', "schema"),
        (b'{"id": "a", "schema_version": 2}', "schema_version"),
    ],
)
def test_malformed_events_get_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError) as e:
        decode(raw)
    assert e.value.reason == reason


def test_oversize_is_rejected_before_parsing() -> None:
    raw = orjson.dumps({"id": "a", "caption": "x" * 5000})
    with pytest.raises(DecodeError) as e:
        decode(raw, max_bytes=1000)
    assert e.value.reason == "oversize"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_never_crashes_on_random_bytes(raw: bytes) -> None:
    try:
        ev = decode(raw)
    except DecodeError:
        return
    assert isinstance(ev, UploadEvent) and ev.id


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "title", "hashtags", "lang", "x"]), json_values))
def test_decoder_agrees_with_the_json_schema(obj: dict[str, object]) -> None:
    """What the decoder accepts is exactly what the published schema accepts."""
    schema = load_schema("upload-event")
    valid = jsonschema.Draft202012Validator(schema).is_valid(obj)
    try:
        decode(orjson.dumps(obj))
        accepted = True
    except DecodeError:
        accepted = False
    assert accepted == valid, obj


def test_sample_events_match_the_schema() -> None:
    schema = load_schema("upload-event")
    for line in sample_events():
        jsonschema.validate(json.loads(line), schema)
        decode(line)


def test_event_text_orders_fields_caps_them_and_adds_hashtags() -> None:
    ev = UploadEvent(id="1", title="T", caption="C" * 50, asr="spoken", hashtags=["#a", "b"])
    text = event_text(ev, max_chars=10)
    assert text == "T. CCCCCCCCCC. spoken. a b"
    assert event_text(UploadEvent(id="2")) == ""


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("好吃 #美食 #家常菜", "好吃 美食 家常菜"),
        ("爱你们#情感视频# #求热门# #官方 #", "爱你们 情感视频 求热门 官方"),
        ("#1 tip for #baking", "1 tip for baking"),
        ("C# and F# stay", "C# and F# stay"),
        ("no markers here", "no markers here"),
    ],
)
def test_hashtag_markers_go_and_their_words_stay(text: str, want: str) -> None:
    assert unmark_hashtags(text) == want
    assert event_text(UploadEvent(id="h", caption=text)) == want


def test_cloudevents_headers() -> None:
    h = dict(ce_headers(event_id="v1", source_ref="up-0-7", ce_source="ts", time_iso="t"))
    assert h["ce_specversion"] == b"1.0" and h["ce_id"] == b"up-0-7"
    assert h["ce_type"] == b"dev.tagstream.tags.v1" and h["content-type"] == b"application/json"
    assert h["ce_subject"] == b"v1" and h["ce_source"] == b"ts"


@pytest.mark.parametrize("depth", [10, 500, 5000])
def test_deep_nesting_in_an_unknown_field_never_crashes(depth: int) -> None:
    raw = b'{"id": "d", "x": ' + b"[" * depth + b"]" * depth + b"}"
    try:
        ev = decode(raw)
    except DecodeError as e:
        assert e.reason == "not_json" and depth > 1000
    else:
        assert ev.id == "d"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=50))
def test_control_characters_are_data(text: str) -> None:
    ev = decode(orjson.dumps({"id": "c", "title": text, "hashtags": [text]}))
    assert ev.title == text
    event_text(ev)  # and the encoder text is built without error


def test_a_huge_field_within_the_record_limit_is_capped_for_the_encoder() -> None:
    ev = decode(orjson.dumps({"id": "h", "caption": "y" * 500_000}))
    assert len(event_text(ev, max_chars=2000)) == 2000
