"""Metrics, calibration, readers and the lexicon on toy data with known answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagsys import GateConfig, decide
from tagsys.datasets import DatasetError, load, strip_hashtags
from tagsys.errors import EXIT_CONFIG
from tagsys.evaluation import Outcome, auto_ceiling, calibrate, compute
from tagsys.lexicon import Lexicon
from tests.conftest import write_labelled_jsonl


def _o(gold: set[int], ranked: list[int], auto: bool, final: list[int]) -> Outcome:
    return Outcome(frozenset(gold), ranked, auto, not auto, final)


def test_metrics_known_answers() -> None:
    outs = [
        _o({0}, [0, 1, 2], True, [0]),  # auto, right
        _o({1, 2}, [3, 1, 4, 5, 6, 2], False, [3, 1]),  # llm: one right, one wrong
        _o({4}, [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 4], True, [0]),  # auto, wrong; gold at 11
    ]
    m = compute(outs, n_tags=12)
    assert m["items"] == 3 and m["tags"] == 12
    # gold tags: 4 in all. @1: item0 -> 1 hit. @5: +item1's tag 1 -> 2. @10: +item1's tag 2
    # (6th) -> 3. @20: +item2's tag 4 (11th) -> 4
    assert m["recall_at_1"] == pytest.approx(1 / 4)
    assert m["recall_at_5"] == pytest.approx(2 / 4)
    assert m["recall_at_10"] == pytest.approx(3 / 4)
    assert m["recall_at_20"] == pytest.approx(4 / 4)
    assert m["auto_fraction"] == pytest.approx(2 / 3)
    assert m["auto_precision"] == pytest.approx(1 / 2)
    assert m["llm_fraction"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(0.5)
    # per tag: 0 P=1/2 R=1; 1 P=1 R=1; 2 P=0 R=0; 3 P=0 R=0(no gold); 4 P=0 R=0
    assert m["macro_precision"] == pytest.approx((0.5 + 1) / 5)
    assert m["macro_recall"] == pytest.approx((1 + 1) / 5)


def test_metrics_without_auto_items_say_none() -> None:
    m = compute([_o({0}, [1, 0], False, [])], n_tags=2)
    assert m["auto_precision"] is None
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0


def test_calibration_finds_the_precise_region_and_agrees_with_decide() -> None:
    rng = np.random.default_rng(0)
    n, k = 400, 5
    idx = np.tile(np.arange(k), (n, 1)).astype(np.int64)
    top = rng.uniform(0.3, 0.9, n).astype(np.float32)
    scores = np.stack([top - 0.05 * j for j in range(k)], 1).astype(np.float32)
    # the top tag is right exactly when its score is above 0.7
    gold = [frozenset({0}) if t > 0.7 else frozenset({4}) for t in top]
    tag_ids = [f"t{j}" for j in range(k)]
    cal = calibrate(idx, scores, gold, tag_ids, GateConfig(top_k=k), target_precision=0.9)
    assert cal.reached
    assert cal.gate.max_tags == 1
    assert 0.6 < cal.gate.accept_threshold <= 0.72
    assert cal.auto_precision is not None and cal.auto_precision >= 0.9
    # the stored gate, run through the service's own decide(), gives the same split
    autos = [
        decide(idx[i], scores[i], tag_ids, cal.gate).decision_hint.value == "encoder"
        for i in range(n)
    ]
    assert np.mean(autos) == pytest.approx(cal.auto_fraction)
    assert np.mean(autos) == pytest.approx((top >= cal.gate.accept_threshold).mean())


def test_calibration_says_when_the_target_is_out_of_reach() -> None:
    idx = np.tile(np.arange(3), (50, 1)).astype(np.int64)
    scores = np.tile(np.array([0.9, 0.5, 0.1], dtype=np.float32), (50, 1))
    gold = [frozenset({2})] * 50  # never the top tag
    cal = calibrate(idx, scores, gold, ["a", "b", "c"], GateConfig(top_k=3))
    assert not cal.reached


def _ranked(gold: set[int], ranked: list[int]) -> Outcome:
    return Outcome(frozenset(gold), ranked, False, True, [])


def test_auto_ceiling_known_answers() -> None:
    # single label: 6 of 10 top tags right. At 0.9 the oracle takes the 6 (a wrong one would
    # bring 6/7 = 0.857); at 0.5 it can add 6 wrong ones, so all 10 fit (6/10 >= 0.5)
    outs = [_ranked({0}, [0, 1, 2])] * 6 + [_ranked({2}, [1, 0, 3, 2])] * 4  # gold below the top 3
    assert auto_ceiling(outs, 0.9) == pytest.approx(0.6)
    assert auto_ceiling(outs, 0.5) == pytest.approx(1.0)
    assert auto_ceiling(outs, 0.6) == pytest.approx(1.0)  # exactly 6 of 10 tags right
    assert auto_ceiling(outs, 0.61) == pytest.approx(0.9)  # 6 of 9
    # multi label: a wrong top tag with two right ones below it: 2 of 3 emitted are right
    multi = [_ranked({1, 2}, [0, 1, 2])]
    assert auto_ceiling(multi, 0.6) == pytest.approx(1.0)
    assert auto_ceiling(multi, 0.7) == 0.0
    assert auto_ceiling(multi, 0.6, max_tags=2) == 0.0  # 1 of 2 at best
    # nothing ranked is never auto-accepted; no items, no figure
    assert auto_ceiling([_ranked({0}, [0]), _ranked({0}, [])], 0.9) == pytest.approx(0.5)
    assert auto_ceiling([], 0.9) is None


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(5, 60),
    target=st.sampled_from([0.6, 0.8, 0.9]),
    multi=st.booleans(),
)
def test_no_calibrated_gate_beats_the_ceiling(
    seed: int, n: int, target: float, multi: bool
) -> None:
    """The ceiling bounds every gate `calibrate` can fit on the same items."""
    rng = np.random.default_rng(seed)
    k = 5
    scores = -np.sort(-rng.uniform(0, 1, (n, k)), axis=1).astype(np.float32)
    idx = np.stack([rng.permutation(k) for _ in range(n)]).astype(np.int64)
    gold = [
        frozenset(
            rng.choice(k, size=int(rng.integers(1, 3)) if multi else 1, replace=False).tolist()
        )
        for _ in range(n)
    ]
    cal = calibrate(
        idx,
        scores,
        gold,
        [f"t{j}" for j in range(k)],
        GateConfig(top_k=k),
        target_precision=target,
        min_support=3,
    )
    outs = [_ranked(set(g), idx[i].tolist()) for i, g in enumerate(gold)]
    ceiling = auto_ceiling(outs, target)
    assert ceiling is not None
    if cal.reached and cal.auto_precision is not None and cal.auto_precision >= target:
        assert cal.auto_fraction <= ceiling + 1e-9


def test_lexicon_matches_words_plurals_and_chinese() -> None:
    lex = Lexicon([["pretzel"], ["food-safety", "food safety"], ["美食"], ["手工DIY"], ["a"]])
    assert lex.match("Pretzels: how to keep them soft?") == {0}
    assert lex.match("Is this a FOOD SAFETY issue?") == {1}
    assert lex.match("今天做美食啦") == {2}
    assert lex.match("周末手工diy小物件") == {3}
    assert lex.match("pretzelling is not a word") == set()  # whole words only
    assert 4 not in lex.match("a b c")  # one-letter terms are ignored


def test_lexicon_matches_by_stems_only_when_asked() -> None:
    terms = [["substitutions"], ["frying"], ["food-safety"], ["storage method"], ["美食"]]
    plain, stems = Lexicon(terms), Lexicon(terms, stem=True)
    text = "Can I substitute butter when the fried food is safe? Storing methods; 美食"
    assert plain.match(text) == {4}
    assert stems.match(text) == {0, 1, 4}  # not 2: "food is safe" is no "food safety"
    assert stems.match("Storage methods for rice") == {3}  # multi-word stems
    assert stems.match("substitution") == {0} and plain.match("substitution") == {0}  # plural
    assert stems.lookup("Fried") == [1] and plain.lookup("Fried") == []
    assert stems.match("substantial frosting") == set()  # different stems, no match


def test_stems_are_right_under_threads() -> None:
    """One Snowball stemmer shared by threads corrupts stems and can raise IndexError (seen
    with 8 threads here); the LLM workers' `lookup` runs beside the batch loop's `match`."""
    import random
    import sys
    import threading

    import snowballstemmer

    from tagsys import lexicon

    rng = random.Random(0)
    ends = ["ing", "ed", "s", "ation", "ness", "ly", "ies"]
    words = [
        "".join(rng.choice("abcdefghilmnoprstuy") for _ in range(rng.randint(4, 14)))
        + rng.choice(ends)
        for _ in range(20_000)
    ]
    ref = snowballstemmer.stemmer("english")
    want = {w: ref.stemWord(w) for w in words}
    lexicon._stem.cache_clear()
    wrong: list[str] = []
    errors: list[BaseException] = []

    def work(part: list[str]) -> None:
        try:
            wrong.extend(w for w in part if lexicon._stem(w) != want[w])
        except BaseException as e:  # the race shows as an IndexError inside snowballstemmer
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work, args=(words[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
        lexicon._stem.cache_clear()
    assert not errors and not wrong


def test_readers(tmp_path: Path) -> None:
    k = tmp_path / "k.csv"
    k.write_text(
        "video_id,manual_cover_text,caption,topic_tag,first_level_category_id,"
        "first_level_category_name,second_level_category_id,second_level_category_name,"
        "third_level_category_id,third_level_category_name\n"
        "1,封面,标题 #美食,[美食],1,美食,2,家常菜,-124,UNKNOWN\n"
        "2,UNKNOWN,,[],1,美食,2,家常菜,-124,UNKNOWN\n"
        "3,封面,标题,[],-124,UNKNOWN,-124,UNKNOWN,-124,UNKNOWN\n",
        encoding="utf-8",
    )
    ds = load(k, "kuairec", level=2)
    assert [it.gold for it in ds.items] == [("家常菜",)]
    assert ds.items[0].fields == {"cover_text": "封面", "caption": "标题 #美食"}
    assert ds.skipped == {"no_text": 1, "no_label": 1}
    assert load(k, "kuairec", level=3).skipped["no_label"] == 2
    s = tmp_path / "s.csv"
    s.write_text('title,content,tags\nBuns,"soft, crust","baking, crust"\nNo tags,x,\n')
    ds = load(s, "stackexchange")
    assert ds.items[0].gold == ("baking", "crust") and ds.skipped == {"no_label": 1}
    j = tmp_path / "e.jsonl"
    j.write_text(
        json.dumps({"id": "a", "title": "t", "labels": ["x", "y"]})
        + "\nnot json\n"
        + json.dumps({"id": "b", "labels": ["x"]})
        + "\n"
    )
    ds = load(j, "jsonl")
    assert ds.labels == ["x", "y"] and ds.skipped == {"bad_json": 1, "no_text": 1}
    with pytest.raises(DatasetError, match="not a StackExchange"):
        load(k, "stackexchange")
    assert strip_hashtags("好吃 #美食 #家常菜") == "好吃"


def test_eval_and_calibrate_cli_on_toy_data(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from consumer.cli import main
    from tagsys import TagSystem

    rows = [
        ("Sourdough starter feeding schedule", ["bread"]),
        ("Why did my baguette not rise", ["bread"]),
        ("Knife sharpening with a whetstone", ["knives"]),
        ("Which chef knife steel is best", ["knives"]),
        ("Is chicken left out overnight safe", ["food safety"]),
        ("How long can cooked rice sit out", ["food safety"]),
    ] * 3
    data = write_labelled_jsonl(tmp_path / "toy.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "eval",
                "--data",
                str(data),
                "--format",
                "jsonl",
                "--model-dir",
                str(model_dir),
                "--json",
            ]
        )
    assert e.value.code in (0, None)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
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
    ):
        assert key in out
    assert out["items"] == 18 and out["tags"] == 3
    assert out["recall_at_5"] == 1.0  # 3 tags: every gold tag is in any top 5
    assert out["auto_fraction"] + out["llm_fraction"] == pytest.approx(1.0)
    cal_dir = tmp_path / "cal"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "calibrate",
                "--data",
                str(data),
                "--format",
                "jsonl",
                "--out",
                str(cal_dir),
                "--model-dir",
                str(model_dir),
                "--target-precision",
                "0.8",
                "--json",
            ]
        )
    assert e.value.code in (0, None)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ts = TagSystem.load(cal_dir)
    assert ts.provenance["calibrated"]["target_precision"] == 0.8
    assert res["tag_system"] == ts.version_id
    assert res["trusted"] is ts.gate_fitted is res["reached"]  # as the service will treat it
    ceiling, after = res["held_out_auto_ceiling"], res["held_out_after"]
    assert ceiling is not None and 0.0 <= ceiling <= 1.0
    if after["auto_precision"] is not None and after["auto_precision"] >= 0.8:
        assert after["auto_fraction"] <= ceiling + 1e-9
    # the calibrated system evaluates with --tag-system (its encoder is recorded in it)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "eval",
                "--data",
                str(data),
                "--format",
                "jsonl",
                "--tag-system",
                str(cal_dir),
                "--model-dir",
                str(model_dir),
                "--json",
            ]
        )
    assert e.value.code in (0, None)
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["tag_system"] == ts.version_id
    # a tag template shapes the zero-shot tags (and is recorded); an embedded system refuses it
    base = ["--data", str(data), "--format", "jsonl", "--model-dir", str(model_dir), "--json"]
    with pytest.raises(SystemExit) as e:
        main(["eval", *base, "--tag-template", "{name} (cooking)"])
    assert e.value.code in (0, None)
    templated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert templated["items"] == 18 and templated["tag_system"] != out["tag_system"]
    with pytest.raises(SystemExit) as e:
        main(["eval", *base, "--tag-system", str(cal_dir), "--tag-template", "{name} (x)"])
    assert e.value.code == EXIT_CONFIG
    assert "embedded already" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", *base, "--tag-template", "cooking"])
    assert e.value.code == EXIT_CONFIG
    assert "exactly once" in capsys.readouterr().err


def test_eval_with_an_llm_takes_its_choices(tmp_path: Path, model_dir: Path, fake_llm: Any) -> None:
    """Items the gate routes to the LLM end with the LLM's pick from their shortlist."""
    from tests.conftest import completion

    def respond(body: dict[str, Any]) -> Any:
        enum = body["response_format"]["json_schema"]["schema"]["properties"]["tags"]["items"]
        gold = "bread" if "dense" in body["messages"][-1]["content"].lower() else "knives"
        return 200, completion(json.dumps({"tags": [gold] if gold in enum["enum"] else []}))

    server = fake_llm(respond)
    rows = [
        ("Why is my bread dense", ["bread"]),
        ("Dense crumb in my sourdough loaf", ["bread"]),
        ("My dense rye came out gummy", ["bread"]),
        ("Bread dense after a cold proof", ["bread"]),
        ("Sharpen knives at home", ["knives"]),
        ("Which whetstone grit for a chef knife", ["knives"]),
        ("Honing steel or sharpening stone", ["knives"]),
        ("Keeping a carbon steel blade from rusting", ["knives"]),
    ]
    data = write_labelled_jsonl(tmp_path / "toy.jsonl", rows)
    from consumer.tools.evaluate import run_eval

    run = run_eval(data, "jsonl", model_dir=model_dir, llm=server.base_url)
    routed = [o for o in run.outcomes if o.routed_llm]
    assert routed and len(server.requests) == len(routed)
    for o in routed:  # exactly the LLM's single pick, which is the gold tag
        assert list(o.final) == sorted(o.gold)


