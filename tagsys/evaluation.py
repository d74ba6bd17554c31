"""Quality metrics of the decision path, and gate calibration on labelled data.

Pure numpy so the metrics can be tested on toy data with known answers
(tests/test_evaluation.py); `tagstream eval` feeds them the service's own decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from tagsys.gate import Decision, GateConfig, decide
from tagsys.tagsystem import TagSystem

KEYS = (
    "items",
    "tags",
    "recall_at_5",
    "recall_at_10",
    "recall_at_20",
    "auto_fraction",
    "auto_precision",
    "llm_fraction",
    "precision",
    "recall",
    "f1",
)
# `calibrate` tries max_tags 1, 2 and 3: the ceiling lets an oracle use as many
CEILING_MAX_TAGS = 3


@dataclass(frozen=True)
class Outcome:
    """One item's result: gold tag indices, ranked shortlist, decision and final tags."""

    gold: frozenset[int]
    ranked: Sequence[int]  # the top tags by score, best first (at least 20 when available)
    auto: bool  # the gate accepted the encoder's tags
    routed_llm: bool  # the gate sent the item to the LLM (whether or not one answered)
    final: Sequence[int]  # the tags the tag event carries


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def compute(outcomes: Sequence[Outcome], n_tags: int) -> dict[str, Any]:
    """Every metric of `tagstream eval --json` (micro unless named macro)."""
    n = len(outcomes)
    total_gold = sum(len(o.gold) for o in outcomes)
    out: dict[str, Any] = {"items": n, "tags": n_tags}
    for k in (1, 5, 10, 20):
        hits = sum(len(o.gold.intersection(o.ranked[:k])) for o in outcomes)
        out[f"recall_at_{k}"] = _ratio(hits, total_gold)
    auto = [o for o in outcomes if o.auto]
    auto_emitted = sum(len(o.final) for o in auto)
    auto_correct = sum(len(o.gold.intersection(o.final)) for o in auto)
    out["auto_fraction"] = _ratio(len(auto), n)
    out["auto_precision"] = _ratio(auto_correct, auto_emitted)
    out["llm_fraction"] = _ratio(sum(o.routed_llm for o in outcomes), n)
    emitted = sum(len(o.final) for o in outcomes)
    correct = sum(len(o.gold.intersection(o.final)) for o in outcomes)
    p = correct / emitted if emitted else 0.0
    r = correct / total_gold if total_gold else 0.0
    out.update(precision=p, recall=r, f1=_f1(p, r))
    tp: dict[int, int] = {}
    fp: dict[int, int] = {}
    fn: dict[int, int] = {}
    for o in outcomes:
        fin = set(o.final)
        for t in fin & o.gold:
            tp[t] = tp.get(t, 0) + 1
        for t in fin - o.gold:
            fp[t] = fp.get(t, 0) + 1
        for t in o.gold - fin:
            fn[t] = fn.get(t, 0) + 1
    seen = set(tp) | set(fp) | set(fn)
    ps, rs, fs = [], [], []
    for t in seen:
        pt = tp.get(t, 0) / (tp.get(t, 0) + fp.get(t, 0)) if tp.get(t, 0) + fp.get(t, 0) else 0.0
        rt = tp.get(t, 0) / (tp.get(t, 0) + fn.get(t, 0)) if tp.get(t, 0) + fn.get(t, 0) else 0.0
        ps.append(pt)
        rs.append(rt)
        fs.append(_f1(pt, rt))
    out["macro_precision"] = float(np.mean(ps)) if ps else 0.0
    out["macro_recall"] = float(np.mean(rs)) if rs else 0.0
    out["macro_f1"] = float(np.mean(fs)) if fs else 0.0
    return out


def auto_ceiling(
    outcomes: Sequence[Outcome], target_precision: float, max_tags: int = CEILING_MAX_TAGS
) -> float | None:
    """The largest share of items any gate of `decide`'s form could auto-accept at
    `target_precision` with these rankings: an oracle picks the items and, per item, which of
    its top `max_tags` tags go out. Such a gate always emits an item's top-ranked tag, so on
    single-label data this is (share of items whose top tag is right) / target. Below the
    share wanted, no threshold fitting can reach the target: the scorer has to get better."""
    if not outcomes:
        return None
    surplus = []
    for o in outcomes:
        if not o.ranked:
            continue  # nothing to emit: never auto-accepted
        s = (1.0 if o.ranked[0] in o.gold else 0.0) - target_precision
        # a further tag adds (1 - target) when right and is left out when wrong
        s += (1.0 - target_precision) * len(o.gold.intersection(o.ranked[1:max_tags]))
        surplus.append(s)
    # best first; the longest prefix whose summed surplus stays >= 0 is the largest set
    running = np.cumsum(sorted(surplus, reverse=True))
    ok = np.nonzero(running >= -1e-9)[0]
    return (int(ok[-1]) + 1) / len(outcomes) if len(ok) else 0.0


@dataclass(frozen=True)
class Calibration:
    gate: GateConfig
    auto_fraction: float
    auto_precision: float | None
    reached: bool  # False when no setting reaches the target precision


def _auto_stats(
    correct: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float32],
    thr_of: npt.NDArray[np.float32],
    margin: float,
    max_tags: int,
) -> tuple[npt.NDArray[np.bool_], int, int]:
    """Vectorised twin of `gate.decide` for the auto-accepted items.
    `thr_of[i, j]` is the threshold of the tag at shortlist position j of item i."""
    top = scores[:, 0]
    second = scores[:, 1] if scores.shape[1] > 1 else np.full_like(top, -1.0)
    auto = (top >= thr_of[:, 0]) & ((top - second) >= margin)
    picked = scores[:, :max_tags] >= thr_of[:, :max_tags]
    picked &= auto[:, None]
    return auto, int(picked.sum()), int((picked & correct[:, :max_tags]).sum())


