"""Hashed character n-grams in distilled heads (`distill --text-features`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from consumer.tools.evaluate import report, run_eval
from models_onnx import OnnxEncoder
from tagsys import TagSystem, TagSystemError
from tagsys.distill import Head, fit_head
from tagsys.textfeat import TextFeatures
from tests.conftest import cli_exit, cli_ok, write_labelled_jsonl


def test_rows_are_normalised_and_spelling_variants_meet() -> None:
    tf = TextFeatures(buckets=4096)
    texts = ["Hello World", "ＨＥＬＬＯ   world", "", "完全不同的内容", "hello there"]
    rows = tf.transform(texts)
    x = rows.dense(0, len(rows))
    assert x.shape == (5, 4096) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x[[0, 1, 3, 4]], axis=1), 1.0, atol=1e-5)
    assert np.array_equal(x[0], x[1])  # NFKC, case and runs of spaces do not matter
    assert not x[2].any()  # an empty text is a zero row, not NaN
    assert float(x[0] @ x[4]) > 0.4 > float(x[0] @ x[3])  # shared words, shared n-grams


def test_only_the_first_max_chars_are_read() -> None:
    tf = TextFeatures(buckets=4096, max_chars=20)
    head = "a" * 20
    rows = tf.transform([head, head + " something else entirely"])
    x = rows.dense(0, 2)
    assert np.array_equal(x[0], x[1])
    with pytest.raises(ValueError):
        TextFeatures(buckets=0)


def test_sparse_products_match_the_dense_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import tagsys.textfeat as tfm

    monkeypatch.setattr(tfm, "_CHUNK_CELLS", 3 * 512)  # three rows per chunk: chunks join
    rows = TextFeatures(buckets=512).transform(
        ["one two", "", "three 四五六", "seven", "eight nine ten", "十一", "twelve"]
    )
    x = rows.dense(0, len(rows))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 512)).astype(np.float32)
    g = rng.standard_normal((len(rows), 5)).astype(np.float32)
    assert np.allclose(rows.matmul_t(w), x @ w.T, atol=1e-5)
    assert np.allclose(rows.t_matmul(g), x.T @ g, atol=1e-5)
    assert np.array_equal(rows.dense(2, 4), x[2:4])


def test_buckets_are_the_same_in_another_process() -> None:
    """A head is trained in one process and scored in another (the service): the hash must
    not depend on Python's per-process string hash seed."""
    code = (
        "import sys, json; from tagsys.textfeat import TextFeatures; "
        "x = TextFeatures(buckets=1024).transform(['Sourdough #面包 starter']); "
        "print(json.dumps(sorted(x.indices.tolist())))"
    )
    runs = []
    for seed in ("1", "2"):
        env = os.environ | {"PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout))
    here = TextFeatures(buckets=1024).transform(["Sourdough #面包 starter"])
    assert runs[0] == runs[1] == sorted(here.indices.tolist())


def _noise_with_code_words(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[int]]:
    """Embeddings that carry nothing; the label is only in a word of the text."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    words = ["zorvex", "quillon", "plimsa"]
    labels = [i % 3 for i in range(n)]
    fillers = ["a clip from today", "watch till the end", "new upload", "my weekend"]
    texts = [f"{fillers[i % 4]} {words[labels[i]]} {i}" for i in range(n)]
    return emb, texts, labels


def test_the_text_part_learns_what_the_embedding_cannot() -> None:
    emb, texts, labels = _noise_with_code_words(360)
    names = np.eye(3, 16, dtype=np.float32)
    tr, te = slice(0, 240), slice(240, 360)
    gold = np.array(labels[te])
    plain = fit_head(emb[tr], [[y] for y in labels[tr]], names)
    with_text = fit_head(
        emb[tr], [[y] for y in labels[tr]], names, texts=texts[tr], text=TextFeatures(1024)
    )
    acc_plain = float(np.mean(plain.scores(emb[te]).argmax(1) == gold))
    acc_text = float(np.mean(with_text.scores(emb[te], texts[te]).argmax(1) == gold))
    assert acc_plain < 0.5 and acc_text > 0.9  # chance is 1/3; the item numbers add noise
    assert with_text.text_weights is not None and with_text.text_weights.shape == (3, 1024)
    with pytest.raises(ValueError, match="reads the text"):
        with_text.scores(emb[te])
    with pytest.raises(ValueError, match="one text per embedding"):
        fit_head(emb[tr], [[y] for y in labels[tr]], names, text=TextFeatures(1024))


def test_fitting_chunk_by_chunk_gives_the_same_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `DENSE_TEXT_BYTES` the n-gram rows are rebuilt per epoch instead of kept dense."""
    import tagsys.distill as dm

    emb, texts, labels = _noise_with_code_words(90)
    names = np.eye(3, 16, dtype=np.float32)

    def fit() -> Head:
        labs = [[y] for y in labels]
        return fit_head(emb, labs, names, texts=texts, text=TextFeatures(512), epochs=30)

    dense = fit()
    monkeypatch.setattr(dm, "DENSE_TEXT_BYTES", 0)
    chunked = fit()
    assert dense.text_weights is not None and chunked.text_weights is not None
    assert np.abs(dense.text_weights).max() > 0.01
    assert np.allclose(dense.text_weights, chunked.text_weights, atol=1e-4)
    assert np.allclose(dense.scores(emb, texts), chunked.scores(emb, texts), atol=1e-4)


def _ts_with_text_head(text_weights: np.ndarray) -> TagSystem:
    from tagsys.tagsystem import Tag

    tags = [Tag(id=f"t{i}", name=f"t{i}") for i in range(3)]
    head = Head(
        np.eye(3, 4, dtype=np.float32),
        np.zeros(3, np.float32),
        "softmax",
        text_weights=text_weights,
        text=TextFeatures(buckets=text_weights.shape[1]),
    )
    return TagSystem(
        name="t",
        version="1",
        encoder="e",
        tags=tags,
        embeddings=np.eye(3, 4, dtype=np.float32),
        head=head,
    )


def test_a_text_head_round_trips_and_tampering_is_caught(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ts = _ts_with_text_head(rng.standard_normal((3, 256)).astype(np.float32))
    ts.save(tmp_path / "ts")
    again = TagSystem.load(tmp_path / "ts")
    assert again.content_hash == ts.content_hash
    emb = np.eye(2, 4, dtype=np.float32)
    texts = ["zorvex clip", "quillon clip"]
    assert np.allclose(again.shortlist(emb, texts)[1], ts.shortlist(emb, texts)[1])
    # the n-gram weights are part of the hash: changing one is noticed at load
    with np.load(tmp_path / "ts" / "head.npz") as z:
        parts = {k: z[k] for k in z.files}
    parts["text_weights"][0, 0] += 1.0
    np.savez(tmp_path / "ts" / "head.npz", **parts)
    with pytest.raises(TagSystemError, match="content hash mismatch"):
        TagSystem.load(tmp_path / "ts")
    # weights of the wrong width are refused with the file named, not scored
    parts["text_weights"] = parts["text_weights"][:, :100]
    np.savez(tmp_path / "ts" / "head.npz", **parts)
    with pytest.raises(TagSystemError, match="text weights"):
        TagSystem.load(tmp_path / "ts")
    with pytest.raises(ValueError, match="come together"):
        Head(
            np.eye(3, 4, dtype=np.float32),
            np.zeros(3, np.float32),
            "softmax",
            text=None,
            text_weights=np.zeros((3, 8), np.float32),
        )


def test_a_text_head_too_large_is_refused_before_fitting() -> None:
    from consumer.tools.distill import Labelled, distill
    from tagsys.tagsystem import Tag

    n = 5000
    ts = TagSystem(
        name="big",
        version="1",
        encoder="e",
        tags=[Tag(id=str(i), name=f"t{i}") for i in range(n)],
        embeddings=np.eye(n, 8, dtype=np.float32) + 0.01,
    )
    data = Labelled(["a"], np.ones((1, 8), np.float32), ["x"], [frozenset({0})])
    with pytest.raises(TagSystemError, match="use fewer --text-buckets"):
        distill(ts, data, holdout=0.3, target_precision=0.9, text=TextFeatures(buckets=2**16))


def test_cli_distill_with_text_features_through_the_service_path(
    encoder: OnnxEncoder, tmp_path: Path
) -> None:
    """Items whose label is a code word: the distilled text head puts it first on held-out
    items through the same scoring `run` uses; the artifact says how it was made."""
    _emb, texts, labels = _noise_with_code_words(240, seed=2)
    names = ["alpha", "beta", "gamma"]
    data = write_labelled_jsonl(
        tmp_path / "items.jsonl", [(t, [names[y]]) for t, y in zip(texts, labels, strict=True)]
    )
    out = tmp_path / "D"
    cli_ok(
        "distill",
        "--data",
        str(data),
        "--format",
        "jsonl",
        "--model",
        "all-MiniLM-L6-v2",
        "--out",
        str(out),
        "--text-features",
        "--text-buckets",
        "2048",
    )
    ts = TagSystem.load(out)
    assert ts.head is not None and ts.head.text == TextFeatures(buckets=2048)
    assert ts.provenance["distilled"]["text_features"]["buckets"] == 2048
    run = run_eval(out.with_name("D.heldout.jsonl"), "jsonl", tag_system=out)
    assert report(run)["recall_at_1"] == 1.0
    # --holdout 0: every item is learnt from and calibrated on (out-of-fold), none written out
    cli_ok(
        *["distill", "--data", str(data), "--format", "jsonl", "--out", str(tmp_path / "G")],
        *["--holdout", "0", "--text-features", "--text-buckets", "2048"],
    )
    every = TagSystem.load(tmp_path / "G")
    assert every.provenance["distilled"]["calibration"] == "cross"
    assert every.provenance["calibrated"]["fit_items"] == 240
    assert not tmp_path.joinpath("G.heldout.jsonl").exists()
    assert (
        cli_exit(
            [
                "distill",
                "--data",
                str(data),
                "--format",
                "jsonl",
                "--out",
                str(tmp_path / "E"),
                "--text-features",
                "--text-buckets",
                "8",
            ]
        )
        == 2
    )
