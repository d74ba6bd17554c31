"""Hot reload of the tag system: a running consumer picks up a new version between batches.

The watcher polls the tag-system folder (cheap `stat` calls) and loads a changed artifact
completely before anything switches: a half-written, altered or mismatched artifact is
refused, the old version stays, and `tagstream_tag_system_reloads_total{result="error"}`
counts it. Publish a new version by writing it to a new folder and renaming it into place
(or re-pointing a symlink): a rename is atomic, an in-place copy is seen half-done (and
refused until it is complete).

Whatever a half-written file makes the loader raise (`EOFError` from an empty `.npy`,
`zipfile.BadZipFile` from a partial `.npz`, a `ValueError`, ...), it is a refused reload and
never an exception out of `poll`: the service must keep tagging with the version it has.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from consumer.tagging.metrics import Metrics
from tagsys import TagSystem
from tagsys.tagsystem import BIAS_FILE, EMB_FILE, HEAD_FILE, IMAGE_EMB_FILE, META_FILE

log = structlog.get_logger(__name__)
Signature = tuple[tuple[str, int, int, int], ...]


def signature(folder: Path) -> Signature:
    """(name, inode, size, mtime) of every artifact file; changes when any file does."""
    out = []
    real = Path(os.path.realpath(folder))
    for name in (META_FILE, EMB_FILE, BIAS_FILE, HEAD_FILE, IMAGE_EMB_FILE):
        try:
            st = (real / name).stat()
        except OSError:
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class TagSystemWatcher:
    def __init__(
        self, folder: Path, current: TagSystem, metrics: Metrics, interval_s: float = 5.0
    ) -> None:
        self.folder = folder
        self.metrics = metrics
        self.interval_s = interval_s
        self.current_hash = current.content_hash
        self._seen = signature(folder)
        self._next = time.monotonic() + interval_s

    def poll(
        self, encoder_name: str, dim: int, image_model: tuple[str, int] | None = None
    ) -> TagSystem | None:
        """A new, complete, compatible version when one appeared since the last poll;
        `image_model` (name, dim): the running image model, which the version must match."""
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.interval_s
        sig = signature(self.folder)
        if sig == self._seen:
            return None
        self._seen = sig  # a refused artifact is tried again only once it changes again
        try:
            ts = TagSystem.load(self.folder)
            ts.check_encoder(encoder_name, dim)
            if image_model is not None:
                ts.check_image_model(*image_model)
        except Exception as e:  # a half-written file fails in many ways; all are refusals
            self.metrics.tag_system_reloads.labels(result="error").inc()
            log.error(
                "tag_system_reload_refused",
                path=str(self.folder),
                error=str(e) or repr(e),
                error_type=type(e).__name__,
            )
            return None
        if ts.content_hash == self.current_hash:
            return None  # touched, not changed
        self.current_hash = ts.content_hash
        self.metrics.tag_system_reloads.labels(result="ok").inc()
        # gate_trusted false: this version auto-accepts nothing (never fitted, or short of
        # its target), so every item goes to the LLM
        log.info(
            "tag_system_reloaded",
            path=str(self.folder),
            version=ts.version_id,
            gate_trusted=ts.gate_fitted,
        )
        return ts
