"""Run an exported encoder: `tokenizers` for text -> ids, onnxruntime for ids -> vectors.

CPU runs the int8 (per-channel dynamic) model; a CUDA GPU runs the fp16 one. Providers are
always passed explicitly, and "auto" only picks CUDA when the driver library is loadable, so
a CPU machine with onnxruntime-gpu never tries (and noisily fails) to start CUDA.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from models_onnx.manifest import Manifest, ModelNotFoundError
from models_onnx.registry import model_path
from tagsys.errors import TagstreamError

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TokenizedBatch:
    input_ids: npt.NDArray[np.int64]
    attention_mask: npt.NDArray[np.int64]
    token_type_ids: npt.NDArray[np.int64]

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class EncodedBatch:
    embeddings: F32  # (batch, dim), L2-normalised when the model asks for it
    n_tokens: int


def cuda_usable() -> bool:
    """True when onnxruntime has the CUDA provider and the NVIDIA driver library loads."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


class OnnxEncoder:
    """One loaded encoder. Thread-compatible: one caller at a time per instance."""

    def __init__(
        self,
        name: str,
        *,
        model_dir: str | Path | None = None,
        device: Device = "auto",
        threads: int | None = None,
        variant: str | None = None,
    ) -> None:
        folder = model_path(name, model_dir)
        self.folder = folder
        self.manifest = Manifest.load(folder)
        self.name = self.manifest.name
        use_cuda = device == "cuda" or (device == "auto" and cuda_usable())
        if device == "cuda" and not cuda_usable():
            raise TagstreamError("--device cuda asked, but CUDA is not usable on this machine")
        variant = variant or self._pick_variant(use_cuda)
        path = self.manifest.verify(folder, variant)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.log_severity_level = 3
        providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
        if use_cuda:
            providers = [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        active = self.session.get_providers()
        if use_cuda and active[0] != "CUDAExecutionProvider":
            raise TagstreamError(f"CUDA provider failed to start (active: {active})")
        self.variant = variant
        self.device = "cuda" if use_cuda else "cpu"
        self._input_names = {i.name for i in self.session.get_inputs()}
        self.tokenizer = Tokenizer.from_file(str(folder / self.manifest.tokenizer["path"]))
        self.tokenizer.enable_truncation(self.manifest.max_length)
        self.tokenizer.enable_padding()
        self.dim = self.manifest.dim

    def _pick_variant(self, use_cuda: bool) -> str:
        order = ["fp16", "fp32"] if use_cuda else ["int8", "fp32"]
        for v in order:
            if v in self.manifest.files:
                return v
        raise ModelNotFoundError(f"encoder {self.manifest.name} has none of {order}")

    @property
    def id(self) -> str:
        """What tag events carry: name and the variant that ran."""
        return f"{self.name}/{self.variant}"

    def tokenize(
        self, texts: list[str], *, kind: Literal["query", "passage"] = "passage"
    ) -> TokenizedBatch:
        prefix = self.manifest.passage_prefix if kind == "passage" else self.manifest.query_prefix
        encs = self.tokenizer.encode_batch([prefix + t for t in texts])
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        types = np.array([e.type_ids for e in encs], dtype=np.int64)
        return TokenizedBatch(ids, mask, types)

    def run(self, batch: TokenizedBatch) -> EncodedBatch:
        if len(batch) == 0:
            return EncodedBatch(np.zeros((0, self.dim), dtype=np.float32), 0)
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = batch.token_type_ids
        hidden = np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)
        if self.manifest.pooling == "cls":
            pooled = hidden[:, 0, :]
        else:
            m = batch.attention_mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        if self.manifest.normalize:
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return EncodedBatch(np.ascontiguousarray(pooled, dtype=np.float32), batch.n_tokens)

    def encode(
        self,
        texts: list[str],
        *,
        kind: Literal["query", "passage"] = "passage",
        batch_size: int = 64,
    ) -> F32:
        """Tokenize and encode in chunks, sorted by length to cut padding."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            enc = self.run(self.tokenize([texts[i] for i in chunk], kind=kind))
            out[chunk] = enc.embeddings
        return out
