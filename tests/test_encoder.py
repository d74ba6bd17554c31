from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models_onnx import Manifest, ModelIntegrityError, ModelNotFoundError, OnnxEncoder
from models_onnx.encoder import cuda_usable
from models_onnx.export import is_exported


def test_manifest_pins_every_file(model_dir: Path) -> None:
    m = Manifest.load(model_dir / "all-MiniLM-L6-v2")
    assert {"fp32", "int8", "fp16"} <= set(m.files)
    assert all(len(f["sha256"]) == 64 for f in m.files.values())
    assert m.dim == 384 and m.pooling == "mean" and m.normalize
    assert is_exported("all-MiniLM-L6-v2", model_dir)


def test_cpu_runs_int8_and_vectors_are_unit_length(encoder: OnnxEncoder) -> None:
    assert encoder.variant == "int8" and encoder.device == "cpu"
    assert encoder.id == "all-MiniLM-L6-v2/int8"
    v = encoder.encode(["a dog on a walk", "espresso with latte art", ""])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)


def test_embeddings_carry_meaning(encoder: OnnxEncoder) -> None:
    q = encoder.encode(["my puppy learned to sit today"])[0]
    tags = encoder.encode(["dogs: puppy, dog training", "coffee: espresso, barista"])
    assert q @ tags[0] > q @ tags[1] + 0.1


def test_batching_and_order_do_not_change_results(model_dir: Path, encoder: OnnxEncoder) -> None:
    texts = ["short", "a somewhat longer sentence about bread", "x " * 40, "mid length text"]
    fp32 = OnnxEncoder("all-MiniLM-L6-v2", model_dir=model_dir, device="cpu", variant="fp32")
    one = np.vstack([fp32.encode([t]) for t in texts])
    np.testing.assert_allclose(one, fp32.encode(texts, batch_size=3), atol=1e-4)
    # int8 quantises activations per batch, so batch-mates move an item a little: bounded
    one8 = np.vstack([encoder.encode([t]) for t in texts])
    assert (one8 * encoder.encode(texts, batch_size=3)).sum(axis=1).min() >= 0.97


def test_int8_stays_close_to_fp32(model_dir: Path, encoder: OnnxEncoder) -> None:
    fp32 = OnnxEncoder("all-MiniLM-L6-v2", model_dir=model_dir, device="cpu", variant="fp32")
    texts = ["Soft pretzel buns at home", "Deadlift PR 180kg", "Three days in Kyoto"]
    cos = (fp32.encode(texts) * encoder.encode(texts)).sum(axis=1)
    assert cos.min() >= 0.98


def test_tampered_model_is_refused(model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(model_dir / "all-MiniLM-L6-v2", tmp_path / "all-MiniLM-L6-v2")
    f = tmp_path / "all-MiniLM-L6-v2" / "model_int8.onnx"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        OnnxEncoder("all-MiniLM-L6-v2", model_dir=tmp_path, device="cpu")


def test_missing_model_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="export-onnx"):
        OnnxEncoder("all-MiniLM-L6-v2", model_dir=tmp_path)


def test_cuda_detection_is_false_without_a_driver() -> None:
    # On CI (no GPU) this must be False so "auto" never tries the CUDA provider.
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        assert cuda_usable() is False


