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

POOLED = "sentence_embedding"  # the in-graph pooled, normalised output (models_onnx.export)

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


# onnxruntime would re-fuse what the export leaves apart (models_onnx/export.py:
# _fuse_transformer); its CPU kernels for these fused ops are the slower ones on this path.
# CUDA keeps them: there the fused kernels are the fast ones.
CPU_DISABLED_FUSIONS = ["SkipLayerNormFusion", "BiasGeluFusion", "FastGeluFusion"]
# `Manifest.pooling` of a CLIP-family image/text pair (models_onnx.clip): not a text encoder
CLIP_POOLING = "clip"


def wants_cuda(device: Device) -> bool:
    """Whether `device` means CUDA here: "auto" only when CUDA is usable; "cuda" on a
    machine without it is a configuration error, not a silent CPU run."""
    if device == "cuda" and not cuda_usable():
        raise TagstreamError("--device cuda asked, but CUDA is not usable on this machine")
    return device == "cuda" or (device == "auto" and cuda_usable())


def pick_variant(manifest: Manifest, use_cuda: bool) -> str:
    """fp16 on a GPU, int8 on a CPU, else fp32: each where its kernels are the fast ones."""
    order = ["fp16", "fp32"] if use_cuda else ["int8", "fp32"]
    for v in order:
        if v in manifest.files:
            return v
    raise ModelNotFoundError(f"encoder {manifest.name} has none of {order}")


