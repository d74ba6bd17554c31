"""The image path of the core: an item's cover and frames fetched ahead of the encoder and
embedded by the image tower of a CLIP-style pair, one mean vector per item.

Fetches start when a batch is prepared (the runtime's read-ahead, while the encoder works
on the batch before it) and are awaited only after the batch's text is encoded, within a
bounded wait; an image that fails or comes late is counted by reason and the item goes on
with what it has. No Kafka here.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import structlog

from consumer.tagging.events import UploadEvent
from consumer.tagging.images import Fetched, FetchPolicy, ImageFetcher
from consumer.tagging.metrics import Metrics

log = structlog.get_logger(__name__)

if TYPE_CHECKING:
    from PIL.Image import Image

    from models_onnx.clip import ClipEncoder


@dataclass(frozen=True)
class ImageOptions:
    """Where the image path's model is and what it may fetch: `run`'s settings, and `eval`
    / `calibrate`'s options (the same fetch rules either way)."""

    model: str  # an exported folder, or a name under the model folder
    hosts: str = ""
    schemes: str = "https"
    max_images: int = 4
    max_bytes: int = 5_000_000
    max_pixels: int = 40_000_000
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 5.0
    concurrency: int = 8

    def policy(self) -> FetchPolicy:
        return FetchPolicy(
            hosts=FetchPolicy.parse_hosts(self.hosts),
            schemes=tuple(x.strip().lower() for x in self.schemes.split(",") if x.strip()),
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
        )

    def stage(
        self, metrics: Metrics, model_dir: Path | None = None, device: str = "auto"
    ) -> ImageStage:
        from models_onnx.clip import ClipEncoder, clip_folder

        policy = self.policy()  # a bad allow-list fails before the model loads
        return ImageStage(
            ClipEncoder(clip_folder(self.model, model_dir), device=device),
            policy,
            metrics,
            max_images=self.max_images,
            concurrency=self.concurrency,
        )


# the longest a batch waits for its fetches after its text is encoded, however many queue
MAX_BATCH_WAIT_S = 30.0


@dataclass
class PendingImages:
    """The fetches of one batch, per item (cover first), with what each fetched."""

    futures: list[list[Future[Fetched]]]
    sources: list[list[tuple[str, str]]]


@dataclass
class ImageBatch:
    """Per item: its mean image vector (zeros without one), images used and failed, why
    each failed, and the URLs that were fetched and passed every check."""

    emb: npt.NDArray[np.float32]
    used: list[int]
    failed: list[int]
    reasons: list[list[str]] = field(default_factory=list)
    urls: list[list[str]] = field(default_factory=list)
    # per item: whether some image failed for a reason fetching again will not mend; an item
    # with no text whose images failed only for the store's reasons (timeouts, connections,
    # 5xx) is dead-lettered as `image_unavailable`, replayable once the store is back
    permanent: list[bool] = field(default_factory=list)

    @property
    def has_image(self) -> npt.NDArray[np.bool_]:
        return np.asarray([n > 0 for n in self.used], dtype=bool)

    @classmethod
    def concat(cls, parts: list[ImageBatch], dim: int) -> ImageBatch:
        return cls(
            np.concatenate([p.emb for p in parts]) if parts else np.zeros((0, dim), np.float32),
            [n for p in parts for n in p.used],
            [n for p in parts for n in p.failed],
            [r for p in parts for r in p.reasons],
            [u for p in parts for u in p.urls],
            [x for p in parts for x in p.permanent],
        )

    def subset(self, rows: list[int]) -> ImageBatch:
        return ImageBatch(
            self.emb[rows],
            [self.used[i] for i in rows],
            [self.failed[i] for i in rows],
            [self.reasons[i] for i in rows],
            [self.urls[i] for i in rows],
            [self.permanent[i] for i in rows],
        )


