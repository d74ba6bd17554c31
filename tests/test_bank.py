"""Bank expansion: known answers on toy vectors, refusals, and the CLI paths (eval, import-tags)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tagsys import EncoderMismatchError, Tag, TagSystem, TagSystemError
from tagsys.bank import bank_neighbours, expand_with_bank
from tagsys.distill import Head
from tagsys.errors import EXIT_CONFIG
from tests.conftest import OPAQUE_ROWS, cli_exit, cli_ok, write_labelled_jsonl


def _unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)


def _ts(names: list[str], emb: np.ndarray, encoder: str = "enc") -> TagSystem:
    return TagSystem("t", "1", encoder, [Tag(n, n) for n in names], _unit(np.asarray(emb)))


def test_each_tag_moves_towards_the_mean_of_its_k_nearest_bank_tags() -> None:
    ts = _ts(["a", "b"], np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    bank = _ts(
        ["a1", "far", "a2", "b1"],
        np.array([[1.0, 0.3, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 0.5], [0.2, 0.0, 1.0]]),
    )
    nb = bank_neighbours(ts.embeddings, bank.embeddings, 2)
    assert nb.tolist() == [[0, 2], [3, 2]]  # best first; "far" is nobody's neighbour
    out = expand_with_bank(ts, bank, k=2, weight=0.7)
    for i, rows in enumerate(([0, 2], [3, 2])):
        mean = _unit(bank.embeddings[rows].mean(0))
        want = _unit(0.7 * ts.embeddings[i] + 0.3 * mean)
        assert np.allclose(out.embeddings[i], want, atol=1e-6)
    assert out.provenance["bank"] == {"bank": bank.version_id, "k": 2, "weight": 0.7}
    assert out.content_hash != ts.content_hash
    # weight 1 keeps the vectors; k beyond the bank's size takes the whole bank
    assert np.allclose(expand_with_bank(ts, bank, k=2, weight=1.0).embeddings, ts.embeddings)
    assert expand_with_bank(ts, bank, k=99).provenance["bank"]["k"] == 4


def test_chunked_neighbours_equal_one_pass() -> None:
    rng = np.random.default_rng(0)
    tags, bank = _unit(rng.normal(size=(37, 8))), _unit(rng.normal(size=(200, 8)))
    assert (bank_neighbours(tags, bank, 5, chunk=4) == bank_neighbours(tags, bank, 5)).all()


def test_refuses_another_encoder_a_distilled_head_and_bad_arguments() -> None:
    ts = _ts(["a"], np.array([[1.0, 0.0]]))
    with pytest.raises(EncoderMismatchError, match="--model enc"):
        expand_with_bank(ts, _ts(["x"], np.array([[1.0, 0.0]]), encoder="other"), k=1)
    head = Head(np.ones((1, 2), np.float32), np.zeros(1, np.float32), "softmax")
    from dataclasses import replace

    with pytest.raises(TagSystemError, match="distilled head"):
        expand_with_bank(replace(ts, head=head), ts)
    with pytest.raises(ValueError):
        expand_with_bank(ts, ts, k=0)
    with pytest.raises(ValueError):
        expand_with_bank(ts, ts, weight=1.5)


def test_bank_in_eval_and_import_tags(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tags with opaque names (a code word each) gain what the bank says about the code word;
    zero-shot ranking of toy items improves, and import-tags records the bank."""
    data = write_labelled_jsonl(tmp_path / "toy.jsonl", OPAQUE_ROWS)
    bank_vocab = tmp_path / "bank.txt"
    bank_vocab.write_text(
        "zorvex bread baking\nzorvex sourdough loaf\nquillon kitchen knives\n"
        "quillon blade sharpening\nplimsa food safety\nplimsa bacteria spoilage\n"
    )
    base = ["--model-dir", str(model_dir)]  # jsonl data and import-tags default to MiniLM
    cli_ok(
        "import-tags", str(bank_vocab), "--format", "list", "--out", str(tmp_path / "bank"), *base
    )

    def r1(*extra: str) -> float:
        cli_ok("eval", "--data", str(data), "--format", "jsonl", "--json", *base, *extra)
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return float(out["recall_at_1"])

    plain = r1()
    expanded = r1("--bank", str(tmp_path / "bank"), "--bank-k", "2", "--bank-weight", "0.5")
    assert expanded > plain, (plain, expanded)
    assert expanded == 1.0

    names = tmp_path / "names.txt"
    names.write_text("zorvex\nquillon\nplimsa\n")
    bank_args = ["--bank", str(tmp_path / "bank"), "--bank-k", "2"]
    cli_ok("import-tags", str(names), "--format", "list", "--out", str(tmp_path / "ts"), *bank_args)
    ts = TagSystem.load(tmp_path / "ts")
    assert ts.provenance["bank"]["k"] == 2 and ts.provenance["bank"]["weight"] == 0.7

    # a bank from another encoder is refused with a clear error, exit 3 (configuration)
    e5 = ["--model", "multilingual-e5-small", *base]
    cli_ok("import-tags", str(bank_vocab), "--format", "list", "--out", str(tmp_path / "e5"), *e5)
    capsys.readouterr()
    bad = ["--bank", str(tmp_path / "e5"), *base]
    assert cli_exit(["eval", "--data", str(data), "--format", "jsonl", *bad]) == EXIT_CONFIG
    said = " ".join(capsys.readouterr().err.split())
    assert "import the bank with --model all-MiniLM-L6-v2" in said
