from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagsys import (
    Decision,
    EncoderMismatchError,
    GateConfig,
    Tag,
    TagSystem,
    TagSystemError,
    build_tag_system,
    check_template,
    decide,
    embed_tags,
    load_sample_tags,
    shortlist,
    tag_prompt,
)


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    n_tags=st.integers(1, 40),
    batch=st.integers(1, 8),
    k=st.integers(1, 50),
    seed=st.integers(0, 2**31 - 1),
)
def test_shortlist_matches_full_sort(n_tags: int, batch: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tags = _unit(rng.normal(size=(n_tags, 16)))
    q = _unit(rng.normal(size=(batch, 16)))
    idx, scores = shortlist(q, tags, k)
    full = q @ tags.T
    kk = min(k, n_tags)
    assert idx.shape == (batch, kk) and scores.shape == (batch, kk)
    for b in range(batch):
        expected = np.sort(full[b])[::-1][:kk]
        np.testing.assert_allclose(scores[b], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(full[b, idx[b]], scores[b], rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(scores[b]) <= 1e-7)


def test_gate_confident_uncertain_and_per_tag_threshold() -> None:
    ids = ["a", "b", "c", "d"]
    gate = GateConfig(top_k=4, accept_threshold=0.5, min_margin=0.1, max_tags=2, min_score=0.2)
    idx = np.array([0, 1, 2, 3])
    # clear winner: confident, second tag also above threshold -> both
    r = decide(idx, np.array([0.8, 0.55, 0.3, 0.1], dtype=np.float32), ids, gate)
    assert r.decision_hint is Decision.ENCODER and [t for t, _ in r.tags] == [0, 1]
    # below threshold: uncertain; fallback keeps tags above min_score, at most max_tags
    r = decide(idx, np.array([0.45, 0.3, 0.25, 0.1], dtype=np.float32), ids, gate)
    assert r.decision_hint is Decision.LLM and [t for t, _ in r.tags] == [0, 1]
    # above threshold but no margin: uncertain
    r = decide(idx, np.array([0.62, 0.6, 0.1, 0.0], dtype=np.float32), ids, gate)
    assert r.decision_hint is Decision.LLM
    # a per-tag threshold overrides the global one
    strict = GateConfig(top_k=4, accept_threshold=0.5, min_margin=0.1, tag_thresholds={"a": 0.9})
    r = decide(idx, np.array([0.8, 0.2, 0.1, 0.0], dtype=np.float32), ids, strict)
    assert r.decision_hint is Decision.LLM


def test_gate_config_validation() -> None:
    with pytest.raises(ValueError):
        GateConfig(top_k=0)
    with pytest.raises(ValueError):
        GateConfig(accept_threshold=0.3, min_score=0.5)


def _fake_encode(texts: list[str]) -> np.ndarray:
    # deterministic pseudo-embeddings from the text's hash
    out = []
    for t in texts:
        rng = np.random.default_rng(abs(hash(t)) % (2**32))
        out.append(rng.normal(size=8))
    return np.array(out, dtype=np.float32)


def _tags() -> list[Tag]:
    return [
        Tag("t1", "dogs", ("puppy",), "pets"),
        Tag("t2", "cats", (), "pets", "small felines"),
        Tag("t3", "coffee"),
    ]


def test_tag_system_roundtrip_hash_and_tamper(tmp_path: Path) -> None:
    ts = build_tag_system("toy", "3", _tags(), _fake_encode, "enc-x")
    assert np.allclose(np.linalg.norm(ts.embeddings, axis=1), 1.0, atol=1e-5)
    ts.save(tmp_path / "ts")
    back = TagSystem.load(tmp_path / "ts")
    assert back.content_hash == ts.content_hash
    assert back.version_id == ts.version_id and back.version_id.startswith("toy@3#")
    assert back.tags == ts.tags and back.gate == ts.gate
    # a changed tag changes the hash: the file's recorded hash no longer matches
    meta = (tmp_path / "ts" / "tagsystem.json").read_text()
    (tmp_path / "ts" / "tagsystem.json").write_text(meta.replace('"coffee"', '"tea"'))
    with pytest.raises(TagSystemError, match="hash mismatch"):
        TagSystem.load(tmp_path / "ts")


def test_artifacts_without_the_stems_key_keep_their_hash_and_behaviour(tmp_path: Path) -> None:
    # a tag system written before `lexical_stems` existed: its gate has no such key
    ts = build_tag_system("toy", "1", _tags(), _fake_encode, "enc-x", GateConfig(lexical_boost=0.1))
    assert ts.gate.lexical_stems and ts.gate.to_dict()["lexical_stems"] is True
    legacy = TagSystem(
        "toy",
        "1",
        "enc-x",
        ts.tags,
        ts.embeddings,
        gate=GateConfig.from_dict({"lexical_boost": 0.1}),
    )
    assert not legacy.gate.lexical_stems and "lexical_stems" not in legacy.gate.to_dict()
    legacy.save(tmp_path / "old")
    meta = (tmp_path / "old" / "tagsystem.json").read_text()
    assert "lexical_stems" not in meta
    back = TagSystem.load(tmp_path / "old")
    assert back.content_hash == legacy.content_hash != ts.content_hash
    assert not back.gate.lexical_stems
    # only the new one matches by stems ("dogged" stems to "dog"); plurals match in both
    assert ts.mentions(["a dogged effort"]) == [{0}] and back.mentions(["a dogged effort"]) == [
        set()
    ]
    assert ts.mentions(["my puppies"]) == back.mentions(["my puppies"]) == [{0}]


def test_tag_system_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(TagSystemError):
        TagSystem("x", "1", "e", _tags(), np.zeros((2, 8), dtype=np.float32))
    with pytest.raises(TagSystemError, match="unique"):
        TagSystem("x", "1", "e", [Tag("a", "a"), Tag("a", "b")], np.ones((2, 4), np.float32))
    with pytest.raises(TagSystemError, match="not a tag system"):
        TagSystem.load(tmp_path)


def test_encoder_mismatch_is_refused() -> None:
    ts = build_tag_system("toy", "1", _tags(), _fake_encode, "enc-x")
    ts.check_encoder("enc-x", 8)
    with pytest.raises(EncoderMismatchError, match="enc-x"):
        ts.check_encoder("other", 8)
    with pytest.raises(EncoderMismatchError, match="dimension"):
        ts.check_encoder("enc-x", 384)


def test_tag_prompt_uses_aliases_and_description() -> None:
    assert tag_prompt(Tag("1", "dogs", ("puppy", "dog walk"))) == "dogs: puppy, dog walk"
    assert tag_prompt(Tag("2", "cats", (), None, "small felines")) == "cats: small felines"
    assert tag_prompt(Tag("3", "coffee")) == "coffee"


def test_tag_templates_put_the_name_in_context_and_are_recorded() -> None:
    dogs = Tag("1", "dogs", ("puppy",), None, None, ("loyal pets",))
    assert tag_prompt(dogs, "{name} (pets)") == "dogs (pets): puppy"
    seen: list[str] = []

    def encode(texts: list[str]) -> np.ndarray:
        seen.extend(texts)
        return _fake_encode(texts)

    ts = build_tag_system("toy", "1", [dogs], encode, "enc-x", template="{name} (pets)")
    assert seen == ["dogs (pets): puppy", "dogs (pets): loyal pets"]
    assert ts.provenance == {"tag_template": "{name} (pets)"}
    plain = build_tag_system("toy", "1", [dogs], _fake_encode, "enc-x")
    assert plain.provenance == {} and plain.content_hash != ts.content_hash
    assert check_template("快手{name}") == "快手{name}"
    for bad, why in [
        ("cooking", "exactly once"),
        ("{name} {name}", "exactly once"),
        ("{nam}", "not valid"),
        ("{0} {name}", "not valid"),
        ("{name", "not valid"),
    ]:
        with pytest.raises(TagSystemError, match=why):
            check_template(bad)
    with pytest.raises(TagSystemError):
        embed_tags([dogs], _fake_encode, template="{tag}")


def test_embed_tags_mixes_the_mean_of_the_descriptions_into_described_tags_only() -> None:
    tags = [
        Tag("a", "dogs", ("puppy",)),
        Tag("b", "cats", descriptions=("small felines", "purring pets")),
    ]
    plain = _unit(_fake_encode([tag_prompt(t) for t in tags]))
    got = embed_tags(tags, _fake_encode, name_weight=0.3)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.allclose(got[0], plain[0], atol=1e-6)  # no descriptions: the prompt's vector
    d = _unit(_fake_encode(["cats: small felines", "cats: purring pets"]))
    mean = d.mean(0) / np.linalg.norm(d.mean(0))
    want = 0.3 * plain[1] + 0.7 * mean
    assert np.allclose(got[1], want / np.linalg.norm(want), atol=1e-5)
    # the ends of the weight: the name alone, the descriptions alone
    assert np.allclose(embed_tags(tags, _fake_encode, 1.0)[1], plain[1], atol=1e-5)
    assert np.allclose(embed_tags(tags, _fake_encode, 0.0)[1], mean, atol=1e-5)
    # nothing described: exactly what the encoder gave (hashes of old artifacts stay put)
    assert np.array_equal(embed_tags(tags[:1], _fake_encode), _fake_encode(["dogs: puppy"]))
    with pytest.raises(TagSystemError, match="name_weight"):
        embed_tags(tags, _fake_encode, 1.5)


def test_example_posts_are_embedded_on_the_content_side_with_the_descriptions() -> None:
    """Examples go through `encode_content` (the query side), descriptions through `encode`
    as `name: description`; a tag's samples of both kinds share one mean."""
    tags = [
        Tag("a", "dogs", examples=("my puppy learned to sit",)),
        Tag("b", "cats", descriptions=("small felines",), examples=("the cat sleeps all day",)),
        Tag("c", "birds"),
    ]

    def content(texts: list[str]) -> np.ndarray:
        return _fake_encode([f"query: {t}" for t in texts])

    got = embed_tags(tags, _fake_encode, name_weight=0.4, encode_content=content)
    plain = _unit(_fake_encode([tag_prompt(t) for t in tags]))
    ex_a = _unit(content(["my puppy learned to sit"]))[0]
    want_a = 0.4 * plain[0] + 0.6 * ex_a
    assert np.allclose(got[0], want_a / np.linalg.norm(want_a), atol=1e-5)
    desc_b = _unit(_fake_encode(["cats: small felines"]))[0]
    both = np.stack([desc_b, _unit(content(["the cat sleeps all day"]))[0]]).mean(0)
    want_b = 0.4 * plain[1] + 0.6 * both / np.linalg.norm(both)
    assert np.allclose(got[1], want_b / np.linalg.norm(want_b), atol=1e-5)
    assert np.allclose(got[2], plain[2], atol=1e-6)
    with pytest.raises(TagSystemError, match="encode_content"):
        embed_tags(tags, _fake_encode)
    assert Tag.from_dict(tags[1].to_dict()) == tags[1]
    assert "examples" not in Tag("c", "birds").to_dict()


def test_descriptions_round_trip_and_change_the_hash(tmp_path: Path) -> None:
    tags = [Tag("b", "cats", descriptions=("small felines", "purring pets"))]
    assert Tag.from_dict(tags[0].to_dict()) == tags[0]
    assert "descriptions" not in Tag("a", "dogs").to_dict()
    ts = build_tag_system("toy", "1", tags, _fake_encode, "enc-x")
    ts.save(tmp_path / "ts")
    assert TagSystem.load(tmp_path / "ts").tags == tags
    other = build_tag_system("toy", "1", [Tag("b", "cats")], _fake_encode, "enc-x")
    assert other.content_hash != ts.content_hash


def test_sample_tags_load() -> None:
    tags, gate, version = load_sample_tags()
    assert len(tags) >= 20 and version
    assert len({t.id for t in tags}) == len(tags)
    assert all(t.category for t in tags)
    assert 0 < gate.min_score < gate.accept_threshold < 1