class ImageStage:
    def __init__(
        self,
        encoder: ClipEncoder,
        policy: FetchPolicy,
        metrics: Metrics,
        *,
        max_images: int = 4,
        concurrency: int = 8,
        wait_s: float | None = None,
    ) -> None:
        """`wait_s`: the wait for a batch's fetches after its text is encoded, per round of
        `concurrency` fetches (default: one fetch's whole budget, connect + read), at most
        MAX_BATCH_WAIT_S in all: fetches queued behind others are not cut short for it."""
        self.encoder = encoder
        self.metrics = metrics
        self.max_images = max(1, max_images)
        self.concurrency = max(1, concurrency)
        # fetches of the batch ahead run on its bounded pool while the encoder works
        self.fetcher = ImageFetcher(policy, concurrency=concurrency)
        self.wait_s = policy.read_timeout_s + policy.connect_timeout_s if wait_s is None else wait_s
        self._lock = threading.Lock()  # the encode thread and an isolating poll thread

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def close(self) -> None:
        self.fetcher.close()

    def sources(self, ev: UploadEvent) -> list[tuple[str, str]]:
        """("b64" | "url", data) for the item's images, cover first, at most `max_images`."""
        out: list[tuple[str, str]] = []
        if ev.cover_b64:
            out.append(("b64", ev.cover_b64))
        if ev.cover_url:
            out.append(("url", ev.cover_url))
        out += [("url", u) for u in ev.frame_urls]
        return out[: self.max_images]

    def start(self, events: list[UploadEvent]) -> PendingImages:
        futures = [
            [self.fetcher.submit(kind, data) for kind, data in self.sources(ev)] for ev in events
        ]
        return PendingImages(futures, [self.sources(ev) for ev in events])

    def finish(self, pending: PendingImages) -> ImageBatch:
        """Wait (at most `wait_s` from now) for the fetches, count each by result, embed the
        images; a fetch still running then counts as `timeout` and is not waited for."""
        t0 = time.perf_counter()
        n = sum(len(f) for f in pending.futures)
        rounds = max(1, -(-n // self.concurrency))
        deadline = time.monotonic() + min(self.wait_s * rounds, max(self.wait_s, MAX_BATCH_WAIT_S))
        images: list[Image] = []
        owner: list[int] = []
        used = [0] * len(pending.futures)
        failed = [0] * len(pending.futures)
        reasons: list[list[str]] = [[] for _ in pending.futures]
        urls: list[list[str]] = [[] for _ in pending.futures]
        permanent = [False] * len(pending.futures)
        for i, futs in enumerate(pending.futures):
            for fut, (kind, _data) in zip(futs, pending.sources[i], strict=True):
                try:
                    got = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                except FutureTimeout:
                    fut.cancel()
                    got = Fetched(None, "timeout", "still fetching when the batch's wait ended")
                except Exception as e:  # the fetcher never raises; if it does, the item goes on
                    got = Fetched(None, "error", repr(e))
                if got.image is not None:
                    images.append(got.image)
                    owner.append(i)
                    if kind == "url" and got.url:
                        urls[i].append(got.url)
                else:
                    failed[i] += 1
                    reasons[i].append(got.reason or "error")
                    permanent[i] = permanent[i] or got.permanent
                    self.metrics.image_fetches.labels(result=got.reason or "error").inc()
        t1 = time.perf_counter()
        self.metrics.stage_seconds.labels(stage="image_wait").observe(t1 - t0)
        emb = np.zeros((len(pending.futures), self.encoder.dim), dtype=np.float32)
        vecs, ok = self._encode(images)
        for i, good in zip(owner, ok, strict=True):
            if good:
                used[i] += 1
                self.metrics.image_fetches.labels(result="ok").inc()
            else:  # fetched, but the image model could not read it
                failed[i] += 1
                reasons[i].append("encode_error")
                permanent[i] = True
                self.metrics.image_fetches.labels(result="encode_error").inc()
        if images:
            rows = [o for o, good in zip(owner, ok, strict=True) if good]
            if rows:
                np.add.at(emb, np.asarray(rows), vecs[np.asarray(ok)])
            norms = np.linalg.norm(emb, axis=1, keepdims=True)
            norms[norms == 0] = 1.0
            emb = (emb / norms).astype(np.float32)
            self.metrics.stage_seconds.labels(stage="image_encode").observe(
                time.perf_counter() - t1
            )
        return ImageBatch(emb, used, failed, reasons, urls, permanent)

    def _encode(self, images: list[Image]) -> tuple[npt.NDArray[np.float32], list[bool]]:
        """All at once; if that fails, one by one, so one image the model cannot read costs
        only itself (the others' vectors stand)."""
        out = np.zeros((len(images), self.encoder.dim), dtype=np.float32)
        if not images:
            return out, []
        with self._lock:
            try:
                return self.encoder.encode_images(images), [True] * len(images)
            except Exception as e:
                log.warning("image_batch_encode_failed", error=repr(e), images=len(images))
            # the model itself broken (it fails a plain image too) is no image's fault: raise,
            # so the core's canary stops the service instead of failing every image item
            self.encoder.encode_images([_plain_image()])
            ok = []
            for k, im in enumerate(images):
                try:
                    out[k] = self.encoder.encode_images([im])[0]
                    ok.append(True)
                except Exception:
                    ok.append(False)
            if not all(ok):  # a model that broke meanwhile is still no image's fault
                self.encoder.encode_images([_plain_image()])
        return out, ok

    def check(self) -> None:
        """The image model reads a plain image (the core's canary: a broken visual tower is
        the service's fault, not the items')."""
        with self._lock:
            self.encoder.encode_images([_plain_image()])


def _plain_image() -> Image:
    from PIL import Image as PILImage

    return PILImage.new("RGB", (64, 48), (120, 90, 60))
