"""Hot reload refuses a half-written artifact, whatever the loader raises, and keeps going."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from consumer.service.reload import TagSystemWatcher
from consumer.tagging.metrics import Metrics
from tagsys import Tag, TagSystem
from tagsys.distill import Head
from tagsys.tagsystem import BIAS_FILE, EMB_FILE, HEAD_FILE, META_FILE

ENCODER, DIM = "toy-encoder", 4


def _full_ts(version: str = "1") -> TagSystem:
    """A tag system with every file the artifact can have: meta, embeddings, bias, head."""
    rng = np.random.default_rng(0)
    n = 3
    return TagSystem(
        name="toy",
        version=version,
        encoder=ENCODER,
        tags=[Tag(id=f"t{i}", name=f"tag {i}") for i in range(n)],
        embeddings=rng.standard_normal((n, DIM)).astype(np.float32),
        bias=np.full(n, 0.01, dtype=np.float32),
        head=Head(
            rng.standard_normal((n, DIM)).astype(np.float32),
            np.zeros(n, dtype=np.float32),
            "softmax",
        ),
    )


def _errors(metrics: Metrics) -> float:
    return float(metrics.tag_system_reloads.labels(result="error")._value.get())


@pytest.mark.parametrize("fraction", [0.0, 0.5], ids=["empty", "half"])
@pytest.mark.parametrize("name", [META_FILE, EMB_FILE, BIAS_FILE, HEAD_FILE])
def test_a_truncated_file_is_a_refused_reload_not_a_crash(
    name: str, fraction: float, tmp_path: Path
) -> None:
    v1 = _full_ts("1")
    live = v1.save(tmp_path / "live")
    assert {p.name for p in live.iterdir()} == {META_FILE, EMB_FILE, BIAS_FILE, HEAD_FILE}
    metrics = Metrics(CollectorRegistry())
    watcher = TagSystemWatcher(live, TagSystem.load(live), metrics, interval_s=0.0)
    assert watcher.poll(ENCODER, DIM) is None  # nothing changed yet
    # a new version being copied in place, seen with one file half-written
    v2 = _full_ts("2")
    staged = v2.save(tmp_path / "staged")
    shutil.copytree(staged, live, dirs_exist_ok=True)
    path = live / name
    os.truncate(path, int(path.stat().st_size * fraction))
    with capture_logs() as logs:
        assert watcher.poll(ENCODER, DIM) is None
    assert _errors(metrics) == 1
    (refused,) = [e for e in logs if e["event"] == "tag_system_reload_refused"]
    assert refused["log_level"] == "error" and refused["error"] and refused["error_type"]
    assert watcher.current_hash == v1.content_hash  # the old version stays
    assert watcher.poll(ENCODER, DIM) is None and _errors(metrics) == 1  # not retried unchanged
    # the copy completes: the new version is accepted
    shutil.copyfile(staged / name, path)
    new = watcher.poll(ENCODER, DIM)
    assert new is not None and new.content_hash == v2.content_hash
    assert metrics.tag_system_reloads.labels(result="ok")._value.get() == 1
    assert _errors(metrics) == 1


def test_a_version_for_another_encoder_is_refused(tmp_path: Path) -> None:
    v1 = _full_ts("1")
    live = v1.save(tmp_path / "live")
    metrics = Metrics(CollectorRegistry())
    watcher = TagSystemWatcher(live, v1, metrics, interval_s=0.0)
    replace(_full_ts("2"), encoder="other").save(live)
    assert watcher.poll(ENCODER, DIM) is None
    assert _errors(metrics) == 1 and watcher.current_hash == v1.content_hash


def test_a_version_for_another_image_model_is_refused_not_a_crash(tmp_path: Path) -> None:
    """A running image model the new version's image space was not made with: refused at
    hot reload (the old version stays), as an encoder mismatch is; and a change to the image
    embeddings alone is seen."""
    from tagsys import ImageSpace

    def with_image(version: str, model: str, seed: int) -> TagSystem:
        ts = _full_ts(version)
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(len(ts.tags), 8)).astype(np.float32)
        return replace(ts, image=ImageSpace(model=model, embeddings=emb))

    live = with_image("1", "clip-a", 0).save(tmp_path / "live")
    metrics = Metrics(CollectorRegistry())
    watcher = TagSystemWatcher(live, TagSystem.load(live), metrics, interval_s=0.0)
    with_image("2", "clip-b", 0).save(live)
    assert watcher.poll(ENCODER, DIM, ("clip-a", 8)) is None and _errors(metrics) == 1
    # a publish that writes the meta file first, the image embeddings after: the first poll
    # sees a mismatch (refused), the second the complete version, found through the image
    # file's change alone
    v3 = with_image("3", "clip-a", 1)
    v3.save(tmp_path / "v3")
    shutil.copy(tmp_path / "v3" / META_FILE, live / META_FILE)
    assert watcher.poll(ENCODER, DIM, ("clip-a", 8)) is None and _errors(metrics) == 2
    shutil.copy(tmp_path / "v3" / "image_embeddings.npy", live / "image_embeddings.npy")
    new = watcher.poll(ENCODER, DIM, ("clip-a", 8))
    assert new is not None and new.content_hash == v3.content_hash
