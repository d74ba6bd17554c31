"""`tagstream distill`: teach the fast path from labelled decisions, write a new version.

Labelled data (gold labels standing in for LLM decisions) or the LLM decisions the service
recorded on its decisions topic. Items are split by a hash of their id (stable across runs and
file orders): held-out items are never used for fitting and are written next to the output so
`tagstream eval --tag-system OUT --data OUT.heldout.jsonl --format jsonl` can check the claim.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from consumer.tagging.core import TaggingCore
from consumer.tagging.metrics import Metrics
from consumer.tools.evaluate import DEFAULT_MODEL, embed_items, template_for, zero_shot
from models_onnx import OnnxEncoder
from tagsys import ImageSpace, TagSystem, TagSystemError
from tagsys.datasets import DatasetError, Item, load
from tagsys.distill import Head, fit_head
from tagsys.evaluation import (
    Outcome,
    auto_ceiling,
    calibrated,
    compute,
    gate_outcomes,
)
from tagsys.textfeat import TextFeatures

Progress = Callable[[int, int], None]
# n-gram weights of a head (tags x buckets x 4 bytes): 603 cooking tags x 16,384 = 40 MB;
# a 40k-tag vocabulary would need 2.6 GB at that width
MAX_TEXT_WEIGHTS = 256 * 2**20
F32 = npt.NDArray[np.float32]


def unfitted_image(ts: TagSystem) -> ImageSpace | None:
    """A distilled head scores in probabilities, not the cosines an image space's scale and
    shift were fitted against: until `calibrate --image-model` fits them again, the image
    space stays (its vectors are the tags') but never decides (scale 0, shift -2)."""
    if ts.image is None:
        return None  # the max rule: with scale 0, shift -2 the image never wins a tag
    return replace(ts.image, rule="max", scale=0.0, shift=-2.0)


def split_of(item_id: str, holdout: float) -> str:
    """'heldout' or 'train', from a hash of the id (not the file order)."""
    h = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:4], "big") / 2**32
    return "heldout" if h < holdout else "train"


@dataclass
class Labelled:
    ids: list[str]
    emb: F32
    texts: list[str]
    gold: list[frozenset[int]]


def outcomes_of(ts: TagSystem, d: Labelled) -> list[Outcome]:
    """The gate of `ts` on labelled items as the service runs it (a gate short of its target
    accepts nothing), shortlists wide enough for recall@20."""
    idx, scores = ts.shortlist(d.emb, d.texts, k=max(20, ts.gate.top_k))
    return gate_outcomes(ts, idx, scores, d.gold, trust_unfitted=False)


def _calibrated(ts: TagSystem, d: Labelled, target: float) -> TagSystem:
    idx, scores = ts.shortlist(d.emb, d.texts, k=ts.gate.top_k)
    return calibrated(ts, idx, scores, d.gold, target)[0]


def subset(d: Labelled, rows: list[int]) -> Labelled:
    return Labelled(
        [d.ids[i] for i in rows], d.emb[rows], [d.texts[i] for i in rows], [d.gold[i] for i in rows]
    )


CALIBRATIONS = ("cross", "split")
FOLDS = 5


def folds_of(d: Labelled, folds: int) -> npt.NDArray[np.int64]:
    """Each item's fold, from a hash of its text (of its id when it has none): the same text
    decided twice (a re-upload) lands in one fold, so no head is checked on a copy of what it
    learnt."""
    keys = [t if t.strip() else f"id:{i}" for i, t in zip(d.ids, d.texts, strict=True)]
    return np.array(
        [
            int.from_bytes(hashlib.sha256((k + "#fold").encode()).digest()[:4], "big") % folds
            for k in keys
        ],
        dtype=np.int64,
    )


def _head_system(
    base: TagSystem, head: Head, version: str, distilled: dict[str, Any] | None = None
) -> TagSystem:
    prov = dict(base.provenance)
    if distilled is not None:
        prov["distilled"] = distilled
    return replace(
        base,
        version=version,
        head=head,
        bias=None,
        gate=replace(base.gate, lexical_boost=0.0, tag_thresholds={}),
        provenance=prov,
        image=unfitted_image(base),
    )


