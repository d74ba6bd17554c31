"""Sentence encoders exported to ONNX and run with onnxruntime(-gpu) + `tokenizers`.

Run time needs neither torch nor transformers; only `export` (the `[export]` extra) does.
"""

from models_onnx.clip import ClipEncoder
from models_onnx.encoder import EncodedBatch, OnnxEncoder, TokenizedBatch
from models_onnx.manifest import Manifest, ModelIntegrityError, ModelNotFoundError
from models_onnx.registry import KNOWN_ENCODERS, EncoderSpec, default_model_dir, model_path

__all__ = [
    "KNOWN_ENCODERS",
    "ClipEncoder",
    "EncodedBatch",
    "EncoderSpec",
    "Manifest",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "OnnxEncoder",
    "TokenizedBatch",
    "default_model_dir",
    "model_path",
]
