"""The tag system's image space: fused scores, the source of each tag, the artifact's
hash and round trip, and the refusal of an image model the tags were not embedded with."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tagsys import GateConfig, ImageSpace, Tag, TagSystem
from tagsys.errors import EncoderMismatchError, TagSystemError


def _ts(image: ImageSpace | None = None, boost: float = 0.0) -> TagSystem:
    tags = [Tag(id=n, name=n) for n in ("beach", "cooking", "dog")]
    text = np.eye(3, 4, dtype=np.float32)  # tag i is text axis i
    return TagSystem(
        "t", "1", "enc", tags, text, GateConfig(top_k=3, lexical_boost=boost), image=image
    )


def _space(**kw: object) -> ImageSpace:
    return ImageSpace(model="clip-a", embeddings=np.eye(3, 2 + 3, dtype=np.float32)[:, ::-1], **kw)  # type: ignore[arg-type]


def test_max_rule_takes_the_larger_score_and_says_which_side_gave_it() -> None:
    ts = _ts(_space())
    text = np.array([[0.6, 0.8, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0]], dtype=np.float32)
    img = np.zeros((2, 5), dtype=np.float32)
    img[:, ts.image.embeddings[2].argmax()] = 1.0  # type: ignore[union-attr]  # the image shows a dog
    has = np.array([True, False])
    idx, scores, won = ts.shortlist_fused(text, ["", ""], img, has)
    assert ts.names[idx[0, 0]] == "dog" and bool(won[0, 0]) and scores[0, 0] == pytest.approx(1.0)
    assert [bool(w) for w in won[0, 1:]] == [False, False]  # cooking, beach: the text's
    # the item without an image: text scores alone, nothing from the image
    assert ts.names[idx[1, 0]] == "cooking" and not won[1].any()
    plain_idx, plain_scores = ts.shortlist(text[1:], [""])
    assert (idx[1] == plain_idx[0]).all() and np.allclose(scores[1], plain_scores[0])


def test_weighted_rule_and_calibration_are_applied() -> None:
    text = np.array([[0.6, 0.8, 0.0, 0.0]], dtype=np.float32)
    img = np.zeros((1, 5), dtype=np.float32)
    ts0 = _ts(_space())
    img[0, ts0.image.embeddings[2].argmax()] = 1.0  # type: ignore[union-attr]
    has = np.array([True])
    ts = _ts(_space(rule="weighted", weight=0.25))
    idx, scores, _ = ts.shortlist_fused(text, [""], img, has)
    got = dict(zip((ts.names[j] for j in idx[0]), scores[0].tolist(), strict=True))
    assert got["cooking"] == pytest.approx(0.75 * 0.8) and got["dog"] == pytest.approx(0.25)
    # calibration moves image scores onto the text's scale: 0.5 x cos - 0.3 loses to cooking
    ts = _ts(_space(scale=0.5, shift=-0.3))
    idx, scores, won = ts.shortlist_fused(text, [""], img, has)
    assert ts.names[idx[0, 0]] == "cooking" and not won[0, 0]
    with pytest.raises(TagSystemError, match="fusion rule"):
        _space(rule="mean")


def test_a_tag_the_text_names_is_the_texts() -> None:
    ts = _ts(_space(), boost=0.1)
    text = np.zeros((1, 4), dtype=np.float32)
    img = np.zeros((1, 5), dtype=np.float32)
    img[0, ts.image.embeddings[2].argmax()] = 1.0  # type: ignore[union-attr]
    idx, _, won = ts.shortlist_fused(text, ["my dog"], img, np.array([True]))
    row = dict(zip((ts.names[j] for j in idx[0]), won[0].tolist(), strict=True))
    assert row["dog"] is False  # the boost made it the text's, whatever the image says


def test_the_image_space_round_trips_and_is_hashed(tmp_path: Path) -> None:
    plain = _ts()
    ts = _ts(_space(scale=2.0, shift=-0.5))
    assert ts.content_hash != plain.content_hash
    other = replace(ts, image=replace(ts.image, embeddings=ts.image.embeddings[::-1].copy()))  # type: ignore[arg-type]
    assert other.content_hash != ts.content_hash
    assert replace(ts, image=_space(scale=1.0)).content_hash != ts.content_hash
    ts.save(tmp_path / "ts")
    back = TagSystem.load(tmp_path / "ts")
    assert back.content_hash == ts.content_hash and back.image is not None
    assert (back.image.model, back.image.scale, back.image.shift) == ("clip-a", 2.0, -0.5)
    plain.save(tmp_path / "ts")  # overwritten without an image space: its file goes too
    assert TagSystem.load(tmp_path / "ts").image is None
    assert not (tmp_path / "ts" / "image_embeddings.npy").exists()


def test_an_image_model_the_tags_were_not_embedded_with_is_refused() -> None:
    ts = _ts(_space())
    ts.check_image_model("clip-a", 5)
    with pytest.raises(EncoderMismatchError, match=r"'clip-a'.*'clip-b'"):
        ts.check_image_model("clip-b", 5)
    with pytest.raises(EncoderMismatchError, match="dimension"):
        ts.check_image_model("clip-a", 8)
    with pytest.raises(EncoderMismatchError, match="no image embeddings"):
        _ts().check_image_model("clip-a", 5)
    with pytest.raises(TagSystemError, match="rows"):
        _ts(ImageSpace(model="clip-a", embeddings=np.ones((2, 5), dtype=np.float32)))