def _fit(
    d: Labelled, base: TagSystem, text: TextFeatures | None, progress: Progress | None
) -> Head:
    return fit_head(
        d.emb,
        [sorted(g) for g in d.gold],
        base.embeddings,
        texts=d.texts,
        text=text,
        progress=progress,
    )


def _stage(progress: Progress | None, stage: int, stages: int) -> Progress | None:
    """One fit's progress as a part of all the fits'."""
    if progress is None:
        return None
    return lambda done, total: progress(stage * total + done, stages * total)


def _out_of_fold(
    base: TagSystem,
    d: Labelled,
    text: TextFeatures | None,
    folds: int,
    progress: Progress | None,
) -> tuple[npt.NDArray[np.int64], F32]:
    """Every item's shortlist as scored by a head that never saw it (fitted on the other
    folds): what the gate is calibrated on, so each item counts for calibration and the
    scores are as honest as those of new items."""
    # wide enough for recall@20 in an out-of-fold report
    k = min(max(20, base.gate.top_k), len(base.tags))
    fold = folds_of(d, folds)
    idx = np.zeros((len(d.ids), k), np.int64)
    scores = np.zeros((len(d.ids), k), np.float32)
    for f in range(folds):
        fit_rows = np.nonzero(fold != f)[0].tolist()
        rows = np.nonzero(fold == f)[0].tolist()
        if not rows:
            continue
        if not fit_rows:  # too few items for this many folds: score with the names' head
            ts = base
        else:
            head = _fit(subset(d, fit_rows), base, text, _stage(progress, f, folds + 1))
            ts = _head_system(base, head, base.version)
        part = subset(d, rows)
        i, s = ts.shortlist(part.emb, part.texts, k=k)
        idx[rows], scores[rows] = i, s
    return idx, scores


def check_holdout(holdout: float, calibration: str) -> None:
    """Refused before any work (embedding a file takes minutes): a share too small to check
    anything on, or no hold-out where only one would make a check."""
    if 0 < holdout < 0.05 or holdout >= 1:
        raise TagSystemError(f"--holdout must be 0 or in [0.05, 1), not {holdout}")
    if holdout == 0 and calibration != "cross":
        raise TagSystemError(
            "--holdout 0 needs --calibration cross (its check is out-of-fold); give "
            "--calibration split a --holdout above 0, e.g. 0.2"
        )


def _nested(
    ts: TagSystem,
    idx: npt.NDArray[np.int64],
    scores: F32,
    d: Labelled,
    folds: int,
    target: float,
) -> list[Outcome]:
    """Each item judged by a gate calibrated without it (on the other folds' rows): a gate
    measured on the rows it was fitted to looks better than it is."""
    fold = folds_of(d, folds)
    top = ts.gate.top_k
    out: dict[int, Outcome] = {}
    for f in range(folds):
        rows, rest = np.nonzero(fold == f)[0], np.nonzero(fold != f)[0]
        if not len(rows) or not len(rest):
            continue
        gated, _ = calibrated(
            ts, idx[rest, :top], scores[rest, :top], [d.gold[i] for i in rest], target
        )
        judged = gate_outcomes(
            gated, idx[rows], scores[rows], [d.gold[i] for i in rows], trust_unfitted=False
        )
        out.update(zip(rows.tolist(), judged, strict=True))
    return [out[i] for i in sorted(out)]


