"""`tagstream build-tags`: a tag system from a corpus, with an LLM (TagGPT step 1, hardened).

Every (item, sample) proposal is appended to `<work>/proposals.jsonl` as soon as it comes
back, so an interrupted run resumes where it stopped. Failed calls are retried in a second
pass; what still fails is reported by item id (never silently dropped as in TagGPT), and
a rerun with the same --work folder asks again for exactly those.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from consumer.tagging.events import event_text, unmark_hashtags
from consumer.tagging.handbook import Handbook
from consumer.tagging.llm import LLMAnswer, SelectiveTagger
from consumer.tools.describe import PROMPT_VERSIONS, Describer
from consumer.tools.evaluate import to_event
from models_onnx import OnnxEncoder
from models_onnx.registry import spec_for
from tagsys import (
    DEFAULT_TEMPLATE,
    GateConfig,
    Tag,
    TagSystem,
    TagSystemError,
    embed_tags,
    template_provenance,
)
from tagsys.build import (
    Candidate,
    count,
    merge_synonyms,
    nearest_category,
    normalise_tag,
    to_tags,
)
from tagsys.datasets import Item, load
from tagsys.lexicon import Lexicon
from tagsys.vocab import read_vocabulary

Progress = Callable[[str, int, int], None]
PROPOSALS = "proposals.jsonl"


class Proposer(Protocol):
    """What proposes free tags: `SelectiveTagger` (chat + JSON schema) or
    `consumer.tools.propose.FewShotProposer` (a base model's completions)."""

    model: str
    prompt_version: str

    def propose(
        self, item: dict[str, Any], max_tags: int = 5, temperature: float = 0.7
    ) -> LLMAnswer: ...


class GuidedProposer:
    """A chat proposer whose system message carries the handbook's section for each item's
    category: the item's `content_type` where the handbook has that section, else the
    `category` given for the whole corpus. Its prompt version names the handbook's version,
    so the proposal log never mixes proposals made under another handbook (or none)."""

    def __init__(self, inner: SelectiveTagger, handbook: Handbook, category: str | None) -> None:
        if category is not None and handbook.section(category) is None:
            raise TagSystemError(
                f"the handbook {handbook.version_id} has no category {category!r} "
                f"(it has: {', '.join(sorted(handbook.categories))})"
            )
        self.inner = inner
        self.handbook = handbook
        self.category = category
        self.model = inner.model
        self.prompt_version = f"{inner.prompt_version}+{handbook.version_id}"

    def guidance(self, item: dict[str, Any]) -> str | None:
        return self.handbook.section(item.get("content_type")) or self.handbook.section(
            self.category
        )

    def propose(
        self, item: dict[str, Any], max_tags: int = 5, temperature: float = 0.7
    ) -> LLMAnswer:
        """`item`'s content_type picks the section; the LLM sees the item without it."""
        shown = {k: v for k, v in item.items() if k != "content_type"}
        return self.inner.propose(shown, max_tags, temperature, guidance=self.guidance(item))


@dataclass
class BuildReport:
    items: int = 0
    calls: int = 0
    cached: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # item id -> last error
    candidates: int = 0
    kept: int = 0
    tags: int = 0
    categorized: int = 0
    described: int = 0
    stale: int = 0  # cached proposals of another model or prompt: not used
    unreadable: int = 0  # kept tags the encoder cannot read (unknown tokens): never merged
    guided: int | None = None  # items whose proposals a handbook section guided (with one)
    gold_labels: int | None = None  # distinct gold labels of the items, when the data has any
    gold_recovered: int | None = None  # of them, named by a built tag (name or alias)
    gold_coverage: float | None = None  # share of the items' gold label occurrences

    def to_dict(self) -> dict[str, Any]:
        gold = (
            {
                "gold_labels": self.gold_labels,
                "gold_recovered": self.gold_recovered,
                "gold_coverage": self.gold_coverage,
            }
            if self.gold_labels is not None
            else {}
        )
        return {
            "items": self.items,
            "llm_calls": self.calls,
            "from_cache": self.cached,
            "failed_items": len(self.failed),
            "candidates": self.candidates,
            "above_floor": self.kept,
            "tags": self.tags,
            "categorized": self.categorized,
            "described": self.described,
            **({"stale_cache": self.stale} if self.stale else {}),
            **({"unreadable": self.unreadable} if self.unreadable else {}),
            **({"handbook_guided": self.guided} if self.guided is not None else {}),
            **gold,
        }


def _load_cache(
    path: Path, model: str, prompt: str
) -> tuple[dict[tuple[str, int], list[str]], int]:
    """Proposals already made by this model with this prompt, and how many others the log
    holds (a rerun with another --llm-model or --prompt must not mix the two)."""
    done: dict[tuple[str, int], list[str]] = {}
    stale = 0
    if not path.is_file():
        return done, stale
    for line in path.read_bytes().splitlines():
        try:
            rec = orjson.loads(line)
            key = (str(rec["id"]), int(rec["sample"]))
            tags = [str(t) for t in rec["tags"]]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut by a crash: that proposal is asked again
        if rec.get("model", model) != model or rec.get("prompt", prompt) != prompt:
            stale += 1
            continue
        done[key] = tags
    return done, stale


# not text the LLM proposes tags from (images go to the image model, not into the prompt;
# content_type only picks a handbook section), so the proposal log's inputs stay the same
NOT_PROMPTED = ("cover_url", "frame_urls", "cover_b64", "content_type")


def _fields(item: Item, max_chars: int = 1500, *, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        k: (v[:max_chars] if isinstance(v, str) else v)
        for k, v in item.fields.items()
        if v and (k not in NOT_PROMPTED or k in keep)
    }


def collect_proposals(
    items: list[Item],
    tagger: Proposer,
    work: Path,
    *,
    samples: int,
    max_tags: int,
    concurrency: int,
    report: BuildReport,
    progress: Progress | None = None,
) -> dict[str, list[str]]:
    """Every item's proposals over all samples (resumable, retried, failures reported)."""
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / PROPOSALS
    done, report.stale = _load_cache(cache_path, tagger.model, tagger.prompt_version)
    by_id = {it.id: it for it in items}
    jobs = [(it.id, s) for it in items for s in range(samples) if (it.id, s) not in done]
    report.cached = sum(1 for it in items for s in range(samples) if (it.id, s) in done)
    lock = threading.Lock()
    temperature = 0.7 if samples > 1 else 0.0
    total = len(jobs)
    finished = 0
    with cache_path.open("ab") as cache:
        for attempt in range(2):  # a second pass for the calls that failed
            failed: list[tuple[str, int]] = []
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                keep = ("content_type",) if isinstance(tagger, GuidedProposer) else ()
                futs = {
                    pool.submit(
                        tagger.propose, _fields(by_id[i], keep=keep), max_tags, temperature
                    ): (i, s)
                    for i, s in jobs
                }
                for fut in as_completed(futs):
                    i, s = futs[fut]
                    ans = fut.result()
                    report.calls += 1
                    if ans.status == "ok":
                        rec = {
                            "id": i,
                            "sample": s,
                            "tags": ans.tags,
                            "prompt": tagger.prompt_version,
                            "model": tagger.model,
                        }
                        with lock:
                            cache.write(orjson.dumps(rec) + b"\n")
                            cache.flush()
                            done[(i, s)] = ans.tags
                            report.failed.pop(i, None)
                        finished += 1
                    else:
                        failed.append((i, s))
                        report.failed[i] = f"{ans.status}: {ans.error or ''}".strip()
                    if progress:
                        progress("asking the LLM", finished, total)
            jobs = failed
            if not jobs or attempt == 1:
                break
    for i, _ in jobs:
        if not any((i, s) in done for s in range(samples)):
            continue
        report.failed.pop(i, None)  # at least one sample answered: the item is covered
    out: dict[str, list[str]] = {}
    for (i, _s), tags in done.items():
        if i in by_id:
            out.setdefault(i, []).extend(tags)
    return out


def build_tags(
    data: Path,
    fmt: str,
    out: Path,
    tagger: SelectiveTagger,
    encoder: OnnxEncoder,
    *,
    work: Path,
    samples: int = 3,
    max_tags: int = 5,
    concurrency: int = 4,
    limit: int | None = None,
    min_items: int = 2,
    merge_threshold: float | None = None,
    hierarchy: Path | None = None,
    llm_categories: bool = False,
    describe: bool = False,
    name: str = "built",
    version: str = "1",
    tag_template: str = DEFAULT_TEMPLATE,
    progress: Progress | None = None,
    proposer: Proposer | None = None,
    describer: Describer | None = None,
    level: int = 1,
) -> tuple[TagSystem, BuildReport]:
    """`proposer` (default: `tagger`, chat) proposes the free tags; `tagger` categorises and
    describes. `describer` (a base model's sampled descriptions or example posts) replaces the
    tagger's one-line description when given. `level`: the KuaiRec category level the gold
    check reads."""
    ds = load(data, fmt, level=level, limit=limit, require_labels=False)
    report = BuildReport(items=len(ds.items))
    if not ds.items:
        raise TagSystemError(f"{data}: no items with text ({dict(ds.skipped)})")
    proposer = proposer or tagger
    if isinstance(proposer, GuidedProposer):
        guided = [proposer.guidance(_fields(it, keep=("content_type",))) for it in ds.items]
        report.guided = sum(g is not None for g in guided)
    proposals = collect_proposals(
        ds.items,
        proposer,
        work,
        samples=samples,
        max_tags=max_tags,
        concurrency=concurrency,
        report=report,
        progress=progress,
    )
    cands = count(proposals.values())
    report.candidates = len(cands)
    cands = [c for c in cands if c.items >= min_items]
    report.kept = len(cands)
    if not cands:
        raise TagSystemError(
            f"no proposed tag reached {min_items} items ({report.candidates} candidates); "
            "lower --min-items or use more items"
        )
    tag_enc = encoder.tag_encoder()  # fp32: tag vectors are built once (see its docstring)
    names = [c.name for c in cands]
    emb = tag_enc.encode(names)
    if merge_threshold is None:
        merge_threshold = spec_for(encoder.name).synonym_cosine
    unreadable = encoder.unreadable(names)
    report.unreadable = len(unreadable)
    groups = merge_synonyms(cands, emb, merge_threshold, alone=set(unreadable))
    texts = {it.id: event_text(to_event(it), max_chars=200) for it in ds.items}
    examples: dict[str, list[str]] = {}
    for item_id, tags in proposals.items():
        for t in set(tags):
            examples.setdefault(normalise_tag(t), []).append(texts[item_id])
    categories: list[str | None] | None = None
    cat_names = (
        [t.name for t in read_vocabulary(hierarchy, "hierarchy").tags] if hierarchy else None
    )

    def per_tag(ask: Callable[[Candidate], Any], label: str) -> list[str | None]:
        """One concurrent LLM question per kept tag; None where it got no usable answer."""
        out: list[str | None] = [None] * len(groups)
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futs = {pool.submit(ask, head): n for n, (head, _) in enumerate(groups)}
            for k, fut in enumerate(as_completed(futs)):
                ans = fut.result()
                if ans.status == "ok" and ans.tags:
                    out[futs[fut]] = ans.tags[0]
                if progress:
                    progress(label, k + 1, len(groups))
        return out

    if llm_categories:
        # the LLM picks (among the hierarchy's nodes when given, else names one freely)
        categories = per_tag(
            lambda h: tagger.categorize(h.name, examples.get(h.key, [])[:3], cat_names),
            "categorising tags",
        )
        report.categorized = sum(c is not None for c in categories)
    elif cat_names is not None:
        cat_emb = tag_enc.encode(cat_names)
        row_of = {c.key: i for i, c in enumerate(cands)}
        keep_rows = [row_of[h.key] for h, _ in groups]
        categories = list(nearest_category(emb[keep_rows], cat_emb, cat_names))
        report.categorized = len(groups)
    descriptions: list[str | None] | None = None
    if describe and describer is None:
        descriptions = per_tag(
            lambda h: tagger.describe(h.name, examples.get(h.key, [])[:3]), "describing tags"
        )
        report.described = sum(d is not None for d in descriptions)
    vocab = to_tags(groups, categories, descriptions)
    if describe and describer is not None:
        vocab, drep = describer.describe(
            vocab, (lambda d, n: progress("describing tags", d, n)) if progress else None
        )
        report.described = drep.described
    report.tags = len(vocab)
    _gold_coverage(ds.items, vocab, report)
    tag_emb = embed_tags(
        vocab,
        tag_enc.encode,
        template=tag_template,
        # example posts (describer style "examples") are content: embedded as items are
        encode_content=lambda texts: tag_enc.encode(
            [unmark_hashtags(t) for t in texts], kind="query"
        ),
    )
    ts = TagSystem(
        name=name,
        version=version,
        encoder=encoder.name,
        tags=vocab,
        embeddings=np.asarray(tag_emb, dtype=np.float32),
        gate=GateConfig(lexical_boost=0.1),
        provenance={
            "built_by": "tagstream build-tags",
            "data": data.name,
            "llm_model": proposer.model,
            "prompt": proposer.prompt_version,
            **(
                {"handbook": proposer.handbook.version_id}
                if isinstance(proposer, GuidedProposer)
                else {}
            ),
            "samples": samples,
            "min_items": min_items,
            "merge_threshold": merge_threshold,
            **({"describe_prompt": PROMPT_VERSIONS[describer.style]} if describer else {}),
            **template_provenance(tag_template),
            **report.to_dict(),
        },
    )
    ts.save(out)
    return ts, report


def _gold_coverage(items: list[Item], vocab: list[Tag], report: BuildReport) -> None:
    """Where the data is labelled, how much of its label set the built vocabulary names
    (by name or alias, matched as the lexicon matches: normalised, then by stems). A check
    on the vocabulary, not an input to it: the labels never reach the LLM."""
    occurrences = [g for it in items for g in it.gold]
    if not occurrences:
        return
    lex = Lexicon([[t.name, *t.aliases] for t in vocab], stem=True)
    named = {g for g in set(occurrences) if lex.lookup(g)}
    report.gold_labels = len(set(occurrences))
    report.gold_recovered = len(named)
    report.gold_coverage = round(sum(g in named for g in occurrences) / len(occurrences), 4)