def test_embedding_cache_skips_the_encoder_on_the_same_texts(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumer.tagging.core import TaggingCore
    from consumer.tools.evaluate import report, run_eval

    rows = [
        ("Sourdough starter smells like acetone", ["bread"]),
        ("Proofing dough overnight in the fridge", ["bread"]),
        ("Searing a steak in cast iron", ["meat"]),
        ("Resting brisket after smoking", ["meat"]),
    ]
    data = write_labelled_jsonl(tmp_path / "toy.jsonl", rows)
    cache = tmp_path / "cache"
    first = report(run_eval(data, "jsonl", model_dir=model_dir, embedding_cache=cache))
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("all-MiniLM-L6-v2-")

    def no_encoder(*_a: object, **_k: object) -> None:
        raise AssertionError("the encoder ran although the vectors were cached")

    monkeypatch.setattr(TaggingCore, "embed", no_encoder)
    again = report(run_eval(data, "jsonl", model_dir=model_dir, embedding_cache=cache))
    assert {k: v for k, v in again.items() if k != "tag_system"} == {
        k: v for k, v in first.items() if k != "tag_system"
    }
    monkeypatch.undo()
    # another text is another key: embedded afresh, not read from the first file
    rows[0] = ("Sourdough starter smells like nail polish", ["bread"])
    write_labelled_jsonl(data, rows)
    run_eval(data, "jsonl", model_dir=model_dir, embedding_cache=cache)
    assert len(list(cache.glob("*.npy"))) == 2
