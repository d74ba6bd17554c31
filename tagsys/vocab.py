"""Vocabulary importers: our JSON, TagGPT's `tag||['alias', ...]`, a plain list, a hierarchy CSV.

Every reader returns tags plus a list of problems (line number and why) instead of failing
on the first odd line: TagGPT's 40k-line file has repeated aliases and the odd quote.
"""

from __future__ import annotations

import ast
import csv
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tagsys.errors import TagSystemError
from tagsys.gate import GateConfig
from tagsys.tagsystem import Tag

VOCAB_FORMATS = ("json", "taggpt", "list", "hierarchy")


@dataclass
class Vocabulary:
    tags: list[Tag]
    name: str = "imported"
    version: str = "1"
    gate: GateConfig | None = None
    problems: list[str] = field(default_factory=list)


def name_key(s: str) -> str:
    """How two tag names are told apart: NFKC, trimmed, case-blind."""
    return unicodedata.normalize("NFKC", s).strip().casefold()


def _merge(tags: list[Tag], problems: list[str]) -> list[Tag]:
    """One tag per normalised name; duplicates give their aliases to the first."""
    by_key: dict[str, int] = {}
    out: list[Tag] = []
    for t in tags:
        k = name_key(t.name)
        if not k:
            continue
        if k in by_key:
            first = out[by_key[k]]
            aliases = tuple(dict.fromkeys((*first.aliases, *t.aliases)))
            out[by_key[k]] = Tag(first.id, first.name, aliases, first.category, first.description)
            problems.append(f"duplicate tag {t.name!r} merged into {first.name!r}")
            continue
        by_key[k] = len(out)
        out.append(t)
    return out


def _clean_aliases(name: str, aliases: list[Any]) -> tuple[str, ...]:
    seen = {name_key(name)}
    out = []
    for a in aliases:
        a = str(a).strip().strip("“”\"'#")
        if a and name_key(a) not in seen:
            seen.add(name_key(a))
            out.append(a)
    return tuple(out)


def read_taggpt(path: Path) -> Vocabulary:
    """TagGPT's final_tags.csv: `tag||['alias', ...]` per line, no header."""
    tags: list[Tag] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            name, sep, rest = line.partition("||")
            name = name.strip()
            aliases: list[Any] = []
            if sep and rest.strip():
                try:
                    parsed = ast.literal_eval(rest.strip())
                    aliases = list(parsed) if isinstance(parsed, list | tuple) else []
                except (ValueError, SyntaxError):
                    problems.append(f"line {n}: alias list unreadable, tag kept without aliases")
            if not name:
                problems.append(f"line {n}: no tag name")
                continue
            tags.append(Tag(id=name, name=name, aliases=_clean_aliases(name, aliases)))
    return Vocabulary(_merge(tags, problems), name=path.stem, problems=problems)


def read_list(path: Path) -> Vocabulary:
    """One tag per line; `#` starts a comment."""
    problems: list[str] = []
    tags = [
        Tag(id=s, name=s)
        for line in path.read_text(encoding="utf-8").splitlines()
        if (s := line.split("#", 1)[0].strip())
        if not line.lstrip().startswith("#")
    ]
    return Vocabulary(_merge(tags, problems), name=path.stem, problems=problems)


# KuaiRec's category columns, top level first: its data file is its own category tree
KUAIREC_TREE = (
    "first_level_category_name",
    "second_level_category_name",
    "third_level_category_name",
)


def read_hierarchy(path: Path, columns: tuple[str, ...] | None = None) -> Vocabulary:
    """CSV with a header, one path per row from the top level down (e.g. KuaiRec's
    level1,level2,level3). Every node becomes a tag whose category is its parent path.
    `columns` names the path's columns when the file has others; a KuaiRec data file is
    read by its category-name columns without being told."""
    tags: list[Tag] = []
    problems: list[str] = []
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header:
            raise TagSystemError(f"{path}: empty hierarchy file")
        header = [h.strip() for h in header]
        if columns is None and set(KUAIREC_TREE) <= set(header):
            columns = KUAIREC_TREE
        if columns is not None:
            missing = [c for c in columns if c not in header]
            if missing:
                raise TagSystemError(
                    f"{path}: no column {', '.join(map(repr, missing))} "
                    f"(the header has {', '.join(header)})"
                )
        pick = [header.index(c) for c in columns] if columns is not None else None
        for n, row in enumerate(rows, 2):
            cells = (
                [c.strip() for c in row]
                if pick is None
                else [row[i].strip() if i < len(row) else "" for i in pick]
            )
            # a path stops at its first unknown level: what sits below has no known parent
            unknown = [not c or c == "UNKNOWN" for c in cells]
            parts = cells[: unknown.index(True)] if True in unknown else cells
            lost = [c for c in cells[len(parts) :] if c and c != "UNKNOWN"]
            if lost:
                problems.append(f"line {n}: {', '.join(lost)} below an unknown level, left out")
            if not parts:
                problems.append(f"line {n}: empty row")
                continue
            for depth, node in enumerate(parts):
                parent = " > ".join(parts[:depth]) or None
                tags.append(Tag(id=node, name=node, category=parent))
    merged = _merge(tags, [])  # a node repeats on every row below it: not a problem
    return Vocabulary(merged, name=path.stem, problems=problems)


def read_json(path: Path) -> Vocabulary:
    """{name, version, gate?, tags: [{id?, name, aliases?, category?, description?}]}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tags = [Tag.from_dict(t) for t in data["tags"]]
        # a new tag system: stem matching on unless the file says otherwise (from_dict's
        # default is off, for artifacts written before it existed)
        gate = (
            GateConfig.from_dict({"lexical_stems": True} | data["gate"])
            if data.get("gate")
            else None
        )
        return Vocabulary(tags, str(data["name"]), str(data["version"]), gate)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TagSystemError(f"cannot read vocabulary {path}: {e}") from e


def read_vocabulary(path: Path, fmt: str, *, columns: tuple[str, ...] | None = None) -> Vocabulary:
    """`columns`: a hierarchy's path columns, top level first (other formats refuse them)."""
    if not path.is_file():
        raise TagSystemError(f"no such vocabulary file: {path}")
    readers = {
        "json": read_json,
        "taggpt": read_taggpt,
        "list": read_list,
        "hierarchy": read_hierarchy,
    }
    if fmt not in readers:
        raise TagSystemError(f"unknown vocabulary format {fmt!r}; one of {VOCAB_FORMATS}")
    if columns is not None and fmt != "hierarchy":
        raise TagSystemError(f"columns are read from a hierarchy CSV, not from format {fmt!r}")
    vocab = read_hierarchy(path, columns) if fmt == "hierarchy" else readers[fmt](path)
    if not vocab.tags:
        raise TagSystemError(f"{path}: no tags found (format {fmt})")
    return vocab
