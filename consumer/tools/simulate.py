"""`tagstream simulate`: the learning loop on labelled data, measured.

A labelled file is replayed in its order through the service's `TaggingCore` (the same
shortlist, gate and LLM step as `run`). The LLM is a stand-in behind the same tagger
interface that answers from the gold labels: it picks the gold tags that are on the shortlist
it was shown, and with probability 1 - P a wrong tag from that shortlist instead; it never
sees tags off the shortlist, as a selective-mode LLM never does. Its decisions are recorded as
the service records them (`decision_record`), and every N decisions the loop re-distils with
the code `distill --from-topic` runs (`labelled_from_decisions`, then `distill`), swapping the
tag system between batches as hot reload does. As the chart's CronJob (`distill
--require-reached`), a fit whose gate reaches no setting at the target is not published: the
version live keeps tagging.

No unearned confidence, as in the service (`unfitted_gate`): a zero-shot tag system's gate was
never fitted, so until the first distil nothing is auto-accepted and every item goes to the
LLM.

What comes out, per window of items and overall: the LLM's share, the precision of what the
gate auto-accepted (against the gold labels), final precision / recall / F1, LLM calls and the
share of calls saved against sending every item to the LLM. `auto_ceiling` is `calibrate`'s
oracle bound for the scorer live at the end on the last fifth of the stream, which it partly
learnt from when it was published during that fifth (the LLM's decisions there);
`auto_ceiling_unseen` is the same bound for the version that was live when the last fifth
began, on items it never learnt from. Both are None when no fit was published.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from consumer.tagging.core import TaggingCore, TagResult, llm_item
from consumer.tagging.llm import LLMAnswer
from consumer.tagging.metrics import Metrics
from consumer.tools.distill import (
    Labelled,
    check_holdout,
    distill,
    labelled_from_decisions,
    outcomes_of,
    subset,
)
from consumer.tools.evaluate import to_event
from models_onnx import OnnxEncoder
from tagsys import Decision, TagSystem
from tagsys.datasets import DatasetError, Item
from tagsys.errors import TagstreamError
from tagsys.evaluation import Outcome, auto_ceiling, compute

Progress = Callable[[int, int], None]


def _key(item: dict[str, Any]) -> str:
    return orjson.dumps(item, option=orjson.OPT_SORT_KEYS).decode()


class SimulatedLLM:
    """Answers from gold labels, right with probability `accuracy` (per item, seeded by the
    item's content, so the same item gets the same answer in any thread order)."""

    model = "simulated"

    def __init__(self, gold: dict[str, frozenset[str]], accuracy: float, *, seed: int = 0) -> None:
        self.gold = gold  # _key(llm_item(event)) -> gold tag names
        self.accuracy = accuracy
        self.seed = seed
        self.calls = 0

    def tag(
        self,
        item: dict[str, Any],
        shortlist: list[str],
        max_tags: int,
        guidance: str | None = None,
        image_urls: list[str] | None = None,
    ) -> LLMAnswer:
        self.calls += 1
        key = _key(item)
        gold = self.gold.get(key)
        if gold is None:
            return LLMAnswer(status="invalid", error="the simulated LLM knows no such item")
        rng = random.Random(f"{self.seed}:{key}")
        right = [n for n in shortlist if n in gold][:max_tags]
        wrong = [n for n in shortlist if n not in gold]
        if rng.random() >= self.accuracy and wrong:
            return LLMAnswer(status="ok", tags=[rng.choice(wrong)])
        return LLMAnswer(status="ok", tags=right)

    def propose(
        self,
        item: dict[str, Any],
        max_tags: int = 5,
        temperature: float = 0.7,
        guidance: str | None = None,
    ) -> LLMAnswer:
        raise TagstreamError("simulate runs the selective LLM step only")

    def close(self) -> None:
        return None


@dataclass
class Fit:
    at_item: int
    decisions: int
    tag_system: TagSystem  # the version fitted
    report: dict[str, Any]
    # whether it went live: as the chart's CronJob (`distill --require-reached`), a fit short
    # of its target is not published and the version live keeps tagging
    published: bool


@dataclass
class SimResult:
    outcomes: list[Outcome]
    # per item: None when not audited, else whether the LLM's answer was the encoder's tags
    audits: list[bool | None] = field(default_factory=list)
    fits: list[Fit] = field(default_factory=list)  # every attempt, published or not
    llm_calls: int = 0
    swapped_at: list[int] = field(default_factory=list)  # item positions: batch starts only
    final: TagSystem | None = None  # the version live at the end


def run_loop(
    start: TagSystem,
    encoder: OnnxEncoder,
    items: list[Item],
    data: Labelled,
    *,
    llm_accuracy: float,
    distill_every: int,
    target_precision: float,
    batch_size: int = 64,
    holdout: float = 0.0,
    seed: int = 0,
    audit_fraction: float = 0.0,
    calibration: str = "cross",
    progress: Progress | None = None,
) -> SimResult:
    """Replay `items` (embedded in `data`, same order) through the core with the simulated
    LLM, re-distilling from its recorded decisions every `distill_every` of them."""
    if not 0.0 <= llm_accuracy <= 1.0:
        raise TagstreamError(f"--llm-accuracy must be in [0, 1], not {llm_accuracy}")
    if distill_every < 10:
        raise TagstreamError("--distill-every must be at least 10 decisions")
    check_holdout(holdout, calibration)
    events = [to_event(it) for it in items]
    gold_names: dict[str, frozenset[str]] = {}
    for ev, g in zip(events, data.gold, strict=True):
        k = _key(llm_item(ev, 2000))
        gold_names[k] = gold_names.get(k, frozenset()) | {start.names[j] for j in g}
    llm = SimulatedLLM(gold_names, llm_accuracy, seed=seed)
    # the service's own rule: an unfitted gate (zero-shot) accepts nothing; only fits that
    # reached their target are published, and trusted
    core = TaggingCore(encoder, start, tagger=llm, metrics=Metrics(), audit_fraction=audit_fraction)
    res = SimResult(outcomes=[])
    records: list[dict[str, Any]] = []
    since_fit = 0
    try:
        for lo in range(0, len(events), batch_size):
            hi = min(lo + batch_size, len(events))
            results = core.decide(events[lo:hi], data.emb[lo:hi], data.texts[lo:hi])
            for r, g in zip(results, data.gold[lo:hi], strict=True):
                res.outcomes.append(_outcome(start, r, g))
                res.audits.append(_agreed(r))
                rec = core.decision_record(r)
                if rec is not None:
                    records.append(rec)
                    since_fit += 1
            if progress:
                progress(hi, len(events))
            if since_fit >= distill_every and hi < len(events):
                fitted = _refit(start, records, holdout, target_precision, hi, calibration)
                if fitted is not None:
                    res.fits.append(fitted)
                    since_fit = 0  # the next run comes after as many new decisions
                    if fitted.published:
                        core.swap_tag_system(fitted.tag_system)  # between batches, as reload
                        res.swapped_at.append(hi)
        res.final = core.tag_system
    finally:
        core.close()
    res.llm_calls = llm.calls
    return res


def _refit(
    start: TagSystem,
    records: list[dict[str, Any]],
    holdout: float,
    target: float,
    at: int,
    calibration: str,
) -> Fit | None:
    """`distill --from-topic` on the decisions so far; None while they are too few."""
    labelled, _ = labelled_from_decisions(records, start)
    version = f"{start.version}+loop{at}"
    try:
        new, report = distill(
            start,
            labelled,
            holdout=holdout,
            target_precision=target,
            version=version,
            calibration=calibration,
            check=holdout > 0,  # with 0, the stream itself is the check
        )
    except DatasetError:
        return None
    return Fit(at, len(records), new, report, bool(report["reached"]))


def shuffled(items: list[Item], data: Labelled, seed: int) -> tuple[list[Item], Labelled]:
    """The items and their embeddings in one random order (the same for the same seed)."""
    order = np.random.default_rng(seed).permutation(len(items)).tolist()
    return [items[i] for i in order], subset(data, order)


def _agreed(r: TagResult) -> bool | None:
    if not r.audit:
        return None
    names = {r.tag_system.names[j] for j, _, _ in r.tags}
    return r.audit_tags is not None and set(r.audit_tags) == names


def _outcome(start: TagSystem, r: TagResult, gold: frozenset[int]) -> Outcome:
    """One item's outcome in `start`'s tag indices (every version keeps the vocabulary)."""

    def to_start(j: int) -> int:
        k = start.index_of(r.tag_system.tag_ids[j])
        return -1 if k is None else k

    return Outcome(
        gold=gold,
        ranked=[to_start(j) for j, _ in r.shortlist],
        auto=r.decision is Decision.ENCODER,
        routed_llm=r.llm_asked,
        final=[to_start(j) for j, _, _ in r.tags],
    )


def _window(
    outcomes: list[Outcome], audits: list[bool | None], n_tags: int, lo: int, hi: int
) -> dict[str, Any]:
    part = outcomes[lo:hi]
    m = compute(part, n_tags)
    calls = sum(o.routed_llm for o in part)
    checked = [a for a in audits[lo:hi] if a is not None]
    return {
        "from_item": lo,
        "to_item": hi,
        "items": len(part),
        "llm_calls": calls,
        "llm_share": calls / len(part) if part else None,
        "auto_share": m["auto_fraction"],
        "auto_precision": m["auto_precision"],
        "precision": m["precision"],
        "recall": m["recall"],
        "f1": m["f1"],
        "audits": len(checked),
        "gate_agreement": sum(checked) / len(checked) if checked else None,
    }


def live_at(fits: list[Fit], pos: int) -> TagSystem | None:
    """The fitted version that was tagging when the stream reached item `pos`."""
    live = [f for f in fits if f.at_item <= pos and f.published]
    return live[-1].tag_system if live else None


def _ceiling(ts: TagSystem | None, tail: Labelled, target: float) -> float | None:
    if ts is None:
        return None
    return auto_ceiling(outcomes_of(ts, tail), target)


def report(
    res: SimResult,
    data: Labelled,
    start: TagSystem,
    *,
    target_precision: float,
    windows: int = 10,
) -> dict[str, Any]:
    """The figures `simulate --json` prints (its last line)."""
    n = len(res.outcomes)
    if n == 0:
        raise DatasetError("no items to simulate")
    n_tags = len(start.tags)
    bounds = np.linspace(0, n, num=min(windows, n) + 1).astype(int)
    wins = [
        _window(res.outcomes, res.audits, n_tags, int(a), int(b))
        for a, b in itertools.pairwise(bounds)
    ]
    overall = _window(res.outcomes, res.audits, n_tags, 0, n)
    last = _window(res.outcomes, res.audits, n_tags, n - max(1, n // 5), n)
    lo = n - max(1, n // 5)
    tail = subset(data, list(range(lo, n)))
    ceiling = _ceiling(live_at(res.fits, n), tail, target_precision)  # the one live at the end
    unseen = _ceiling(live_at(res.fits, lo), tail, target_precision)
    return {
        "items": n,
        "llm_calls": res.llm_calls,
        "llm_share": overall["llm_share"],
        "llm_share_last_fifth": last["llm_share"],
        "auto_precision": overall["auto_precision"],
        "auto_precision_last_fifth": last["auto_precision"],
        "auto_ceiling": ceiling,
        "auto_ceiling_unseen": unseen,
        "calls_saved_fraction": 1.0 - res.llm_calls / n,
        "audits": overall["audits"],
        "gate_agreement": overall["gate_agreement"],
        "precision": overall["precision"],
        "recall": overall["recall"],
        "f1": overall["f1"],
        "target_precision": target_precision,
        "fits": [
            {
                "at_item": f.at_item,
                "decisions": f.decisions,
                "tag_system": f.tag_system.version_id,
                "fit_items": f.report["train_items"],
                # False: no gate reached the target on the decisions; such a version would
                # auto-accept nothing (`TagSystem.gate_fitted`), so it is not published
                "reached": f.report["reached"],
                "published": f.published,
                # the gate on the decisions it was fitted to (LLM answers, not gold):
                # optimistic; the stream's windows are the measure
                "fit_auto_fraction": f.report["fit_auto_fraction"],
                "fit_auto_precision": f.report["fit_auto_precision"],
                # with --holdout > 0: `distill`'s check on the decisions it held out
                "heldout_auto_fraction": (f.report["after"] or {}).get("auto_fraction"),
                "heldout_auto_precision": (f.report["after"] or {}).get("auto_precision"),
            }
            for f in res.fits
        ],
        "windows": wins,
    }