def make_session(path: Path, *, use_cuda: bool, threads: int | None) -> ort.InferenceSession:
    """An onnxruntime session with the providers passed explicitly (CUDA then CPU, or CPU
    alone) and the CPU's slow fusions off; raises when CUDA was asked and did not start."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.log_severity_level = 3
    providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
    if use_cuda:
        providers = [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]
    session = ort.InferenceSession(
        str(path),
        sess_options=opts,
        providers=providers,
        disabled_optimizers=[] if use_cuda else CPU_DISABLED_FUSIONS,
    )
    active = session.get_providers()
    if use_cuda and active[0] != "CUDAExecutionProvider":
        raise TagstreamError(f"CUDA provider failed to start (active: {active})")
    return session


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
        io_binding: bool | None = None,
    ) -> None:
        """`io_binding` (default: on CUDA) binds inputs and the pooled output through
        onnxruntime's IOBinding, so a run makes no extra host copies."""
        folder = model_path(name, model_dir)
        self.folder = folder
        self.manifest = Manifest.load(folder)
        self.name = self.manifest.name
        if self.manifest.pooling == CLIP_POOLING:
            raise TagstreamError(
                f"{folder} holds a CLIP image/text pair; load it with models_onnx.clip.ClipEncoder"
            )
        use_cuda = wants_cuda(device)
        variant = variant or pick_variant(self.manifest, use_cuda)
        path = self.manifest.verify(folder, variant)
        self.session = make_session(path, use_cuda=use_cuda, threads=threads)
        self.variant = variant
        self.threads = threads
        self.device = "cuda" if use_cuda else "cpu"
        self._input_names = {i.name for i in self.session.get_inputs()}
        # exports since the in-graph pooling have `sentence_embedding`: fetch only that
        outputs = [o.name for o in self.session.get_outputs()]
        self._pooled = POOLED if POOLED in outputs else None
        self._hidden = outputs[0]
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.tokenizer = Tokenizer.from_file(str(folder / self.manifest.tokenizer["path"]))
        self.tokenizer.enable_truncation(self.manifest.max_length)
        pad_token = next(
            (t for t in ("[PAD]", "<pad>") if self.tokenizer.token_to_id(t) is not None), None
        )
        if pad_token is None:
            self.tokenizer.enable_padding()
        else:
            pad_id = self.tokenizer.token_to_id(pad_token)
            self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
        # an unpadded twin for length-sorted, token-budgeted batching
        self._raw_tokenizer = Tokenizer.from_file(str(folder / self.manifest.tokenizer["path"]))
        self._raw_tokenizer.enable_truncation(self.manifest.max_length)
        self._raw_tokenizer.no_padding()
        pad = self.tokenizer.padding or {}
        self._pad_id = int(pad.get("pad_id", 0))
        self.dim = self.manifest.dim

    @property
    def default_batch_tokens(self) -> int:
        """Padded tokens per run: small on CPU (padding is the cost), large on a GPU. 512 on
        CPU: paired rounds on 2 cores gave +8% (MiniLM) and +10% (e5) items/s over 1024
        (docs/PERFORMANCE.md)."""
        return 16384 if self.device == "cuda" else 512

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

    def tokenize_sorted(
        self,
        texts: list[str],
        *,
        kind: Literal["query", "passage"] = "passage",
        max_batch_tokens: int = 16384,
        max_batch: int = 256,
    ) -> list[tuple[npt.NDArray[np.int64], TokenizedBatch]]:
        """Tokenize, sort by length and cut into batches of at most `max_batch_tokens` padded
        tokens (TEI style): padding, not text, is what a naive batch spends its time on.
        Returns (positions in `texts`, batch) pairs."""
        prefix = self.manifest.passage_prefix if kind == "passage" else self.manifest.query_prefix
        encs = self._raw_tokenizer.encode_batch([prefix + t for t in texts])
        lengths = np.array([len(e.ids) for e in encs], dtype=np.int64)
        order = np.argsort(lengths, kind="stable")
        out: list[tuple[npt.NDArray[np.int64], TokenizedBatch]] = []
        start = 0
        n = len(order)
        while start < n:
            end = start + 1
            while end < n and end - start < max_batch:
                if (end - start + 1) * int(lengths[order[end]]) > max_batch_tokens:
                    break
                end += 1
            idx = order[start:end]
            width = int(lengths[idx[-1]])
            ids = np.full((len(idx), width), self._pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            types = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                e = encs[int(i)]
                ids[row, : len(e.ids)] = e.ids
                mask[row, : len(e.ids)] = e.attention_mask
                types[row, : len(e.ids)] = e.type_ids
            out.append((idx.astype(np.int64), TokenizedBatch(ids, mask, types)))
            start = end
        return out

    def run(self, batch: TokenizedBatch) -> EncodedBatch:
        if len(batch) == 0:
            return EncodedBatch(np.zeros((0, self.dim), dtype=np.float32), 0)
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = batch.token_type_ids
        if self._pooled is not None:
            pooled_out = self._run_one(feeds, self._pooled)
            return EncodedBatch(np.ascontiguousarray(pooled_out, dtype=np.float32), batch.n_tokens)
        hidden = self._run_one(feeds, self._hidden)
        if self.manifest.pooling == "cls":
            pooled = hidden[:, 0, :]
        else:
            m = batch.attention_mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        if self.manifest.normalize:
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return EncodedBatch(np.ascontiguousarray(pooled, dtype=np.float32), batch.n_tokens)

    def _run_one(self, feeds: dict[str, npt.NDArray[np.int64]], output: str) -> F32:
        if not self.io_binding:
            return np.asarray(self.session.run([output], feeds)[0], dtype=np.float32)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output(output, self.device)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)

    def unreadable(self, texts: list[str]) -> list[int]:
        """Indices of the texts this encoder cannot read: half or more of their tokens are
        the unknown token. An English WordPiece vocabulary turns most Chinese characters into
        `[UNK]`, so MiniLM gives "爱", "吃" and "雪" one and the same vector (cosine 1.0)."""
        unk = next(
            (
                i
                for t in ("[UNK]", "<unk>")
                if (i := self._raw_tokenizer.token_to_id(t)) is not None
            ),
            None,
        )
        if unk is None:
            return []
        out = []
        encs = self._raw_tokenizer.encode_batch(texts, add_special_tokens=False)
        for n, enc in enumerate(encs):
            ids = enc.ids
            if ids and 2 * sum(1 for i in ids if i == unk) >= len(ids):
                out.append(n)
        return out

    def tag_encoder(self) -> OnnxEncoder:
        """The encoder for tag prompts: the fp32 variant when this one is quantised (int8,
        fp16). Tags are embedded once per tag system, so its cost does not matter; an int8
        error on a tag's vector is the same for every item and moves that tag's recall
        systematically, where errors on items average out. Measured with tagstream eval on
        KuaiRec level 2 (e5): int8 tags 0.352 / 0.387 recall@10 with two int8 graphs of the
        same weights, fp32 tags 0.384 with both (fp32 throughout: 0.385)."""
        if self.variant == "fp32" or "fp32" not in self.manifest.files:
            return self
        return OnnxEncoder(
            self.name,
            model_dir=self.folder.parent,
            device=self.device,  # type: ignore[arg-type]
            threads=self.threads,
            variant="fp32",
        )

    def encode(
        self,
        texts: list[str],
        *,
        kind: Literal["query", "passage"] = "passage",
        batch_size: int = 64,
        max_batch_tokens: int | None = None,
    ) -> F32:
        """Tokenize and encode in length-sorted, token-budgeted batches; rows in input order."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        budget = max_batch_tokens or self.default_batch_tokens
        for idx, batch in self.tokenize_sorted(
            texts, kind=kind, max_batch_tokens=budget, max_batch=batch_size
        ):
            out[idx] = self.run(batch).embeddings
        return out
