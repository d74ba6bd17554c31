"""The tagging core: events in, decisions out. No Kafka here.

The confluent-kafka runtime, the (coming) Faust runtime and `tagstream eval` all call this
one class, so a quality figure is a figure of the product.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import structlog

from consumer.tagging.events import SCHEMA_VERSION, UploadEvent, event_text, now_iso
from consumer.tagging.handbook import Handbook
from consumer.tagging.image_stage import ImageBatch, ImageStage, PendingImages
from consumer.tagging.llm import (
    PROMPT_VERSION,
    PROPOSE_PROMPT_VERSION,
    UNAVAILABLE,
    LLMAnswer,
    Tagger,
)
from consumer.tagging.metrics import Metrics
from models_onnx import OnnxEncoder
from models_onnx.encoder import TokenizedBatch
from models_onnx.matcher import MIN_TAGS, OrtMatcher
from tagsys import Decision, TagSystem, decide
from tagsys.errors import RuntimeFailure, TagstreamError

log = structlog.get_logger(__name__)


class CoreBrokenError(RuntimeFailure):
    """The core fails even on a harmless canary item: the fault is not the input's."""


class NoContentError(TagstreamError):
    """An item with no text and no image that could be used: nothing to tag it by, so it is
    dead-lettered (reason `no_content`) rather than tagged from an empty embedding; when its
    images failed only for the store's reasons (timeouts, 5xx), reason `image_unavailable`,
    for `replay-dlq --reason image_unavailable` once the store is back."""

    reason: str = "no_content"


@dataclass
class Prepared:
    """A batch ready for the encoder: texts and length-sorted token batches."""

    events: list[UploadEvent]
    texts: list[str]
    plan: list[tuple[npt.NDArray[np.int64], TokenizedBatch]]
    error: BaseException | None = None  # tokenizing failed: isolate item by item
    pending_images: PendingImages | None = None  # fetches started with the read-ahead
    images: ImageBatch | None = None  # set by `encode_prepared`, after the text


@dataclass
class TagResult:
    event: UploadEvent
    decision: Decision
    tags: list[tuple[int, float, str]]  # (tag index, score, source)
    llm_asked: bool
    # the version that decided it: a hot reload before the LLM answers must not re-map it
    tag_system: TagSystem
    shortlist: list[tuple[int, float]] = field(default_factory=list)
    embedding: npt.NDArray[np.float32] | None = None
    llm_status: str | None = None
    # pause mode: the LLM was unavailable, so the runtime re-reads the item later instead
    deferred: bool = False
    # `decide(wait_llm=False)`: the LLM's answer still to come (`complete_llm` applies it)
    llm_future: Future[LLMAnswer] | None = None
    # an auto-accepted item the LLM is asked about too (the audit sample): its answer is
    # compared with the encoder's tags and recorded for distillation, never applied
    audit: bool = False
    audit_tags: list[str] | None = None  # the LLM's answer, when it gave one
    extract: dict[str, Any] | None = None  # --llm-extract: the facts behind the LLM's tags
    # with an image model: what the decision read, and the item's image vector
    inputs: dict[str, Any] | None = None
    image_embedding: npt.NDArray[np.float32] | None = None
    image_tags: list[str] = field(default_factory=list)  # the image's own top tags (LLM hint)
    image_urls: list[str] = field(default_factory=list)  # fetched and checked (--llm-images)

    @property
    def needs_review(self) -> bool:
        return self.decision is Decision.REVIEW


def audited(item_id: str, fraction: float) -> bool:
    """Whether an item is in the audit sample: by a hash of its id, so a re-read item (a
    restart, a rebalance) is audited again or not, the same either way."""
    if fraction <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256(b"audit:" + item_id.encode()).digest()[:4], "big")
    return h / 2**32 < fraction