def test_runtime_imports_neither_torch_nor_transformers(model_dir: Path) -> None:
    code = (
        "import sys, consumer.service.serve, consumer.service.runner, consumer.cli\n"
        "from models_onnx import OnnxEncoder\n"
        f"e = OnnxEncoder('all-MiniLM-L6-v2', model_dir={str(model_dir)!r}, device='cpu')\n"
        "e.encode(['hello'])\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


def test_pooling_runs_in_the_graph_and_equals_numpy(model_dir: Path) -> None:
    """Exports carry `sentence_embedding`; the encoder fetches only that (no host pooling)."""
    texts = ["short", "a somewhat longer sentence about bread and butter", "", "x " * 300]
    for variant in ("int8", "fp32"):
        enc = OnnxEncoder("all-MiniLM-L6-v2", model_dir=model_dir, device="cpu", variant=variant)
        assert enc._pooled == "sentence_embedding"
        graph = enc.encode(texts)
        enc._pooled = None  # the numpy pooling over last_hidden_state
        host = enc.encode(texts)
        np.testing.assert_allclose(graph, host, atol=1e-5)


def test_io_binding_gives_the_same_vectors(model_dir: Path, encoder: OnnxEncoder) -> None:
    bound = OnnxEncoder("all-MiniLM-L6-v2", model_dir=model_dir, device="cpu", io_binding=True)
    assert bound.io_binding and not encoder.io_binding  # default: IOBinding on CUDA only
    texts = ["espresso with latte art", "my puppy learned to sit", "a" * 50]
    np.testing.assert_allclose(bound.encode(texts), encoder.encode(texts), atol=1e-6)


@pytest.mark.parametrize(
    ("pooling", "normalize"), [("mean", True), ("cls", False), ("mean", False)]
)
def test_add_pooling_on_a_toy_graph(tmp_path: Path, pooling: str, normalize: bool) -> None:
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from models_onnx.export import add_pooling

    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"], axis=0)],
        "toy",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "l"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "l"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "l", 4])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "toy.onnx"
    onnx.save(model, str(path))
    add_pooling(path, pooling, normalize)
    add_pooling(path, pooling, normalize)  # idempotent
    ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0]], dtype=np.int64)
    mask = (ids > 0).astype(np.int64)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    h = table[ids]
    if pooling == "cls":
        want = h[:, 0]
    else:
        want = (h * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    if normalize:
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_int8_graph_keeps_layernorm_and_gelu_unfused(model_dir: Path) -> None:
    """Export recipe 2: onnxruntime's CPU SkipLayerNormalization and bias-GELU kernels were
    the slow ones (docs/PERFORMANCE.md); attention stays fused so Q/K/V quantise together."""
    onnx = pytest.importorskip("onnx")
    path = model_dir / "all-MiniLM-L6-v2" / "model_int8.onnx"
    graph = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"SkipLayerNormalization", "FastGelu", "BiasGelu"}
    assert {"QAttention", "LayerNormalization", "Gelu"} <= ops


def test_export_of_an_older_recipe_is_redone(model_dir: Path, tmp_path: Path) -> None:
    from models_onnx.export import EXPORT_RECIPE

    folder = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(model_dir / "all-MiniLM-L6-v2", folder)
    assert is_exported("all-MiniLM-L6-v2", tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["exported_with"]["recipe"] == EXPORT_RECIPE
    for old in ("1", None):
        if old is None:
            del manifest["exported_with"]["recipe"]
        else:
            manifest["exported_with"]["recipe"] = old
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert not is_exported("all-MiniLM-L6-v2", tmp_path)


def test_tags_are_embedded_by_the_fp32_variant(model_dir: Path, encoder: OnnxEncoder) -> None:
    """An int8 error on a tag vector shifts that tag for every item (see `tag_encoder`)."""
    from consumer.tagging.parts import sample_tag_system
    from tagsys import load_sample_tags, tag_prompt

    fp32 = OnnxEncoder("all-MiniLM-L6-v2", model_dir=model_dir, device="cpu", variant="fp32")
    assert fp32.tag_encoder() is fp32
    ref = encoder.tag_encoder()
    assert ref.variant == "fp32" and ref.device == encoder.device
    ts = sample_tag_system(encoder)
    assert ts.encoder == "all-MiniLM-L6-v2"
    prompts = [tag_prompt(t) for t in load_sample_tags()[0]]
    np.testing.assert_allclose(ts.embeddings, fp32.encode(prompts), atol=1e-5)
    assert np.abs(ts.embeddings - encoder.encode(prompts)).max() > 1e-3  # int8 differs
