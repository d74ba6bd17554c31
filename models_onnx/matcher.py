"""The shortlist of a large vocabulary in one onnxruntime graph: MatMul (MLAS) + TopK.

`tagsys.shortlist` (numpy: BLAS product + argpartition) is the reference. At TagGPT's 40k
tags the numpy top-k pass costs about as much as the product; ORT's TopK kernel does it in
one heap pass, and MLAS's GEMM is at least as fast as numpy's BLAS here. Exact: fp32 scores,
the same top-k (ties aside); tests/test_matcher.py checks it against the numpy reference.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

# below this many tags the numpy path is as fast and simpler
MIN_TAGS = 2048


GRAPH = Path(__file__).with_name("shortlist.onnx")


def build_graph() -> bytes:
    """The generic shortlist graph (inputs q, W, negbias, k); shipped as shortlist.onnx so the
    service needs no `onnx` package. Regenerate with `python -m models_onnx.matcher`."""
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", "dim"]),
        helper.make_tensor_value_info("W", TensorProto.FLOAT, ["dim", "tags"]),
        helper.make_tensor_value_info("negbias", TensorProto.FLOAT, ["tags"]),
        helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "k"]),
        helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", "k"]),
    ]
    nodes = [
        helper.make_node("MatMul", ["q", "W"], ["cos"]),
        helper.make_node("Add", ["cos", "negbias"], ["s"]),
        helper.make_node("TopK", ["s", "k"], ["scores", "idx"], axis=1, largest=1, sorted=1),
    ]
    graph = helper.make_graph(nodes, "tagstream_shortlist", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    model.producer_name = "tagstream"
    out: bytes = model.SerializeToString()
    return out


class OrtMatcher:
    def __init__(
        self, tag_embeddings: F32, bias: F32 | None = None, threads: int | None = None
    ) -> None:
        self.tags = np.ascontiguousarray(tag_embeddings, dtype=np.float32)
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32)
        self.n_tags = self.tags.shape[0]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(GRAPH), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        # the tag matrix is bound once (no copy per call): only the queries move
        self._w = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self.tags.T))
        negbias = -self.bias if self.bias is not None else np.zeros(self.n_tags, np.float32)
        self._negbias = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(negbias))

    def top_k(
        self,
        queries: F32,
        k: int,
        *,
        mentions: Sequence[Collection[int]] | None = None,
        boost: float = 0.0,
    ) -> tuple[I64, F32]:
        """Same contract as `tagsys.shortlist.shortlist` with this matcher's tags and bias."""
        k = max(1, min(k, self.n_tags))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        binding = self.session.io_binding()
        binding.bind_cpu_input("q", q)
        binding.bind_ortvalue_input("W", self._w)
        binding.bind_ortvalue_input("negbias", self._negbias)
        binding.bind_cpu_input("k", np.array([k], dtype=np.int64))
        binding.bind_output("scores")
        binding.bind_output("idx")
        self.session.run_with_iobinding(binding)
        scores_v, idx_v = binding.copy_outputs_to_cpu()
        idx = np.asarray(idx_v, dtype=np.int64)
        scores = np.asarray(scores_v, dtype=np.float32)
        if mentions is None or not boost:
            return idx, scores
        return merge_mentions(idx, scores, q, self.tags, self.bias, mentions, boost, k)


def merge_mentions(
    idx: I64,
    scores: F32,
    queries: F32,
    tags: F32,
    bias: F32 | None,
    mentions: Sequence[Collection[int]],
    boost: float,
    k: int,
) -> tuple[I64, F32]:
    """Add the lexical boost to a top-k list exactly: a mentioned tag outside the list is
    scored on its own, so the result equals boosting the full score row first."""
    out_idx = idx.copy()
    out_scores = scores.copy()
    for i, hits in enumerate(mentions):
        if not hits:
            continue
        cand = {int(j): float(s) for j, s in zip(idx[i], scores[i], strict=True)}
        extra = [j for j in hits if j not in cand]
        if extra:
            s = tags[extra] @ queries[i]
            if bias is not None:
                s = s - bias[extra]
            cand.update(zip(extra, (float(x) for x in s), strict=True))
        for j in hits:
            cand[int(j)] += boost
        best = sorted(cand.items(), key=lambda kv: -kv[1])[:k]
        out_idx[i] = [j for j, _ in best]
        out_scores[i] = [s for _, s in best]
    return out_idx, out_scores


if __name__ == "__main__":
    GRAPH.write_bytes(build_graph())
    print(f"wrote {GRAPH}")
