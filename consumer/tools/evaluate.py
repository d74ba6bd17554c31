"""`tagstream eval` and `tagstream calibrate`: the service's decision path over labelled data.

Same TaggingCore as the Kafka runtime (embed -> shortlist -> gate -> LLM), minus Kafka, so a
quality figure is a figure of the product. Zero-shot (no --tag-system): the vocabulary is the
set of distinct gold labels and nothing else about them informs a prediction.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import SecretStr

from consumer.tagging.config import Settings
from consumer.tagging.core import TaggingCore
from consumer.tagging.events import UploadEvent
from consumer.tagging.handbook import Handbook
from consumer.tagging.image_stage import ImageBatch, ImageOptions
from consumer.tagging.llm import SelectiveTagger
from consumer.tagging.llm_server import LocalLLM
from consumer.tagging.metrics import Metrics
from consumer.tagging.parts import make_tagger
from models_onnx import OnnxEncoder
from tagsys import (
    DEFAULT_TEMPLATE,
    Decision,
    GateConfig,
    Tag,
    TagSystem,
    TagSystemError,
    build_tag_system,
    check_template,
)
from tagsys.adapt import adapt, label_free_gate
from tagsys.bank import BANK_K, BANK_WEIGHT, expand_with_bank
from tagsys.datasets import Dataset, DatasetError, Item, load
from tagsys.evaluation import (
    Calibration,
    Outcome,
    auto_ceiling,
    calibrated,
    compute,
    gate_outcomes,
)
from tagsys.fusion import fit_fusion
from tagsys.tree import TREE_WEIGHT, expand_with_tree

Progress = Callable[[int, int], None]
DEFAULT_MODEL = {
    "kuairec": "multilingual-e5-small",
    "stackexchange": "all-MiniLM-L6-v2",
    "jsonl": "all-MiniLM-L6-v2",
}
# measured on StackExchange cooking (docs/EXPERIMENTS.md): +5 points recall@10; harmless on KuaiRec
ZERO_SHOT_LEXICAL_BOOST = 0.1


def to_event(item: Item) -> UploadEvent:
    return UploadEvent.model_validate({"id": item.id, **item.fields})


def zero_shot(
    labels: list[str],
    encoder: OnnxEncoder,
    name: str = "zero-shot",
    template: str = DEFAULT_TEMPLATE,
) -> TagSystem:
    """A tag system whose only knowledge of the labels is their names (in `template`)."""
    tags = [Tag(id=label, name=label) for label in labels]
    gate = GateConfig(top_k=20, lexical_boost=ZERO_SHOT_LEXICAL_BOOST)
    enc = encoder.tag_encoder().encode
    ts = build_tag_system(name, "0", tags, enc, encoder.name, gate, template=template)
    prov = {"built_by": "zero-shot from the label names", **ts.provenance}
    return replace(ts, provenance=prov)


def template_for(loaded: TagSystem | None, template: str | None) -> str:
    """`--tag-template` shapes tags as they are embedded: a loaded tag system was already."""
    if template is None:
        return DEFAULT_TEMPLATE
    if loaded is not None:
        raise TagSystemError(
            f"--tag-template applies where tags are embedded (zero-shot, import-tags, "
            f"build-tags); {loaded.version_id} is embedded already"
        )
    return check_template(template)


@dataclass
class EvalRun:
    dataset: Dataset
    tag_system: TagSystem
    encoder: str
    idx: npt.NDArray[np.int64]  # top-20 shortlist per item
    scores: npt.NDArray[np.float32]
    outcomes: list[Outcome]
    # with an image model: what `calibrate` re-scores with when it fits the fusion
    emb: npt.NDArray[np.float32] | None = None
    texts: list[str] | None = None
    images: ImageBatch | None = None


def _batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


@contextlib.contextmanager
def _tagger(
    llm: str, model: str, key: SecretStr, metrics: Metrics, extract: bool = False
) -> Iterator[SelectiveTagger | None]:
    spec = llm.strip()
    if spec.lower() in ("", "none", "off"):
        yield None
        return
    settings = Settings(llm_extract=True) if extract else Settings()
    if spec.lower() == "local":
        with LocalLLM() as local:
            yield make_tagger(settings, local.base_url, local.model, SecretStr(""), metrics)
        return
    yield make_tagger(settings, spec, model, key, metrics)


def cache_key(encoder: OnnxEncoder, texts: list[str]) -> str:
    """What an item's vector depends on: the encoder's weights (the variant's sha256), its
    prompt and length cap, and the exact texts in order."""
    h = hashlib.sha256()
    m = encoder.manifest
    for part in (m.name, encoder.variant, m.files[encoder.variant]["sha256"], m.query_prefix):
        h.update(part.encode() + b"\0")
    h.update(f"{m.max_length}\0{len(texts)}\0".encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()[:32]


def embed_items(
    core: TaggingCore,
    items: list[Item],
    progress: Progress | None = None,
    cache: Path | None = None,
) -> tuple[npt.NDArray[np.float32], list[str]]:
    """Embeddings and texts of items exactly as the service makes them (the core's own path).
    With `cache`, vectors of the same texts by the same encoder are read back instead: with
    embeddinggemma-300m a KuaiRec run embeds for over ten minutes, the scoring after it
    takes seconds, and tuning a tag system reruns eval on the same items."""
    if cache is None:
        return _embed_items(core, items, progress)
    texts = core.texts([to_event(it) for it in items])
    path = cache / f"{core.encoder.name}-{cache_key(core.encoder, texts)}.npy"
    if path.is_file():
        emb = np.load(path)
        if emb.shape == (len(items), core.encoder.dim) and emb.dtype == np.float32:
            if progress:
                progress(len(items), len(items))
            return emb, texts
    emb, texts = _embed_items(core, items, progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)  # a killed run leaves no half-written file under the real name
    return emb, texts


def _embed_items(
    core: TaggingCore, items: list[Item], progress: Progress | None = None
) -> tuple[npt.NDArray[np.float32], list[str]]:
    embs, texts = [], []
    done = 0
    for batch in _batches(items, 256):
        events = [to_event(it) for it in batch]
        t = core.texts(events)
        embs.append(core.embed(events, t))
        texts.extend(t)
        done += len(batch)
        if progress:
            progress(done, len(items))
    return np.concatenate(embs) if embs else np.zeros((0, core.encoder.dim), np.float32), texts


def embed_images(core: TaggingCore, items: list[Item]) -> ImageBatch | None:
    """The items' images as the service embeds them (fetched, checked, averaged per item);
    None without an image model."""
    if core.images is None:
        return None
    parts = [
        core.images.finish(core.images.start([to_event(it) for it in batch]))
        for batch in _batches(items, 64)
    ]
    return ImageBatch.concat(parts, core.images.dim)


def scored(
    ts: TagSystem,
    emb: npt.NDArray[np.float32],
    texts: list[str],
    images: ImageBatch | None,
    k: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The top-k shortlist the service's scoring gives: fused with the images when there are."""
    if images is not None and ts.image is not None and images.has_image.any():
        idx, sc, _ = ts.shortlist_fused(emb, texts, images.emb, images.has_image, k=k)
        return idx, sc
    return ts.shortlist(emb, texts, k=k)


def expand(
    ts: TagSystem,
    *,
    tree: Path | None = None,
    tree_weight: float = TREE_WEIGHT,
    bank: Path | None = None,
    bank_k: int = BANK_K,
    bank_weight: float = BANK_WEIGHT,
) -> TagSystem:
    """The tag vectors mixed with a category tree's children, then a bank's neighbours — the
    one order `eval`, `calibrate` and `import-tags` share. Neither reads item labels: the tree
    is a taxonomy, the bank an external vocabulary, so zero-shot stays label-free."""
    if tree is not None:
        ts = expand_with_tree(ts, TagSystem.load(tree), weight=tree_weight)
    if bank is not None:
        ts = expand_with_bank(ts, TagSystem.load(bank), k=bank_k, weight=bank_weight)
    return ts


def run_eval(
    data: Path,
    fmt: str,
    *,
    level: int = 1,
    tag_system: Path | None = None,
    model: str | None = None,
    model_dir: Path | None = None,
    llm: str = "none",
    llm_model: str = "smollm2",
    llm_api_key: SecretStr = SecretStr(""),
    limit: int | None = None,
    adapt_corpus: bool = False,
    bank: Path | None = None,
    bank_k: int = BANK_K,
    bank_weight: float = BANK_WEIGHT,
    tree: Path | None = None,
    tree_weight: float = TREE_WEIGHT,
    tag_template: str | None = None,
    embedding_cache: Path | None = None,
    progress: Progress | None = None,
    trust_unfitted_gate: bool = False,
    handbook: Path | None = None,
    llm_extract: bool = False,
    images: ImageOptions | None = None,
) -> EvalRun:
    ds = load(data, fmt, level=level, limit=limit, image_only=images is not None)
    if not ds.items:
        raise DatasetError(f"{data}: no labelled items with text ({dict(ds.skipped)})")
    loaded = TagSystem.load(tag_system) if tag_system else None
    template = template_for(loaded, tag_template)
    name = model or (loaded.encoder if loaded else DEFAULT_MODEL[fmt])
    encoder = OnnxEncoder(name, model_dir=model_dir, device="auto")
    ts = loaded or zero_shot(ds.labels, encoder, template=template)
    ts = expand(
        ts, tree=tree, tree_weight=tree_weight, bank=bank, bank_k=bank_k, bank_weight=bank_weight
    )
    metrics = Metrics()
    outcomes: list[Outcome] = []
    with _tagger(llm, llm_model, llm_api_key, metrics, llm_extract) as tagger:
        core = TaggingCore(
            encoder,
            ts,
            tagger=tagger,
            metrics=metrics,
            trust_unfitted_gate=trust_unfitted_gate,
            handbook=Handbook.load(handbook) if handbook else None,
            images=images.stage(metrics, model_dir) if images else None,
        )
        try:
            emb, texts = embed_items(core, ds.items, progress, embedding_cache)
            image_batch = embed_images(core, ds.items)
            if loaded is None:
                if adapt_corpus:  # unlabelled text of the same file: transductive, label-free
                    ts = adapt(ts, emb, texts)
                ts = label_free_gate(ts, emb, texts)
            elif adapt_corpus:
                ts = adapt(ts, emb, texts)
            core.swap_tag_system(ts)
            idx, scores = scored(ts, emb, texts, image_batch, max(20, ts.gate.top_k))
            for s in range(0, len(ds.items), 64):
                items = ds.items[s : s + 64]
                events = [to_event(it) for it in items]
                sub = (
                    image_batch.subset(list(range(s, s + len(items))))
                    if image_batch is not None
                    else None
                )
                results = core.decide(events, emb[s : s + 64], texts[s : s + 64], images=sub)
                for k, (it, res) in enumerate(zip(items, results, strict=True)):
                    gold = frozenset(j for g in it.gold if (j := ts.index_of(g)) is not None)
                    outcomes.append(
                        Outcome(
                            gold=gold,
                            ranked=[int(j) for j in idx[s + k]],
                            auto=res.decision is Decision.ENCODER,
                            routed_llm=res.decision is not Decision.ENCODER,
                            final=[j for j, _, _ in res.tags],
                        )
                    )
        finally:
            core.close()
    return EvalRun(ds, ts, encoder.name, idx, scores, outcomes, emb, texts, image_batch)


def report(run: EvalRun) -> dict[str, Any]:
    out = compute(run.outcomes, len(run.tag_system.tags))
    out["encoder"] = run.encoder
    out["tag_system"] = run.tag_system.version_id
    out["skipped"] = dict(run.dataset.skipped)
    return out


def run_calibrate(
    run: EvalRun, *, target_precision: float, fit_fraction: float
) -> tuple[TagSystem, Calibration, dict[str, Any], dict[str, Any]]:
    """Fit the gate on the first `fit_fraction` of the items, check it on the rest.
    Returns (calibrated tag system, calibration, held-out metrics before, after)."""
    ts = run.tag_system
    n = len(run.outcomes)
    cut = max(1, min(n - 1, int(n * fit_fraction)))
    gold = [o.gold for o in run.outcomes]
    fusion: dict[str, Any] | None = None
    idx, scores = run.idx, run.scores
    if run.images is not None and ts.image is not None and run.emb is not None:
        # first the image scores onto the text's scale (on the fit part), then the gate
        ts, fusion = fit_image_fusion(run, cut)
        assert run.texts is not None
        idx, scores = scored(ts, run.emb, run.texts, run.images, run.idx.shape[1])
    new, cal = calibrated(ts, idx[:cut], scores[:cut], gold[:cut], target_precision)

    def held_out(
        t: TagSystem, i: npt.NDArray[np.int64], sc: npt.NDArray[np.float32]
    ) -> tuple[dict[str, Any], list[Outcome]]:
        outs = gate_outcomes(t, i[cut:], sc[cut:], gold[cut:])
        return compute(outs, len(t.tags)), outs

    before, _ = held_out(run.tag_system, run.idx, run.scores)
    after, outs = held_out(new, idx, scores)
    # a property of the scorer's rankings, which both gates share
    after["auto_ceiling"] = auto_ceiling(outs, target_precision)
    if fusion is not None:
        after["image_fusion"] = fusion
    return new, cal, before, after


def fit_image_fusion(run: EvalRun, cut: int) -> tuple[TagSystem, dict[str, Any]]:
    """The tag system with its image scores put on the text's scale, fitted on the first
    `cut` items' labels (tagsys/fusion.py), and what the fit found."""
    ts = run.tag_system
    assert ts.image is not None and run.images is not None and run.emb is not None
    emb, texts, images = run.emb[:cut], (run.texts or [])[:cut], run.images
    text = ts.text_scores(emb, texts)
    image_cos = (images.emb[:cut] @ ts.image.embeddings.T).astype(np.float32)
    gold = [o.gold for o in run.outcomes[:cut]]
    fit = fit_fusion(text, image_cos, gold, images.has_image[:cut])
    space = replace(ts.image, scale=fit.scale, shift=fit.shift)
    prov = {**ts.provenance, "image_fusion": {"fitted_on": cut, **asdict(fit)}}
    return replace(ts, image=space, provenance=prov), asdict(fit)
