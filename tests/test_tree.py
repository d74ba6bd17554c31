"""Category-tree expansion: known answers on toy vectors, refusals, hierarchy columns and the
CLI paths (import-tags, eval)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tagsys import EncoderMismatchError, Tag, TagSystem, TagSystemError
from tagsys.distill import Head
from tagsys.errors import EXIT_CONFIG
from tagsys.tree import children, expand_with_tree, node_path
from tagsys.vocab import read_vocabulary
from tests.conftest import OPAQUE_ROWS, cli_exit, cli_ok, write_labelled_jsonl


def _unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)


def _ts(tags: list[Tag], emb: list[list[float]], encoder: str = "enc") -> TagSystem:
    return TagSystem("t", "1", encoder, tags, _unit(np.asarray(emb, dtype=np.float32)))


def _tree() -> TagSystem:
    # food > (baking > bread, knives), pets; "Baking" under food is matched case-blind
    tags = [
        Tag("food", "food"),
        Tag("baking", "baking", category="food"),
        Tag("bread", "bread", category="food > baking"),
        Tag("knives", "knives", category="food"),
        Tag("pets", "pets"),
    ]
    emb = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]]
    return _ts(tags, emb)


def test_a_tag_moves_towards_the_mean_of_its_direct_children_only() -> None:
    tree = _tree()
    assert node_path(tree.tags[2]) == "food > baking > bread"
    assert children(tree) == {"food": [1, 3], "food > baking": [2]}
    ts = _ts(
        [Tag("f", "food"), Tag("b", "Baking"), Tag("p", "pets"), Tag("x", "other")],
        [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1]],
    )
    out = expand_with_tree(ts, tree, weight=0.6)
    food_kids = _unit(tree.embeddings[[1, 3]].mean(0))  # baking and knives; not bread
    assert np.allclose(
        out.embeddings[0], _unit(0.6 * ts.embeddings[0] + 0.4 * food_kids), atol=1e-6
    )
    bread = tree.embeddings[2]
    assert np.allclose(out.embeddings[1], _unit(0.6 * ts.embeddings[1] + 0.4 * bread), atol=1e-6)
    # a leaf of the tree, and a tag the tree does not know, keep their vectors
    assert np.allclose(out.embeddings[2:], ts.embeddings[2:])
    assert out.provenance["tree"] == {"tree": tree.version_id, "weight": 0.6, "expanded": 2}
    assert out.content_hash != ts.content_hash
    assert np.allclose(expand_with_tree(ts, tree, weight=1.0).embeddings, ts.embeddings)


def test_refuses_another_encoder_a_head_a_tree_that_changes_nothing_and_bad_weights() -> None:
    tree = _tree()
    ts = _ts([Tag("f", "food")], [[0, 0, 1, 0]])
    with pytest.raises(EncoderMismatchError, match="import the tree with --model enc"):
        expand_with_tree(ts, replace(tree, encoder="other"))
    head = Head(np.ones((1, 4), np.float32), np.zeros(1, np.float32), "softmax")
    with pytest.raises(TagSystemError, match="distilled head"):
        expand_with_tree(replace(ts, head=head), tree)
    with pytest.raises(TagSystemError, match=r"no tag of .* has children"):
        expand_with_tree(_ts([Tag("p", "pets"), Tag("z", "zebra")], [[1, 0, 0, 0]] * 2), tree)
    with pytest.raises(ValueError):
        expand_with_tree(ts, tree, weight=-0.1)


def test_hierarchy_columns_kuairec_detected_and_a_path_stops_at_an_unknown_level(
    tmp_path: Path,
) -> None:
    f = tmp_path / "k.csv"
    f.write_text(
        "video_id,caption,first_level_category_name,second_level_category_name,"
        "third_level_category_name\n"
        '1,"a caption, with a comma",美食,家常菜,川菜\n'
        "2,x,美食,UNKNOWN,烘焙\n"
        "3,y,UNKNOWN,UNKNOWN,UNKNOWN\n"
    )
    v = read_vocabulary(f, "hierarchy")
    assert {t.name: t.category for t in v.tags} == {
        "美食": None,
        "家常菜": "美食",
        "川菜": "美食 > 家常菜",
    }  # 烘焙 has no known parent: not hung under 美食; no caption became a node
    assert v.problems == ["line 3: 烘焙 below an unknown level, left out", "line 4: empty row"]
    # explicit columns, and a clear error for a missing one
    g = tmp_path / "g.csv"
    g.write_text("id,top,sub\n1,a,b\n")
    from tagsys.vocab import read_hierarchy

    assert {t.name: t.category for t in read_hierarchy(g, ("top", "sub")).tags} == {
        "a": None,
        "b": "a",
    }
    with pytest.raises(TagSystemError, match="no column 'leaf'"):
        read_hierarchy(g, ("top", "leaf"))
    with pytest.raises(TagSystemError, match="not from format 'list'"):
        read_vocabulary(g, "list", columns=("top",))


def test_tree_in_import_tags_and_eval(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Categories with opaque names gain what their children's names say; zero-shot ranking of
    toy items improves, and import-tags records the tree."""
    data = write_labelled_jsonl(tmp_path / "toy.jsonl", OPAQUE_ROWS)
    tree_csv = tmp_path / "tree.csv"
    tree_csv.write_text(  # with a column that is not part of the path
        "note,top,sub\nx,zorvex,bread baking\nx,zorvex,sourdough loaf\nx,quillon,kitchen knives\n"
        "x,quillon,blade sharpening\nx,plimsa,food safety\nx,plimsa,bacteria and spoilage\n"
    )
    base = ["--model-dir", str(model_dir)]  # jsonl data and import-tags default to MiniLM
    tree = tmp_path / "tree"
    hier = ["--format", "hierarchy", "--columns", "top, sub"]
    cli_ok("import-tags", str(tree_csv), *hier, "--out", str(tree), *base)
    assert {t.name: t.category for t in TagSystem.load(tree).tags}["bread baking"] == "zorvex"

    def r1(*extra: str) -> float:
        cli_ok("eval", "--data", str(data), "--format", "jsonl", "--json", *base, *extra)
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return float(out["recall_at_1"])

    plain = r1()
    expanded = r1("--tree", str(tree))
    assert expanded > plain, (plain, expanded)
    assert expanded == 1.0

    cal = tmp_path / "cal"
    cli_ok(
        "calibrate",
        "--data",
        str(data),
        "--format",
        "jsonl",
        "--tree",
        str(tree),
        "--out",
        str(cal),
        *base,
    )
    assert TagSystem.load(cal).provenance["tree"]["expanded"] == 3
    capsys.readouterr()

    names = tmp_path / "names.txt"
    names.write_text("zorvex\nquillon\nplimsa\n")
    out = tmp_path / "ts"
    cli_ok(
        "import-tags",
        str(names),
        "--format",
        "list",
        "--out",
        str(out),
        "--tree",
        str(tree),
        "--tree-weight",
        "0.4",
        *base,
    )
    ts = TagSystem.load(out)
    assert ts.provenance["tree"] == {
        "tree": TagSystem.load(tree).version_id,
        "weight": 0.4,
        "expanded": 3,
    }
    # a tree that names none of the tags is refused with a clear error, exit 3 (configuration)
    other = tmp_path / "other.csv"
    other.write_text("top,sub\nanimals,cats\n")
    cli_ok("import-tags", str(other), "--format", "hierarchy", "--out", str(tmp_path / "o"), *base)
    capsys.readouterr()
    assert (
        cli_exit(
            ["eval", "--data", str(data), "--format", "jsonl", "--tree", str(tmp_path / "o"), *base]
        )
        == EXIT_CONFIG
    )
    said = " ".join(capsys.readouterr().err.split())
    assert "has children in tree" in said
