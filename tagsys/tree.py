"""Mix into a category's vector the mean of its children's names in a category tree.

A category name such as 人文 or 读书 says little to a small encoder; the names of the
categories directly below it (宗教 and 历史, 文学赏析 and 小说) say what its items are
about. The tree is a tag system imported from a hierarchy (`import-tags tree.csv --format
hierarchy`, where a tag's category is its parent's path), matched to the tags by name. It is
a taxonomy, not item labels: it tells which category sits under which, never which item is
in which. Unlike the bank, nothing is searched: a category's children are given. Measured in
docs/QUALITY.md.
"""

from __future__ import annotations

from dataclasses import replace

from tagsys.bank import check_mixable
from tagsys.errors import TagSystemError
from tagsys.shortlist import unit
from tagsys.tagsystem import Tag, TagSystem
from tagsys.vocab import name_key

TREE_WEIGHT = 0.5  # share of the tag's own vector; the rest is its children's mean


def node_path(tag: Tag) -> str:
    """A node's path in the tree: its category (the parent's path), then its name."""
    return f"{tag.category} > {tag.name}" if tag.category else tag.name


def children(tree: TagSystem) -> dict[str, list[int]]:
    """Each node's path → the indices of the tree's tags directly below it."""
    out: dict[str, list[int]] = {}
    for j, t in enumerate(tree.tags):
        if t.category:
            out.setdefault(t.category, []).append(j)
    return out


def expand_with_tree(ts: TagSystem, tree: TagSystem, *, weight: float = TREE_WEIGHT) -> TagSystem:
    """A new tag system whose tags with children in `tree` (matched by name) have the vector
    `weight` x own + (1 - weight) x their children's mean; other tags are left as they are.
    Refuses a tree that expands no tag: a tree of other names would silently do nothing."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError("weight must be in [0, 1]")
    check_mixable(ts, tree, "tree")
    below = children(tree)
    paths: dict[str, str] = {}
    for t in tree.tags:
        paths.setdefault(name_key(t.name), node_path(t))
    emb = ts.embeddings.copy()
    expanded = 0
    for i, t in enumerate(ts.tags):
        path = paths.get(name_key(t.name))
        kids = below.get(path, []) if path is not None else []
        if kids:
            mean = unit(tree.embeddings[kids].mean(axis=0, keepdims=True))[0]
            emb[i] = weight * emb[i] + (1.0 - weight) * mean
            expanded += 1
    if not expanded:
        raise TagSystemError(
            f"no tag of {ts.version_id} has children in tree {tree.version_id}: the tree's "
            "node names must match the tag names, and a tree is imported with "
            "--format hierarchy (a tag's category is its parent's path)"
        )
    prov = dict(ts.provenance)
    prov["tree"] = {"tree": tree.version_id, "weight": weight, "expanded": expanded}
    return replace(ts, embeddings=unit(emb), provenance=prov)