def llm_item(ev: UploadEvent, max_field_chars: int) -> dict[str, Any]:
    """The item as the LLM is shown it: its non-empty fields, each cut to `max_field_chars`
    (never its id: the prompt holds the content only)."""
    item: dict[str, Any] = {
        k: v
        for k, v in {
            "title": ev.title,
            "caption": ev.caption,
            "cover_text": ev.cover_text,
            "ocr": ev.ocr,
            "asr": ev.asr,
            "hashtags": ev.hashtags or None,
        }.items()
        if v
    }
    for k, v in item.items():
        if isinstance(v, str):
            item[k] = v[:max_field_chars]
    return item


class TaggingCore:
    def __init__(
        self,
        encoder: OnnxEncoder,
        tag_system: TagSystem,
        *,
        tagger: Tagger | None = None,
        metrics: Metrics | None = None,
        llm_concurrency: int = 4,
        max_field_chars: int = 2000,
        emit_embedding: bool = False,
        defer_when_llm_unavailable: bool = False,
        max_batch_tokens: int = 0,
        llm_mode: str = "selective",
        generative_threshold: float = 0.8,
        new_tags_file: Path | None = None,
        trust_unfitted_gate: bool = False,
        audit_fraction: float = 0.0,
        handbook: Handbook | None = None,
        emit_extract: bool = False,
        images: ImageStage | None = None,
        llm_images: bool = False,
    ) -> None:
        tag_system.check_encoder(encoder.name, encoder.dim)
        if images is not None:
            tag_system.check_image_model(images.name, images.dim)
        self.images = images
        self.llm_images = llm_images
        self.encoder = encoder
        self.tag_system = tag_system
        self.tagger = tagger
        self.metrics = metrics or Metrics()
        self.max_field_chars = max_field_chars
        self.emit_embedding = emit_embedding
        self.defer_when_llm_unavailable = defer_when_llm_unavailable
        # measured (`tagstream bench`, StackExchange items): on 2 CPU cores a 512-1024-token
        # budget tags ~3x more items/s than one padded batch of 64; a GPU wants big batches
        self.max_batch_tokens = max_batch_tokens or encoder.default_batch_tokens
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, llm_concurrency), thread_name_prefix="llm"
        )
        self.metrics.set_build(encoder.id, tag_system.version_id)
        self.trust_unfitted_gate = trust_unfitted_gate
        self.handbook = handbook
        self.emit_extract = emit_extract
        if not 0.0 <= audit_fraction <= 1.0:
            raise TagstreamError(f"audit_fraction must be in [0, 1], not {audit_fraction}")
        self.audit_fraction = audit_fraction
        self._agree: dict[str, list[int]] = {}  # tag-system version -> [agreed, audited]
        self.metrics.gate_fitted.set(1 if tag_system.gate_fitted else 0)
        self.llm_mode = llm_mode
        self.generative_threshold = generative_threshold
        self.new_tags_file = new_tags_file
        # the encoder is shared with LLM threads in generative mode (mapping free tags)
        self._enc_lock = threading.Lock()
        self._file_lock = threading.Lock()
        self._matcher: OrtMatcher | None = None
        self._matcher_hash = ""

    def swap_tag_system(self, ts: TagSystem) -> None:
        """Use `ts` from the next batch on (callers swap between batches only)."""
        ts.check_encoder(self.encoder.name, self.encoder.dim)
        if self.images is not None:
            ts.check_image_model(self.images.name, self.images.dim)
        self.tag_system = ts
        self.metrics.set_build(self.encoder.id, ts.version_id)
        self.metrics.gate_fitted.set(1 if ts.gate_fitted else 0)

    def close(self) -> None:
        """Stop the LLM work: requests still running are cut (the client is closed), so
        shutting down does not wait out their timeouts and retries."""
        if self.tagger is not None:
            self.tagger.close()
        if self.images is not None:
            self.images.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.stage_seconds.labels(stage=stage).observe(time.perf_counter() - t0)

    def warm_up(self) -> None:
        """One forward pass so the first real batch does not pay for lazy initialisation."""
        self.encoder.run(self.encoder.tokenize(["warm-up"]))

    def texts(self, events: list[UploadEvent]) -> list[str]:
        return [event_text(e, max_chars=self.max_field_chars) for e in events]

    def prepare(
        self,
        events: list[UploadEvent],
        texts: list[str] | None = None,
        *,
        fetch_images: bool = True,
    ) -> Prepared:
        """Texts and token batches. The Kafka runtime prepares the next batch while the
        encoder works on the current one (`encode_prepared`, in its encode thread)."""
        texts = texts if texts is not None else self.texts(events)
        pending = None  # fetched while the encoder works (even if tokenizing fails: isolate)
        if fetch_images and self.images is not None and any(ev.has_images for ev in events):
            pending = self.images.start(events)
        try:
            with self._timed("tokenize"):
                # content is the "query" side, tags the "passage" side (e5 prefixes; measured:
                # KuaiRec recall@10 0.642 vs 0.591 with passage/passage)
                plan = self.encoder.tokenize_sorted(
                    texts,
                    kind="query",
                    max_batch_tokens=self.max_batch_tokens,
                    max_batch=max(1, len(texts)),
                )
        except Exception as e:  # `decide_isolating` then isolates the item that caused it
            return Prepared(events, texts, [], e, pending_images=pending)
        return Prepared(events, texts, plan, pending_images=pending)

    def encode_prepared(self, prep: Prepared) -> npt.NDArray[np.float32]:
        """The text's embeddings; then (the fetches having run meanwhile) the images'."""
        if prep.error is not None:
            raise prep.error
        out = np.empty((len(prep.texts), self.encoder.dim), dtype=np.float32)
        with self._timed("encode"):
            for idx, batch in prep.plan:
                with self._enc_lock:
                    out[idx] = self.encoder.run(batch).embeddings
        if self.images is not None and prep.pending_images is not None:
            prep.images = self.images.finish(prep.pending_images)
        return out

    def embed(
        self, events: list[UploadEvent], texts: list[str] | None = None
    ) -> npt.NDArray[np.float32]:
        return self.encode_prepared(self.prepare(events, texts))

    def process(self, events: list[UploadEvent], *, wait_llm: bool = True) -> list[TagResult]:
        """Decide every event; the list that comes back is in the order of `events`."""
        if not events:
            return []
        prep = self.prepare(events)
        emb = self.encode_prepared(prep)
        return self.decide(events, emb, prep.texts, wait_llm=wait_llm, images=prep.images)

    def decide(
        self,
        events: list[UploadEvent],
        emb: npt.NDArray[np.float32],
        texts: list[str],
        *,
        wait_llm: bool = True,
        images: ImageBatch | None = None,
    ) -> list[TagResult]:
        """Shortlist, gate and (for uncertain items) ask the LLM; `emb` from `embed`.
        With `wait_llm=False` the LLM items come back with `llm_future` set, so the caller can
        emit the others at once and `complete_llm` these when their answers arrive.
        `images` (from `encode_prepared`): their scores are fused with the text's per tag
        (the tag system's rule), and a tag the image decided says `source: image`."""
        ts = self.tag_system
        fused = images is not None and ts.image is not None and bool(images.has_image.any())
        with self._timed("match"):
            if fused:
                assert images is not None
                idx, scores, won = ts.shortlist_fused(emb, texts, images.emb, images.has_image)
            else:
                idx, scores = self._shortlist(ts, emb, texts)
                won = np.zeros(idx.shape, dtype=bool)
            gates = [decide(idx[i], scores[i], ts.tag_ids, ts.gate) for i in range(len(events))]
        # no unearned confidence: an unfitted gate's "sure" was never measured
        trusted = ts.gate_fitted or self.trust_unfitted_gate
        results: list[TagResult] = []
        pending: list[tuple[int, Any]] = []
        for i, (ev, g) in enumerate(zip(events, gates, strict=True)):
            short = [(int(j), float(s)) for j, s in zip(idx[i], scores[i], strict=True)]
            by_image = {int(j) for j, w in zip(idx[i], won[i], strict=True) if w}
            res = TagResult(
                event=ev,
                decision=Decision.ENCODER,
                tags=[(j, s, "image" if j in by_image else "encoder") for j, s in g.tags],
                llm_asked=False,
                shortlist=short,
                embedding=emb[i],  # kept for decision records; on the event only if asked
                tag_system=ts,
            )
            if self.images is not None:
                self._note_images(res, i, texts[i], images)
            if (
                g.decision_hint is Decision.ENCODER
                and trusted
                and self.tagger is not None
                and audited(ev.id, self.audit_fraction)
            ):
                res.audit = True  # the decision stays the encoder's: llm_asked stays False
                pending.append(
                    (i, self._pool.submit(self._ask, ts, ev, short, res.image_tags, res.image_urls))
                )
            elif g.decision_hint is Decision.LLM or not trusted:
                self.metrics.llm_routed.inc()
                res.decision = Decision.REVIEW
                if self.tagger is not None:
                    res.llm_asked = True
                    pending.append(
                        (
                            i,
                            self._pool.submit(
                                self._ask, ts, ev, short, res.image_tags, res.image_urls
                            ),
                        )
                    )
            results.append(res)
        for i, fut in pending:
            if wait_llm:
                self._apply_llm(results[i], fut.result())
            else:
                results[i].llm_future = fut
        return results

    def _note_images(self, res: TagResult, i: int, text: str, images: ImageBatch | None) -> None:
        """What the decision read (on the tag event), the image vector, and the image's own
        top tags, which the LLM is shown as text (no multimodal model assumed)."""
        used = images.used[i] if images is not None else 0
        res.inputs = {
            "text": bool(text.strip()),
            "images": used,
            "images_failed": images.failed[i] if images is not None else 0,
        }
        ts = res.tag_system
        if images is not None and used and ts.image is not None:
            res.image_embedding = images.emb[i]
            res.image_urls = images.urls[i] if images.urls else []
            img = ts.image.scores(images.emb[i : i + 1])[0]
            top = np.argsort(-img, kind="stable")[: ts.gate.max_tags]
            res.image_tags = [ts.names[int(j)] for j in top]

    def complete_llm(self, res: TagResult) -> None:
        """Apply the LLM's answer to a result of `decide(wait_llm=False)` (blocks until it is
        there); raises what the request raised."""
        fut, res.llm_future = res.llm_future, None
        if fut is not None:
            self._apply_llm(res, fut.result())

    def _shortlist(
        self, ts: TagSystem, emb: npt.NDArray[np.float32], texts: list[str]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """numpy for small vocabularies and distilled heads; one ORT graph (MatMul + TopK,
        exact) for large cosine vocabularies such as TagGPT's 40k (`tagstream bench`)."""
        if ts.head is not None or len(ts.tags) < MIN_TAGS:
            return ts.shortlist(emb, texts)
        if self._matcher is None or self._matcher_hash != ts.content_hash:
            self._matcher = OrtMatcher(ts.embeddings, ts.bias)
            self._matcher_hash = ts.content_hash
        return self._matcher.top_k(
            emb, ts.gate.top_k, mentions=ts.mentions(texts), boost=ts.gate.lexical_boost
        )

    def process_isolating(self, events: list[UploadEvent]) -> list[TagResult | BaseException]:
        """`process` on the whole batch; if it fails, item by item (`isolate`)."""
        try:
            prep = self.prepare(events)
        except Exception as batch_exc:
            return self.isolate(events, batch_exc)
        return self.decide_isolating(prep, _done(self.encode_prepared, prep))

    def decide_isolating(
        self, prep: Prepared, emb: Future[npt.NDArray[np.float32]], *, wait_llm: bool = True
    ) -> list[TagResult | BaseException]:
        """`process_isolating` for a batch prepared and encoded ahead (the Kafka runtime).
        An item with neither text nor a usable image becomes a `NoContentError`."""
        try:
            vecs = emb.result()
            empty = [
                not t.strip() and not (prep.images is not None and prep.images.used[i])
                for i, t in enumerate(prep.texts)
            ]
            if not any(empty):
                return list(
                    self.decide(
                        prep.events, vecs, prep.texts, wait_llm=wait_llm, images=prep.images
                    )
                )
            keep = [i for i, e in enumerate(empty) if not e]
            decided = self.decide(
                [prep.events[i] for i in keep],
                vecs[keep],
                [prep.texts[i] for i in keep],
                wait_llm=wait_llm,
                images=prep.images.subset(keep) if prep.images is not None else None,
            )
        except Exception as batch_exc:
            return self.isolate(prep.events, batch_exc, wait_llm=wait_llm, prep=prep)
        out: list[TagResult | BaseException] = []
        it = iter(decided)
        for i, e in enumerate(empty):
            out.append(_no_content(prep, i) if e else next(it))
        return out

    def isolate(
        self,
        events: list[UploadEvent],
        batch_exc: BaseException,
        *,
        wait_llm: bool = True,
        prep: Prepared | None = None,
    ) -> list[TagResult | BaseException]:
        """Item by item after a failed batch, so one poison item does not fail the others.

        If the core fails on a harmless canary item too, the fault is not the input's (a broken
        model, say): raise CoreBrokenError, so nothing is committed and a restart re-reads the
        batch, instead of sending good events to the dead-letter topic. The batch's images
        (`prep`) are reused, never fetched again: one wait for them per batch, not per item.
        """
        if not self._canary_ok():
            raise CoreBrokenError(
                f"the tagging core fails even on a canary item: {batch_exc!r}"
            ) from batch_exc
        log.warning("batch_failed_isolating_items", error=repr(batch_exc))
        images = self._batch_images(prep)
        # no batch to take the images from (it failed before it was prepared): item by item
        refetch = prep is None
        results: list[TagResult | BaseException] = []
        for k, ev in enumerate(events):
            try:  # without waiting on the LLM when the caller bounds that wait itself
                one = self.prepare([ev], fetch_images=refetch)
                emb = self.encode_prepared(one)
                if not refetch:
                    one.images = images.subset([k]) if images is not None else None
                if not one.texts[0].strip() and not (one.images and one.images.used[0]):
                    results.append(_no_content(one, 0))
                    continue
                results.extend(
                    self.decide([ev], emb, one.texts, wait_llm=wait_llm, images=one.images)
                )
            except Exception as e:
                results.append(e)
        return results

    def _batch_images(self, prep: Prepared | None) -> ImageBatch | None:
        """The images of a batch that failed: as embedded already, or (the batch failed
        before its images were) its fetches waited for once now."""
        if prep is None or self.images is None:
            return None
        if prep.images is None and prep.pending_images is not None:
            try:
                prep.images = self.images.finish(prep.pending_images)
            except Exception as e:  # the image model broke after the canary passed
                raise CoreBrokenError(f"the image model fails: {e!r}") from e
        return prep.images

    def _canary_ok(self) -> bool:
        try:
            self.process([UploadEvent(id="__tagstream_canary__", title="canary")])
            if self.images is not None:  # a broken image model fails every image item
                self.images.check()
        except Exception:
            return False
        return True

    def _ask(
        self,
        ts: TagSystem,
        ev: UploadEvent,
        short: list[tuple[int, float]],
        image_tags: list[str] | None = None,
        image_urls: list[str] | None = None,
    ) -> LLMAnswer:
        assert self.tagger is not None
        item = llm_item(ev, self.max_field_chars)
        if image_tags:  # what the image looks like to the image model, as data
            item["image_looks_like"] = image_tags
        guidance = None
        if self.handbook is not None:  # the section of the item's category, if it has one
            top = ts.tags[short[0][0]].category if short else None
            guidance = self.handbook.section(top) or self.handbook.section(ev.content_type)
        if self.llm_mode == "generative":
            return self._generate(ts, ev, item, guidance)
        names = [ts.names[j] for j, _ in short]
        # --llm-images: only URLs this service fetched through its own checks (allow-list,
        # addresses, type), never an event's URL as given: the endpoint fetches it too
        urls = image_urls if self.llm_images and image_urls else None
        return self.tagger.tag(item, names, ts.gate.max_tags, guidance, urls)

    def _generate(
        self, ts: TagSystem, ev: UploadEvent, item: dict[str, Any], guidance: str | None = None
    ) -> LLMAnswer:
        """Free LLM tags, each mapped to its nearest vocabulary tag (name or alias first);
        what maps nowhere is counted and logged as a candidate for the next vocabulary."""
        assert self.tagger is not None
        answer = self.tagger.propose(item, ts.gate.max_tags, temperature=0.0, guidance=guidance)
        if answer.status != "ok" or not answer.tags:
            return answer
        mapped: dict[str, float] = {}
        unmapped: list[str] = []
        need_embedding: list[str] = []
        for free in answer.tags:
            hits = ts.lexicon.lookup(free)
            if hits:
                mapped.setdefault(ts.names[hits[0]], 1.0)
            else:
                need_embedding.append(free)
        if need_embedding:
            with self._enc_lock:
                emb = self.encoder.encode(need_embedding)
            sims = emb @ ts.embeddings.T
            for free, row in zip(need_embedding, sims, strict=True):
                j = int(np.argmax(row))
                if float(row[j]) >= self.generative_threshold:
                    mapped.setdefault(ts.names[j], float(row[j]))
                else:
                    unmapped.append(free)
        if unmapped:
            self.metrics.new_tag_candidates.inc(len(unmapped))
            self._record_candidates(ev.id, unmapped, ts.version_id)
        answer.tags = list(mapped)[: ts.gate.max_tags]
        answer.scores = mapped
        return answer

    def _record_candidates(self, item_id: str, tags: list[str], version: str) -> None:
        if self.new_tags_file is None:
            return
        line = b"".join(
            orjson.dumps(
                {
                    "tag": t,
                    "item_id": item_id,
                    "tag_system_version": version,
                    "seen_at": now_iso(),
                }
            )
            + b"\n"
            for t in tags
        )
        try:
            with self._file_lock, self.new_tags_file.open("ab") as f:
                f.write(line)
        except OSError as e:  # a full disk must not stop tagging: the metric still counts
            log.warning("new_tags_file_unwritable", path=str(self.new_tags_file), error=str(e))

    def _apply_llm(self, res: TagResult, answer: LLMAnswer) -> None:
        res.llm_status = answer.status
        if res.audit:
            self._audit(res, answer)
            return
        if answer.status in UNAVAILABLE and self.defer_when_llm_unavailable:
            res.deferred = True
            return
        if answer.status != "ok" or not answer.tags:
            return  # stays REVIEW with the encoder's tags
        res.extract = answer.extract
        score_of = {j: s for j, s in res.shortlist}
        chosen = []
        for name in answer.tags:
            j = res.tag_system.index_of(name)
            if j is not None and j in score_of:
                chosen.append((j, score_of[j], "llm"))
            elif j is not None and name in answer.scores:  # generative: mapped off-shortlist
                chosen.append((j, answer.scores[name], "llm"))
        if chosen:
            res.decision = Decision.LLM
            res.tags = chosen

    def _audit(self, res: TagResult, answer: LLMAnswer) -> None:
        """An audited item keeps the encoder's decision; the LLM's answer only measures the
        gate (agreement per tag-system version) and teaches distillation."""
        if answer.status != "ok" or not answer.tags:
            self.metrics.audits.labels(result="no_answer").inc()
            return
        ts = res.tag_system
        res.audit_tags = [n for n in answer.tags if ts.index_of(n) is not None]
        agreed = set(res.audit_tags) == {ts.names[j] for j, _, _ in res.tags}
        self.metrics.audits.labels(result="agree" if agreed else "disagree").inc()
        counts = self._agree.setdefault(ts.version_id, [0, 0])
        counts[0] += int(agreed)
        counts[1] += 1
        self.metrics.gate_agreement.labels(tag_system=ts.version_id).set(counts[0] / counts[1])

    def decision_record(self, res: TagResult) -> dict[str, Any] | None:
        """What the LLM decided for one item, with what distillation needs to learn from it
        (schema consumer/schemas/decision.v1.json); None when the LLM did not decide. An
        audited item's record holds the LLM's answer (`audit: true`): the unbiased sample of
        what the gate accepts, so a re-fitted gate learns where it was wrong."""
        if self.tagger is None or res.embedding is None:
            return None
        if res.audit and not res.audit_tags:
            return None
        if not res.audit and res.decision is not Decision.LLM:
            return None
        ts = res.tag_system
        return {
            "schema_version": SCHEMA_VERSION,
            "id": res.event.id,
            "text": event_text(res.event, max_chars=self.max_field_chars)[:4000],
            "embedding": [round(float(x), 6) for x in res.embedding],
            "encoder": self.encoder.id,
            "shortlist": [{"name": ts.names[j], "score": round(s, 5)} for j, s in res.shortlist],
            "chosen": res.audit_tags
            if res.audit and res.audit_tags
            else [ts.names[j] for j, _, _ in res.tags],
            "audit": res.audit,
            "llm_mode": self.llm_mode,
            # generative mode maps free tags onto the whole vocabulary, so the item's own text
            # can steer which tags it gets (prompt injection): distill leaves these out
            "steerable": self.llm_mode == "generative",
            "llm_model": self.tagger.model,
            "prompt_version": PROPOSE_PROMPT_VERSION
            if self.llm_mode == "generative"
            else getattr(self.tagger, "selective_prompt_version", PROMPT_VERSION),
            "extract": res.extract,
            "tag_system_version": ts.version_id,
            "handbook_version": self.handbook.version_id if self.handbook else None,
            "decided_at": now_iso(),
        }

    def to_payload(self, res: TagResult) -> dict[str, Any]:
        """The tag event (schema consumer/schemas/tag-event.v1.json)."""
        ts = res.tag_system
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "id": res.event.id,
            "tags": [
                {
                    "id": ts.tags[j].id,
                    "name": ts.tags[j].name,
                    "category": ts.tags[j].category,
                    "score": round(s, 5),
                    "source": src,
                }
                for j, s, src in res.tags
            ],
            "decision": res.decision.value,
            "tag_system_version": ts.version_id,
            "encoder": self.encoder.id,
            "llm_asked": res.llm_asked,
            "llm_model": self.tagger.model if res.llm_asked and self.tagger else None,
            "handbook_version": self.handbook.version_id
            if res.llm_asked and self.handbook
            else None,
            "needs_review": res.needs_review,
            "processed_at": now_iso(),
        }
        if self.emit_extract and res.extract is not None:
            out["extract"] = res.extract  # cold-start features: what the LLM saw in the item
        if self.emit_embedding and res.embedding is not None:
            out["embedding"] = [round(float(x), 6) for x in res.embedding]
        if self.emit_embedding and res.image_embedding is not None:
            out["image_embedding"] = [round(float(x), 6) for x in res.image_embedding]
        if res.inputs is not None:
            out["inputs"] = res.inputs
        return out


def _done(fn: Any, *args: Any) -> Future[Any]:
    """`fn(*args)` run now, as a finished future (its exception kept for `.result()`)."""
    fut: Future[Any] = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as e:
        fut.set_exception(e)
    return fut


def _no_content(prep: Prepared, i: int) -> NoContentError:
    why = ""
    reasons = prep.images.reasons[i] if prep.images is not None else []
    if reasons:
        why = f"; its images could not be used ({', '.join(reasons)})"
    elif prep.events[i].has_images:
        why = "; it has images, but no image model is configured"
    err = NoContentError(f"item {prep.events[i].id!r} has no text{why}")
    if reasons and prep.images is not None and not prep.images.permanent[i]:
        err.reason = "image_unavailable"  # the store's fault, not the item's: replay it later
    return err