def calibrate(
    idx: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    gold: Sequence[frozenset[int]],
    tag_ids: Sequence[str],
    base: GateConfig,
    *,
    target_precision: float = 0.9,
    min_support: int = 10,
    max_tags_choices: Sequence[int] = tuple(range(1, CEILING_MAX_TAGS + 1)),
) -> Calibration:
    """The gate that auto-accepts the most items at `target_precision` on this labelled data.

    Grid search over the global threshold, margin and max_tags, then per-tag thresholds are
    raised for tags (with at least `min_support` auto-accepted items) whose own precision
    falls short. Fit on one part of the data and check on another: this overfits otherwise.
    """
    n = len(gold)
    correct = np.array([[int(j) in gold[i] for j in idx[i]] for i in range(n)], dtype=bool).reshape(
        idx.shape
    )
    top = scores[:, 0]
    margins = top - (scores[:, 1] if scores.shape[1] > 1 else -1.0)
    thr_grid = np.unique(np.quantile(top, np.linspace(0.0, 0.995, 80)))
    margin_grid = np.unique(np.concatenate([[0.0], np.quantile(margins, np.linspace(0, 0.9, 19))]))
    best: tuple[float, float, float, int] | None = None  # (auto_frac, thr, margin, max_tags)
    best_prec: float | None = None
    fallback: tuple[float, float, float, int] | None = None  # highest precision seen
    fallback_prec = -1.0
    for mt in max_tags_choices:
        for thr in thr_grid:
            thr_of = np.full(idx.shape, thr, dtype=np.float32)
            for m in margin_grid:
                auto, emitted, ok = _auto_stats(correct, scores, thr_of, float(m), mt)
                if not emitted:
                    continue
                prec = ok / emitted
                frac = float(auto.mean())
                if prec >= target_precision and (best is None or frac > best[0]):
                    best, best_prec = (frac, float(thr), float(m), mt), prec
                if prec > fallback_prec or (
                    prec == fallback_prec and fallback and frac > fallback[0]
                ):
                    fallback, fallback_prec = (frac, float(thr), float(m), mt), prec
    reached = best is not None
    chosen = best if best is not None else fallback
    if chosen is None:
        return Calibration(base, 0.0, None, False)
    frac, thr, margin, mt = chosen
    gate = replace(
        base,
        accept_threshold=thr,
        min_margin=margin,
        max_tags=mt,
        min_score=min(base.min_score, thr),
        tag_thresholds={},
    )
    # per-tag: raise the threshold of tags that are wrong too often when they lead
    per_tag: dict[str, float] = {}
    auto = (top >= thr) & (margins >= margin)
    for j in np.unique(idx[auto, 0]):
        rows = auto & (idx[:, 0] == j)
        if rows.sum() < min_support:
            continue
        s, c = top[rows], correct[rows, 0]
        if c.mean() >= target_precision:
            continue
        order = np.argsort(s)
        # smallest cut above which this tag's precision reaches the target
        for cut in range(1, len(order)):
            if c[order[cut:]].mean() >= target_precision:
                per_tag[tag_ids[int(j)]] = float(s[order[cut]])
                break
        else:
            per_tag[tag_ids[int(j)]] = float(s.max()) + 1e-4  # never auto-accept this tag
    if per_tag:
        gate = replace(gate, tag_thresholds=per_tag)
    tid = np.array(tag_ids, dtype=object)
    thr_of = np.vectorize(lambda t: gate.tag_thresholds.get(t, thr), otypes=[np.float32])(tid[idx])
    auto_mask, emitted, ok = _auto_stats(correct, scores, thr_of, margin, mt)
    return Calibration(
        gate=gate,
        auto_fraction=float(auto_mask.mean()),
        auto_precision=(ok / emitted) if emitted else best_prec,
        reached=reached,
    )


def gate_outcomes(
    ts: TagSystem,
    idx: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    gold: Sequence[frozenset[int]],
    *,
    trust_unfitted: bool = True,
) -> list[Outcome]:
    """The gate of `ts` over precomputed shortlists (at least `ts.gate.top_k` wide), without
    the LLM: what auto-accepts and what it emits, for held-out reports. With
    `trust_unfitted=False` a gate the service does not trust (`TagSystem.gate_fitted`)
    auto-accepts nothing, as in the service by default."""
    k = ts.gate.top_k
    trusted = trust_unfitted or ts.gate_fitted
    outs = []
    for i in range(len(gold)):
        g = decide(idx[i, :k], scores[i, :k], ts.tag_ids, ts.gate)
        auto = trusted and g.decision_hint is Decision.ENCODER
        outs.append(
            Outcome(gold[i], [int(j) for j in idx[i]], auto, not auto, [j for j, _ in g.tags])
        )
    return outs


def calibrated(
    ts: TagSystem,
    idx: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    gold: Sequence[frozenset[int]],
    target_precision: float,
) -> tuple[TagSystem, Calibration]:
    """`ts` with the gate `calibrate` fits on these items, recorded in its provenance."""
    cal = calibrate(idx, scores, gold, ts.tag_ids, ts.gate, target_precision=target_precision)
    prov = dict(ts.provenance)
    prov["calibrated"] = {
        "target_precision": target_precision,
        "fit_items": len(gold),
        "fit_auto_fraction": round(cal.auto_fraction, 4),
        "fit_auto_precision": None if cal.auto_precision is None else round(cal.auto_precision, 4),
        "reached": cal.reached,
    }
    return replace(ts, gate=cal.gate, provenance=prov), cal
