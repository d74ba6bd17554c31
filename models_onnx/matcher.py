"""The shortlist of a large vocabulary: an int8 first pass in onnxruntime, an exact re-rank.

`tagsys.shortlist` (numpy: fp32 BLAS product + argpartition) is the reference. At TagGPT's
40k tags × 384 dims its product alone runs near the 2-core fp32 peak (~0.29 ms/item) and the
argpartition adds ~0.17 ms. Here one ORT graph quantises the queries on the fly, multiplies
them with the int8 tag matrix and subtracts the bias in one kernel (`DynamicQuantizeMatMul`,
VNNI where the CPU has it; 7-bit weights, see W_MAX; the matrix is a constant, pre-packed
once at load), and keeps the best max(4k, k+32) candidates with ORT's TopK; numpy then
re-scores those candidates exactly in fp32 and keeps k. The returned scores are exact; the
top-k equals the reference unless a true top-k tag falls outside the int8 candidates
(tests/test_matcher.py measures the agreement; `tagstream bench` the speed).
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
# Weights use 7 bits, not 8. Without VNNI (AVX2 only, e.g. the AMD EPYC CI machines) ORT's
# u8s8 kernel adds pairs of u8×s8 products in int16 (vpmaddubsw), which saturates at 32767:
# 2 × 255 × 127 overflows, 2 × 255 × 63 does not (ORT's own `reduce_range` advice). With ±127 a
# 64-dim test vocabulary lost true top-10 tags from the 40 candidates there (recall 0.992);
# with ±63 none, and the exact re-rank makes the lost bit invisible in the scores.
W_MAX = 63


GRAPH = Path(__file__).with_name("shortlist.onnx")


def build_graph() -> bytes:
    """The generic graph (input q, k -> candidate indices). The tag matrix, its scales and the
    bias are placeholder initializers that each matcher overrides with its own arrays
    (`SessionOptions.add_initializer`): constant weights let ORT pre-pack the int8 matrix once
    at load instead of on every call (measured ~2x on the first pass). Shipped as
    shortlist.onnx so the service needs no `onnx` package; regenerate with
    `python -m models_onnx.matcher`."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", "dim"]),
        helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
    ]
    placeholders = [
        numpy_helper.from_array(np.zeros((1, 1), np.int8), "Wq"),
        numpy_helper.from_array(np.ones(1, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(1, np.int8), "w_zero"),
        numpy_helper.from_array(np.zeros(1, np.float32), "negbias"),
    ]
    outputs = [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", "k"])]
    nodes = [
        helper.make_node(
            "DynamicQuantizeMatMul",
            ["q", "Wq", "w_scale", "w_zero", "negbias"],
            ["s"],
            domain="com.microsoft",
        ),
        helper.make_node("TopK", ["s", "k"], ["approx", "idx"], axis=1, largest=1, sorted=0),
    ]
    graph = helper.make_graph(
        nodes, "tagstream_shortlist", inputs, outputs, initializer=placeholders
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
    )
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
        # symmetric per-tag, 7-bit (W_MAX)
        scale = np.abs(self.tags).max(axis=1) / W_MAX
        scale[scale == 0] = 1.0
        wq = np.clip(np.round(self.tags / scale[:, None]), -W_MAX, W_MAX).astype(np.int8)
        negbias = -self.bias if self.bias is not None else np.zeros(self.n_tags, np.float32)
        # ORT keeps pointers to these: they live as long as the matcher
        self._weights = {
            "Wq": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(wq.T)),
            "w_scale": ort.OrtValue.ortvalue_from_numpy(scale.astype(np.float32)),
            "w_zero": ort.OrtValue.ortvalue_from_numpy(np.zeros(self.n_tags, np.int8)),
            "negbias": ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(negbias, dtype=np.float32)
            ),
        }
        for name, value in self._weights.items():
            opts.add_initializer(name, value)
        self.session = ort.InferenceSession(
            str(GRAPH), sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def candidates(self, queries: F32, n: int) -> I64:
        """The int8 pass: the `n` best tags per query, unordered."""
        out = self.session.run(["idx"], {"q": queries, "k": np.array([n], dtype=np.int64)})
        return np.asarray(out[0], dtype=np.int64)

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
        cand = self.candidates(q, min(self.n_tags, max(4 * k, k + 32)))
        # exact fp32 re-score of the candidates only
        exact = np.einsum("bd,bkd->bk", q, self.tags[cand], optimize=True)
        if self.bias is not None:
            exact -= self.bias[cand]
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        idx = np.take_along_axis(cand, order, axis=1)
        scores = np.take_along_axis(exact, order, axis=1).astype(np.float32)
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
