"""`tagstream simulate` on toy data with known answers: the learning loop through the
service's core, with an LLM that answers from the gold labels."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumer.tools.distill import labelled_from_file
from consumer.tools.simulate import (
    Fit,
    SimResult,
    SimulatedLLM,
    live_at,
    report,
    run_loop,
    shuffled,
)
from models_onnx import OnnxEncoder
from tests.conftest import cli_exit

TOPICS = {
    "baking": ["sourdough bread", "a sponge cake", "croissant dough", "rye loaves", "muffins"],
    "grilling": ["ribeye steak", "pork ribs", "chicken skewers", "burgers", "lamb chops"],
    "coffee": ["espresso shots", "a pour-over", "cold brew", "cappuccino foam", "a french press"],
    "pickling": [
        "cucumbers in brine",
        "kimchi",
        "sauerkraut",
        "pickled onions",
        "fermented hot sauce",
    ],
}
VERBS = {
    "baking": ["How long do I bake {x} in the oven?", "My {x} did not rise, why?"],
    "grilling": ["How hot should the grill be for {x}?", "Should I sear {x} over charcoal?"],
    "coffee": ["How fine should I grind beans for {x}?", "Why does my {x} taste bitter?"],
    "pickling": ["How much salt for {x}?", "How long do {x} need to ferment?"],
}


def _toy(tmp: Path, n: int = 480, seed: int = 0, unique: bool = False) -> Path:
    """A separable labelled stream: each item is about one of four topics. Texts repeat
    unless `unique` (then the simulated LLM's mistakes cannot repeat either)."""
    rng = random.Random(seed)
    path = tmp / "toy.jsonl"
    with path.open("w") as f:
        for i in range(n):
            tag = rng.choice(sorted(TOPICS))
            text = rng.choice(VERBS[tag]).format(x=rng.choice(TOPICS[tag]))
            text = f"{text} (question {i})" if unique else text
            f.write(json.dumps({"id": f"t{i}", "title": text, "labels": [tag]}) + "\n")
    return path


def _load(path: Path, model_dir: Path) -> Any:
    ts, data, items, _ = labelled_from_file(
        path,
        "jsonl",
        level=1,
        base=None,
        model="all-MiniLM-L6-v2",
        model_dir=model_dir,
        limit=None,
        progress=None,
    )
    return ts, data, items, OnnxEncoder("all-MiniLM-L6-v2", model_dir=model_dir, device="cpu")


@pytest.fixture(scope="module")
def toy(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _load(_toy(tmp_path_factory.mktemp("sim")), model_dir)


@pytest.fixture(scope="module")
def toy_unique(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _load(_toy(tmp_path_factory.mktemp("sim"), unique=True), model_dir)


def _loop(toy: Any, accuracy: float, every: int = 60, audit: float = 0.0) -> SimResult:
    ts, data, items, enc = toy
    return run_loop(
        ts,
        enc,
        items,
        data,
        llm_accuracy=accuracy,
        distill_every=every,
        target_precision=0.9,
        batch_size=32,
        audit_fraction=audit,
    )


def _run(toy: Any, accuracy: float, every: int = 60, audit: float = 0.0) -> dict[str, Any]:
    ts, data, _items, _enc = toy
    res = _loop(toy, accuracy, every, audit)
    out = report(res, data, ts, target_precision=0.9, windows=6)
    out["swapped_at"] = res.swapped_at
    out["routed"] = [o.routed_llm for o in res.outcomes]
    return out


def test_a_perfect_llm_drives_the_llm_share_towards_zero(toy: Any) -> None:
    out = _run(toy, 1.0)
    wins = out["windows"]
    assert out["fits"], "the loop never distilled"
    # until the first fit the gate is unfitted and accepts nothing: every item to the LLM
    assert all(out["routed"][: out["swapped_at"][0]])
    assert wins[-1]["llm_share"] < 0.3 and out["llm_share_last_fifth"] < 0.3, wins
    assert out["auto_precision_last_fifth"] >= 0.9
    assert out["calls_saved_fraction"] == pytest.approx(1 - out["llm_calls"] / out["items"])
    assert out["calls_saved_fraction"] > 0.3
    assert out["llm_calls"] == sum(w["llm_calls"] for w in wins)
    assert out["auto_ceiling"] is not None and out["auto_ceiling"] > 0.5


def test_swaps_happen_between_batches_only(toy: Any) -> None:
    out = _run(toy, 1.0, every=50)
    assert out["swapped_at"] and all(pos % 32 == 0 for pos in out["swapped_at"])
    assert [f["at_item"] for f in out["fits"] if f["published"]] == out["swapped_at"]
    assert len({f["tag_system"] for f in out["fits"]}) == len(out["fits"])  # new versions


def test_a_wrong_llm_never_raises_auto_precision(toy: Any) -> None:
    right, wrong = _run(toy, 1.0), _run(toy, 0.0)
    assert wrong["auto_precision"] is None or wrong["auto_precision"] < 0.5
    assert (wrong["auto_precision"] or 0.0) <= (right["auto_precision"] or 0.0)
    assert wrong["precision"] < right["precision"]


def test_the_simulated_llm_only_picks_from_the_shortlist() -> None:
    item = {"title": "x"}
    key = json.dumps(item, separators=(",", ":"), sort_keys=True)
    always = SimulatedLLM({key: frozenset({"a", "z"})}, 1.0)
    assert always.tag(item, ["b", "a", "c"], 3).tags == ["a"]  # z is off the shortlist
    never = SimulatedLLM({key: frozenset({"a"})}, 0.0)
    assert never.tag(item, ["b", "a", "c"], 3).tags[0] in {"b", "c"}
    assert never.tag({"title": "unknown"}, ["a"], 3).status == "invalid"


def test_the_zero_shot_start_is_unfitted(toy: Any) -> None:
    assert not toy[0].gate_fitted  # so the core sends everything to the LLM until a fit


def test_simulate_cli_prints_the_report(
    toy: Any, model_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    path = _toy(tmp_path, 200, seed=1)
    png = tmp_path / "loop.png"
    args = ["simulate", "--data", str(path), "--format", "jsonl", "--llm-accuracy", "1.0"]
    args += ["--distill-every", "60", "--target-precision", "0.9", "--json"]
    args += ["--model-dir", str(model_dir), "--plot", str(png), "--shuffle", "1"]
    code = cli_exit(args)
    assert code in (0, None)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["shuffle"] == 1 and out["calibration"] == "cross"
    assert out["fits"] and out["fits"][0]["fit_auto_precision"] is not None
    assert out["fits"][0]["heldout_auto_precision"] is None  # --holdout 0: the stream checks
    for key in (
        "items",
        "llm_calls",
        "llm_share",
        "llm_share_last_fifth",
        "auto_precision",
        "auto_precision_last_fifth",
        "auto_ceiling",
        "auto_ceiling_unseen",
        "calls_saved_fraction",
        "precision",
        "recall",
        "f1",
        "windows",
    ):
        assert key in out, key
    assert out["items"] == 200 and len(out["windows"]) == 10
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_audit_sample_measures_the_gate_against_the_llm(toy_unique: Any) -> None:
    """Auto-accepted items audited by a right LLM mostly agree; when the LLM's answers turn
    wrong under a trusted gate (drift), the agreement falls. The audit calls are paid for
    (counted with the LLM calls). Texts are unique: a head learns a wrong LLM's mistakes on
    repeated texts, and then agrees with it there."""
    ts, data, items, enc = toy = toy_unique
    right, none = _run(toy, 1.0, audit=0.5), _run(toy, 1.0)
    assert right["audits"] > 20 and right["gate_agreement"] > 0.8
    assert none["audits"] == 0 and none["gate_agreement"] is None
    routed = sum(w["llm_calls"] for w in right["windows"])
    assert right["llm_calls"] == routed + right["audits"]
    # the right loop's last version stays live (no re-fit) and the LLM now answers wrongly
    live = _loop(toy, 1.0).final
    assert live is not None and live.gate_fitted
    drift = run_loop(
        live,
        enc,
        items,
        data,
        llm_accuracy=0.0,
        distill_every=len(items) + 1,
        target_precision=0.9,
        batch_size=32,
        audit_fraction=0.5,
    )
    out = report(drift, data, ts, target_precision=0.9)
    assert out["audits"] > 20 and out["gate_agreement"] < 0.2


def test_a_fit_short_of_its_target_accepts_nothing(toy_unique: Any) -> None:
    """No gate agrees 90% with an LLM that is always wrong (on unique texts it cannot be
    learnt): every fit falls short, and none is trusted to auto-accept."""
    out = _run(toy_unique, 0.0, audit=0.5)
    assert out["fits"] and not any(f["reached"] or f["published"] for f in out["fits"])
    assert out["swapped_at"] == [] and out["auto_ceiling"] is None  # the zero-shot start stayed
    # each kept its most precise setting; some would have accepted items...
    assert any(f["fit_auto_fraction"] > 0 for f in out["fits"])
    # ...but none was trusted: every item went to the LLM, none was audited
    assert all(out["routed"]) and out["audits"] == 0


def test_a_fit_short_of_its_target_is_not_published(
    toy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the CronJob (`distill --require-reached`): the version live (here the zero-shot
    start, which accepts nothing) keeps tagging, and the next fit is tried after as many new
    decisions."""
    import consumer.tools.simulate as sim

    real = sim._refit
    tried: list[int] = []

    def first_short(*args: Any) -> Fit | None:
        fit = real(*args)
        if fit is not None:
            tried.append(fit.at_item)
            if len(tried) == 1:  # as `_refit` makes a fit short of its target
                fit = replace(fit, report={**fit.report, "reached": False}, published=False)
        return fit

    monkeypatch.setattr(sim, "_refit", first_short)
    res = _loop(toy, 1.0, every=40)
    assert len(res.fits) >= 2 and [f.at_item for f in res.fits] == tried
    short, second = res.fits[:2]
    assert not short.published and second.published and second.report["reached"]
    assert res.swapped_at[0] == second.at_item  # the short one never went live
    assert live_at(res.fits, short.at_item + 1) is None  # the start kept tagging
    assert all(o.routed_llm for o in res.outcomes[: second.at_item])  # so nothing accepted
    assert not all(o.routed_llm for o in res.outcomes[second.at_item :])
    assert second.decisions - short.decisions >= 40  # tried again after as many decisions


def test_shuffle_keeps_each_item_with_its_vector_and_labels(toy: Any) -> None:
    _ts, data, items, _enc = toy
    a_items, a = shuffled(items, data, 3)
    _b_items, b = shuffled(items, data, 3)
    assert [it.id for it in a_items] == a.ids == b.ids  # the same order for the same seed
    assert a.ids != data.ids and sorted(a.ids) == sorted(data.ids)
    where = {x: i for i, x in enumerate(data.ids)}
    for j in (0, 7, len(a.ids) - 1):
        i = where[a.ids[j]]
        assert (a.emb[j] == data.emb[i]).all() and a.gold[j] == data.gold[i]
        assert a.texts[j] == data.texts[i]


def test_the_unseen_ceiling_uses_the_version_live_at_the_last_fifth(toy: Any) -> None:
    """`auto_ceiling_unseen` scores the last fifth with the version that was tagging when it
    began (it never learnt from those items), `auto_ceiling` with the last one."""
    ts, data, items, _enc = toy
    res = _loop(toy, 1.0)
    [first] = res.fits  # a perfect LLM on separable topics: one fit, then no more doubt
    lo = len(items) - len(items) // 5
    # the names' head with the names shuffled round: a scorer that ranks wrongly
    wrong = replace(ts, version="wrong", embeddings=np.roll(ts.embeddings, 1, axis=0))
    mid = Fit(lo - 32, 999, wrong, first.report, True)  # live when the last fifth began
    late = Fit(lo + 32, 999, first.tag_system, first.report, True)  # the right one again
    short = Fit(lo + 64, 999, wrong, {**first.report, "reached": False}, False)  # never live
    assert live_at([first, mid, late], lo) is wrong
    assert live_at([first, mid, late], lo + 40) is first.tag_system
    assert live_at([first, mid, late, short], lo + 80) is first.tag_system
    assert live_at([first, mid, late], first.at_item - 1) is None
    out = report(res, data, ts, target_precision=0.9)
    assert out["auto_ceiling_unseen"] == out["auto_ceiling"] > 0.9  # one version: the same
    res.fits += [mid, late, short]
    res.final = late.tag_system  # as run_loop leaves it: the short fit never went live
    both = report(res, data, ts, target_precision=0.9)
    assert both["auto_ceiling"] == out["auto_ceiling"]  # the last live version: the right one
    assert both["auto_ceiling_unseen"] < 0.5  # the one live at the last fifth: the wrong one
    assert [f["published"] for f in both["fits"]] == [True, True, True, False]
    res.fits = [short]  # nothing ever went live: no scorer to bound
    none = report(res, data, ts, target_precision=0.9)
    assert none["auto_ceiling"] is None and none["auto_ceiling_unseen"] is None


def test_split_calibration_needs_a_holdout_and_runs_with_one(
    toy: Any, model_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    """Refused before any work without a hold-out (before the file is even read: this one has
    no items); with one, each fit reports its check."""
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    args = ["simulate", "--data", str(path), "--format", "jsonl", "--llm-accuracy", "1.0"]
    args += ["--model-dir", str(model_dir), "--calibration", "split"]
    assert cli_exit(args) not in (0, None)
    assert "--holdout" in capsys.readouterr().err
    ts, data, items, enc = toy
    res = run_loop(
        ts,
        enc,
        items,
        data,
        llm_accuracy=1.0,
        distill_every=60,
        target_precision=0.9,
        batch_size=32,
        holdout=0.2,
        calibration="split",
    )
    fit = res.fits[0].report
    assert fit["calibration"] == "split" and fit["checked_on"] == "heldout"
    assert fit["after"]["auto_precision"] is not None