def distill(
    base: TagSystem,
    data: Labelled,
    *,
    holdout: float,
    target_precision: float,
    version: str | None = None,
    text: TextFeatures | None = None,
    calibration: str = "cross",
    check: bool = True,
    progress: Progress | None = None,
) -> tuple[TagSystem, dict[str, Any]]:
    """Fit the head and calibrate its gate on the train part, compare with the base (its gate
    calibrated on the same items) on the held-out part. With `text`, the head also reads the
    items' hashed character n-grams.

    With `holdout` 0 (cross calibration only) every item is learnt from, and the report's
    before/after are measured out-of-fold instead: each item scored by a head, and judged by
    a gate, fitted without it. That is what the learning loop runs, where each LLM decision
    costs a call. `check=False` skips before/after (the loop's own measure is the stream).

    `calibration`: "cross" (the default) fits the head on every train item and calibrates the
    gate on out-of-fold scores of every train item (5 folds); "split" fits on 80% and
    calibrates on the other 20%, which on small decision sets (cooking's 1,600) misses the
    target precision more often (docs/QUALITY.md, the simulated loop)."""
    if calibration not in CALIBRATIONS:
        raise TagSystemError(f"calibration must be one of {CALIBRATIONS}, not {calibration!r}")
    if text is not None and (size := len(base.tags) * text.buckets * 4) > MAX_TEXT_WEIGHTS:
        raise TagSystemError(
            f"--text-features: {len(base.tags):,} tags x {text.buckets:,} buckets is "
            f"{size / 2**20:,.0f} MiB of n-gram weights (fitting needs about 4x that; limit "
            f"{MAX_TEXT_WEIGHTS // 2**20} MiB): use fewer --text-buckets"
        )
    check_holdout(holdout, calibration)
    train = [i for i, x in enumerate(data.ids) if split_of(x, holdout) == "train"]
    held = [i for i, x in enumerate(data.ids) if split_of(x, holdout) == "heldout"]
    if len(train) < 10 or (holdout > 0 and not held):
        raise DatasetError(f"too few items to distil ({len(train)} train, {len(held)} held out)")
    name = version or f"{base.version}+distilled"
    test = subset(data, held)
    oof: tuple[npt.NDArray[np.int64], F32] | None = None
    if calibration == "cross":
        fit = cal = subset(data, train)
        oof = _out_of_fold(base, fit, text, FOLDS, progress)
        idx, scores = oof[0][:, : base.gate.top_k], oof[1][:, : base.gate.top_k]
        head = _fit(fit, base, text, _stage(progress, FOLDS, FOLDS + 1))
    else:
        fit_rows = [i for i in train if split_of(data.ids[i] + "#cal", 0.2) == "train"]
        cal_rows = [i for i in train if i not in set(fit_rows)]
        fit, cal = subset(data, fit_rows), subset(data, cal_rows)
        head = _fit(fit, base, text, progress)
        idx, scores = _head_system(base, head, name).shortlist(
            cal.emb, cal.texts, k=base.gate.top_k
        )
    distilled = {
        "from": base.version_id,
        "fit_items": len(fit.ids),
        "head": head.kind,
        "holdout": holdout,
        "calibration": calibration,
        "text_features": asdict(text) if text else None,
    }
    unfitted = _head_system(base, head, name, distilled)
    new, fitted = calibrated(unfitted, idx, scores, cal.gold, target_precision)
    report: dict[str, Any] = {
        "calibration": calibration,
        "train_items": len(fit.ids),
        "calibration_items": len(cal.ids),
        "heldout_items": len(held),
        "checked_on": None,
        "target_precision": target_precision,
        # the gate's own figures on the items it was fitted to: optimistic, not a check
        "fit_auto_fraction": fitted.auto_fraction,
        "fit_auto_precision": fitted.auto_precision,
        "reached": fitted.reached,
        "before": None,
        "after": None,
        "tag_system": new.version_id,
    }
    if not check:
        return new, report
    if held:
        before_ts = _calibrated(base, cal, target_precision)
        before_out, after_out = outcomes_of(before_ts, test), outcomes_of(new, test)
    else:  # holdout 0: out-of-fold scores, each judged by a gate fitted without it
        assert oof is not None
        b_idx, b_scores = base.shortlist(cal.emb, cal.texts, k=max(20, base.gate.top_k))
        before_out = _nested(base, b_idx, b_scores, cal, FOLDS, target_precision)
        after_out = _nested(unfitted, oof[0], oof[1], cal, FOLDS, target_precision)
        if not new.gate_fitted:  # the fold gates estimate a gate the service will not use
            after_out = [replace(o, auto=False, routed_llm=True) for o in after_out]
    keys = (
        "auto_fraction",
        "auto_precision",
        "llm_fraction",
        "auto_ceiling",
        "recall_at_1",
        "recall_at_5",
        "recall_at_10",
        "precision",
        "recall",
        "f1",
    )
    sides = {}
    for side, outs in (("before", before_out), ("after", after_out)):
        m = compute(outs, len(base.tags))
        # the most any gate could auto-accept at the target with this scorer (an oracle's)
        m["auto_ceiling"] = auto_ceiling(outs, target_precision)
        sides[side] = {k: m[k] for k in keys}
    report.update(sides, checked_on="heldout" if held else "out_of_fold")
    return new, report


