"""Checkpoints are checked against their publishers' digests before export, and weights under
the Gemma Terms are fetched only once the terms are accepted."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from models_onnx.export import export_encoder
from models_onnx.registry import GEMMA_TERMS_ENV, resolve_source, spec_for
from models_onnx.upstream import UPSTREAM, verify_upstream
from tagsys.errors import TagstreamError


def _minilm() -> Path:
    return Path(resolve_source(spec_for("all-MiniLM-L6-v2")))


def test_the_minilm_wheel_carries_the_publishers_file() -> None:
    assert verify_upstream("all-MiniLM-L6-v2", _minilm()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


def test_an_altered_checkpoint_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(_minilm(), copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(TagstreamError, match="sentence-transformers/all-MiniLM-L6-v2"):
        verify_upstream("all-MiniLM-L6-v2", copy)
    weights.unlink()
    with pytest.raises(TagstreamError, match="missing"):
        verify_upstream("all-MiniLM-L6-v2", copy)


def test_every_pin_is_a_sha256_or_says_why_there_is_none() -> None:
    for name, pin in UPSTREAM.items():
        assert spec_for(name).name == name
        assert pin.files or pin.none_because, name
        for digest in pin.files.values():
            assert re.fullmatch(r"[0-9a-f]{64}", digest), (name, digest)
    assert verify_upstream("multilingual-e5-small", Path("/nonexistent")) == []
    assert verify_upstream("my-own-encoder", Path("/nonexistent")) == []


def test_embeddinggemma_is_not_fetched_without_the_gemma_terms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(GEMMA_TERMS_ENV, raising=False)
    with pytest.raises(TagstreamError, match=GEMMA_TERMS_ENV):
        export_encoder("embeddinggemma-300m", tmp_path, force=True)
    assert not any(tmp_path.iterdir())  # nothing fetched, nothing written


def test_joined_embeddinggemma_matches_googles_file() -> None:
    """Where the checkpoint was joined (`make install` with the Gemma Terms accepted)."""
    from models_onnx.registry import default_model_dir

    folder = default_model_dir().parent / "hf" / "embeddinggemma-300m"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("embeddinggemma-300m was not fetched (Gemma Terms not accepted)")
    checked = set(verify_upstream("embeddinggemma-300m", folder))
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    # every file but the docs and the generation config (an embedding model generates nothing)
    assert checked == present - {"README.md", "notebook.ipynb", "generation_config.json"}