def labelled_from_file(
    path: Path,
    fmt: str,
    *,
    level: int,
    base: TagSystem | None,
    model: str | None,
    model_dir: Path | None,
    limit: int | None,
    progress: Progress | None,
    tag_template: str | None = None,
    embedding_cache: Path | None = None,
) -> tuple[TagSystem, Labelled, list[Item], dict[str, int]]:
    ds = load(path, fmt, level=level, limit=limit)
    if not ds.items:
        raise DatasetError(f"{path}: no labelled items with text ({dict(ds.skipped)})")
    template = template_for(base, tag_template)
    name = model or (base.encoder if base else DEFAULT_MODEL[fmt])
    encoder = OnnxEncoder(name, model_dir=model_dir)
    ts = base or zero_shot(ds.labels, encoder, template=template)
    core = TaggingCore(encoder, ts, metrics=Metrics())  # refuses a mismatched encoder
    try:
        emb, texts = embed_items(core, ds.items, progress, embedding_cache)
    finally:
        core.close()
    unknown = 0
    gold = []
    for it in ds.items:
        g = {j for lab in it.gold if (j := ts.index_of(lab)) is not None}
        unknown += len(it.gold) - len(g)
        gold.append(frozenset(g))
    keep = [i for i, g in enumerate(gold) if g]
    data = Labelled(
        [ds.items[i].id for i in keep], emb[keep], [texts[i] for i in keep], [gold[i] for i in keep]
    )
    return ts, data, [ds.items[i] for i in keep], {"labels_not_in_vocabulary": unknown}


def labelled_from_decisions(
    records: list[dict[str, Any]], base: TagSystem, *, include_steerable: bool = False
) -> tuple[Labelled, dict[str, int]]:
    """Decision records (consumer/schemas/decision.v1.json) -> training data. Records the
    item's own text could steer (`steerable`: generative mode, where a caption can pull a
    tag from anywhere in the vocabulary) are left out unless asked for: a head learnt from
    them would learn the injection. Prompts are never mixed: only the records made with the
    prompt and handbook of the latest decision are used (`other_prompt` counts the rest), so
    a changed prompt starts its own training data."""
    ids, embs, texts, gold = [], [], [], []
    skipped = {
        "no_embedding": 0,
        "no_known_tag": 0,
        "other_encoder": 0,
        "steerable": 0,
        "other_prompt": 0,
    }
    latest = max(records, key=lambda r: str(r.get("decided_at", "")), default=None)
    current = _prompt_of(latest) if latest is not None else None
    for r in records:
        if _prompt_of(r) != current:
            skipped["other_prompt"] += 1
            continue
        if r.get("steerable") and not include_steerable:
            skipped["steerable"] += 1
            continue
        if r.get("encoder", "").split("/")[0] != base.encoder:
            skipped["other_encoder"] += 1
            continue
        e = r.get("embedding")
        if not isinstance(e, list) or len(e) != base.dim:
            skipped["no_embedding"] += 1
            continue
        g = {j for name in r.get("chosen", []) if (j := base.index_of(str(name))) is not None}
        if not g:
            skipped["no_known_tag"] += 1
            continue
        ids.append(str(r["id"]))
        embs.append(np.asarray(e, dtype=np.float32))
        texts.append(str(r.get("text", "")))
        gold.append(frozenset(g))
    emb = np.vstack(embs) if embs else np.zeros((0, base.dim), np.float32)
    if len(emb):
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Labelled(ids, emb, texts, gold), skipped


def _prompt_of(record: dict[str, Any]) -> tuple[str, str]:
    """What shaped a decision besides the item: the prompt and the handbook versions."""
    return str(record.get("prompt_version", "")), str(record.get("handbook_version") or "")


def write_heldout(items: list[Item], holdout: float, path: Path) -> int:
    n = 0
    with path.open("wb") as f:
        for it in items:
            if split_of(it.id, holdout) == "heldout":
                f.write(orjson.dumps({"id": it.id, **it.fields, "labels": list(it.gold)}) + b"\n")
                n += 1
    return n
