"""The image path end to end: broker → fetch (a local HTTP server) → a tiny CLIP exported
through the real export path → fused shortlist → tag events with `image` sources; every
fetch fault counted and nothing lost; an item with nothing to tag it by dead-lettered."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from consumer.tagging.core import NoContentError, TaggingCore
from consumer.tagging.events import UploadEvent, load_schema
from consumer.tagging.image_stage import ImageStage
from consumer.tagging.images import FetchPolicy
from consumer.tagging.metrics import Metrics
from models_onnx import OnnxEncoder
from models_onnx.clip import ClipEncoder, export_clip, write_tiny_clip
from tagsys import ImageSpace, TagSystem
from tagsys.errors import EncoderMismatchError
from tests.conftest import FakeOpenAI, Responder, answer_first, cli_exit
from tests.kafka_helpers import KafkaKit, metric


def _png(color: str = "red", size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A real PNG of 3000 x 3000 one-bit pixels: a few KB on the wire, 9 M pixels decoded."""
    buf = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buf, "PNG")
    return buf.getvalue()


BOMB = _bomb()


HITS: dict[str, int] = {}  # requests per path, over the module
HITS_LOCK = threading.Lock()


class _Media(BaseHTTPRequestHandler):
    def log_message(self, *a: Any) -> None:
        pass

    def _send(self, body: bytes, ctype: str = "image/png", code: int = 200) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path
        with HITS_LOCK:
            HITS[path] = HITS.get(path, 0) + 1
        if path.startswith("/cover"):
            self._send(_png("blue" if "blue" in path else "red"))
        elif path == "/slow":
            time.sleep(3)
            self._send(_png())
        elif path == "/big":
            self._send(b"\x89PNG\r\n\x1a\n" + b"\0" * 200_000)
        elif path in ("/gone", "/busy"):
            self._send(b"", code=404 if path == "/gone" else 503)
        elif path == "/page":
            self._send(b"<html>not an image</html>", "text/html")
        elif path == "/bomb":
            self._send(BOMB)
        elif path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/to-cover":
            self.send_response(302)
            self.send_header("Location", "/cover-blue.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(b"", code=404)


@pytest.fixture(scope="module")
def media() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Media)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> ClipEncoder:
    """A tiny CLIP (random weights) through the real export: proves the path, not the tags."""
    root = tmp_path_factory.mktemp("clip")
    export_clip(write_tiny_clip(root / "ckpt"), root / "tiny-clip", name="tiny-clip")
    return ClipEncoder(root / "tiny-clip", device="cpu")


def _with_images(ts: TagSystem, clip: ClipEncoder, shift: float) -> TagSystem:
    from dataclasses import replace

    emb = clip.encode_texts([f"a photo of {t.name}." for t in ts.tags])
    # shift: image scores raised above any text score, so the image decides where it has one
    return replace(ts, image=ImageSpace(model=clip.name, embeddings=emb, shift=shift))


def _core(
    encoder: OnnxEncoder, ts: TagSystem, clip: ClipEncoder, media: str, **kw: Any
) -> TaggingCore:
    policy = FetchPolicy(
        hosts=(media.removeprefix("http://"),),  # 127.0.0.1:<port>
        schemes=("http",),
        connect_timeout_s=0.5,
        read_timeout_s=1.0,
        max_bytes=50_000,
        max_pixels=1_000_000,
    )
    metrics = Metrics(CollectorRegistry())
    stage = ImageStage(clip, policy, metrics)
    return TaggingCore(encoder, ts, metrics=metrics, images=stage, **kw)


FAULTS = {  # path -> the reason it is counted under
    "/slow": "timeout",
    "/big": "too_large",
    "/page": "content_type",
    "/bomb": "bomb",
    "/to-metadata": "redirect",
}


@pytest.mark.broker
def test_images_travel_from_the_broker_to_tag_events_and_faults_lose_nothing(
    kafka: KafkaKit,
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    clip: ClipEncoder,
    media: str,
) -> None:
    ts = _with_images(sample_ts, clip, shift=5.0)
    core = _core(encoder, ts, clip, media)
    cover_b64 = base64.b64encode(_png("green")).decode()
    events: list[dict[str, Any]] = [
        {"id": "cover", "title": "my afternoon", "cover_url": f"{media}/cover.png"},
        {
            "id": "frames",
            "title": "a walk",
            "cover_url": f"{media}/cover.png",
            "frame_urls": [f"{media}/to-cover", f"{media}/cover-blue.png"],
        },
        {"id": "inline", "caption": "look at this", "cover_b64": cover_b64},
        {"id": "image-only", "cover_url": f"{media}/cover.png"},
        {"id": "text-only", "title": "Sourdough bread recipe"},
        {"id": "other-host", "title": "coffee", "cover_url": "http://media.invalid/c.png"},
        *(
            {"id": f"fault{path}", "title": "latte art", "cover_url": f"{media}{path}"}
            for path in FAULTS
        ),
        {"id": "nothing", "cover_url": f"{media}/page"},  # no text, no usable image
    ]
    kafka.topics(1)
    kafka.send([orjson.dumps(e) for e in events])
    s = kafka.settings(batch_size=4)
    with kafka.serve(s, core):
        out = kafka.read("tags", expect=len(events) - 1, timeout_s=90)
        dlq = kafka.read("uploads.dlq", expect=1)
        committed = kafka.committed(s.group_id, 1)
    schema = load_schema("tag-event")
    got = {}
    for m in out:
        payload = orjson.loads(m.value())
        jsonschema.validate(payload, schema)
        got[payload["id"]] = payload
    assert set(got) == {e["id"] for e in events} - {"nothing"}
    sources = {k: {t["source"] for t in v["tags"]} for k, v in got.items()}
    for item in ("cover", "frames", "inline", "image-only"):
        assert sources[item] == {"image"}, item  # the image's score decided
    assert got["frames"]["inputs"] == {"text": True, "images": 3, "images_failed": 0}
    assert got["image-only"]["inputs"] == {"text": False, "images": 1, "images_failed": 0}
    assert got["inline"]["inputs"]["images"] == 1
    for item in ("text-only", "other-host", *(f"fault{p}" for p in FAULTS)):
        assert sources[item] <= {"encoder"} and got[item]["tags"], item  # tagged by its text
    assert got["text-only"]["inputs"] == {"text": True, "images": 0, "images_failed": 0}
    assert got["fault/slow"]["inputs"] == {"text": True, "images": 0, "images_failed": 1}
    [dead] = dlq
    headers = dict(dead.headers())
    assert dead.key() == b"nothing" and headers["__tagstream.errors.reason"] == b"no_content"
    assert b"content_type" in headers["__connect.errors.exception.message"]
    assert committed == len(events)  # every input accounted for: tagged or dead-lettered
    counted = {
        r: metric(core, "tagstream_image_fetches_total", {"result": r}) for r in FAULTS.values()
    }
    assert counted == {r: 1.0 for r in FAULTS.values()} | {"content_type": 2.0}
    assert metric(core, "tagstream_image_fetches_total", {"result": "host"}) == 1
    assert metric(core, "tagstream_image_fetches_total", {"result": "ok"}) == 6
    assert metric(core, "tagstream_events_consumed_total", {"outcome": "no_content"}) == 1
    core.close()


def test_fetches_overlap_the_encoder_and_a_slow_host_costs_one_budget(
    encoder: OnnxEncoder, sample_ts: TagSystem, clip: ClipEncoder, media: str
) -> None:
    """Fetches start when the batch is prepared; the encode thread waits for them only after
    the text, and for one round of fetches (as many as run at once) no longer than one
    fetch's budget, however slow the host."""
    core = _core(encoder, _with_images(sample_ts, clip, shift=0.0), clip, media)
    evs = [UploadEvent(id=f"s{i}", title="tea", cover_url=f"{media}/slow") for i in range(8)]
    t0 = time.monotonic()
    prep = core.prepare(evs)
    assert time.monotonic() - t0 < 0.5  # prepare only starts the fetches
    time.sleep(1.2)  # the encoder busy with the batch before: the fetches run out meanwhile
    t1 = time.monotonic()
    emb = core.encode_prepared(prep)
    waited = time.monotonic() - t1
    assert prep.images is not None and prep.images.failed == [1] * 8
    assert waited < 1.0  # their budget was spent while "the encoder worked"
    res = core.decide(evs, emb, prep.texts, images=prep.images)
    assert all(r.inputs == {"text": True, "images": 0, "images_failed": 1} for r in res)
    core.close()


def test_an_image_model_the_tag_system_was_not_embedded_with_is_refused(
    encoder: OnnxEncoder, sample_ts: TagSystem, clip: ClipEncoder, media: str
) -> None:
    with pytest.raises(EncoderMismatchError, match="no image embeddings"):
        _core(encoder, sample_ts, clip, media)
    other = ImageSpace(model="another-clip", embeddings=np.ones((len(sample_ts.tags), clip.dim)))
    from dataclasses import replace

    with pytest.raises(EncoderMismatchError, match="another-clip"):
        _core(encoder, replace(sample_ts, image=other), clip, media)
    # swapping to such a version raises (the watcher refuses it first: test_reload.py)
    core = _core(encoder, _with_images(sample_ts, clip, 0.0), clip, media)
    with pytest.raises(EncoderMismatchError):
        core.swap_tag_system(replace(sample_ts, image=other))
    core.close()


def test_no_text_and_no_image_model_is_no_content(
    encoder: OnnxEncoder, sample_ts: TagSystem
) -> None:
    core = TaggingCore(encoder, sample_ts, metrics=Metrics(CollectorRegistry()))
    [res] = core.process_isolating([UploadEvent(id="x", cover_url="https://cdn.example/c.png")])
    assert isinstance(res, NoContentError) and "no image model" in str(res)
    [ok] = core.process_isolating([UploadEvent(id="y", title="coffee")])
    assert not isinstance(ok, BaseException) and ok.inputs is None  # text only: as before
    core.close()


def test_image_settings_without_an_image_model_stop_run_with_exit_3(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TAGSTREAM_IMAGE_HOSTS", "cdn.example.com")
    assert cli_exit(["run", "--bootstrap-servers", "127.0.0.1:1"]) == 3


def test_the_llm_is_told_the_images_top_tags_or_given_only_checked_urls(
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    clip: ClipEncoder,
    media: str,
    fake_llm: Callable[[Responder], FakeOpenAI],
) -> None:
    """--llm-images sends the endpoint only URLs this service fetched through its own checks:
    an event's URL to the metadata address (or any refused one) never reaches it."""
    from consumer.tagging.llm import SelectiveTagger

    server = fake_llm(answer_first)
    ts = _with_images(sample_ts, clip, shift=0.0)
    cover = base64.b64encode(_png("green")).decode()
    refused = "http://169.254.169.254/latest/meta-data/"
    ev = UploadEvent(
        id="m1",
        title="weekend",
        cover_b64=cover,
        frame_urls=[refused, f"{media}/to-metadata", f"{media}/cover.png"],
    )
    for llm_images in (False, True):
        metrics = Metrics(CollectorRegistry())
        tagger = SelectiveTagger(server.base_url, "fake", SecretStr(""), metrics=metrics)
        core = _core(
            encoder, ts, clip, media, tagger=tagger, llm_images=llm_images, emit_embedding=True
        )
        [res] = core.process([ev])
        payload = core.to_payload(res)
        assert len(payload["image_embedding"]) == clip.dim
        assert payload["inputs"] == {"text": True, "images": 2, "images_failed": 2}
        user = server.requests[-1]["messages"][1]["content"]
        if not llm_images:  # the image's own top tags, as data in the item
            item = orjson.loads(user.split("\n", 1)[1].split("\n\nShortlist:")[0])
            assert item["image_looks_like"] == res.image_tags and len(res.image_tags) == 3
        else:  # a multimodal endpoint gets the one URL that passed (never the inline bytes)
            assert [p["type"] for p in user] == ["text", "image_url"]
            assert user[1]["image_url"]["url"] == f"{media}/cover.png"
            assert refused not in orjson.dumps(server.requests[-1]).decode()
        # the literal metadata address is no listed host; the redirect to it is refused too
        assert metric(core, "tagstream_image_fetches_total", {"result": "host"}) == 1
        assert metric(core, "tagstream_image_fetches_total", {"result": "redirect"}) == 1
        core.close()


def test_a_poison_item_is_isolated_without_fetching_the_batch_again(
    encoder: OnnxEncoder, sample_ts: TagSystem, clip: ClipEncoder, media: str
) -> None:
    """One item fails the batch: the others are decided one by one with the images the
    batch already fetched (one wait per batch, not one per item)."""

    class Poisoned(TaggingCore):
        def decide(self, events: list[UploadEvent], *a: Any, **kw: Any) -> Any:
            if any(e.id == "poison" for e in events):
                raise ValueError("poison")
            return super().decide(events, *a, **kw)

    policy = FetchPolicy(hosts=(media.removeprefix("http://"),), schemes=("http",))
    metrics = Metrics(CollectorRegistry())
    core = Poisoned(
        encoder,
        _with_images(sample_ts, clip, shift=5.0),
        metrics=metrics,
        images=ImageStage(clip, policy, metrics),
    )
    paths = [f"/cover-isolate-{i}.png" for i in range(4)]
    evs = [UploadEvent(id=f"i{i}", cover_url=f"{media}{p}") for i, p in enumerate(paths)]
    evs.insert(2, UploadEvent(id="poison", title="x"))
    out = core.process_isolating(evs)
    assert isinstance(out[2], ValueError)
    ok = [r for r in out if not isinstance(r, BaseException)]
    assert len(ok) == 4 and all({t[2] for t in r.tags} == {"image"} for r in ok)
    assert [HITS[p] for p in paths] == [1, 1, 1, 1]  # fetched once, with the batch
    core.close()


def test_a_broken_image_model_stops_the_service_and_a_bad_image_costs_only_itself(
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    clip: ClipEncoder,
    media: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from consumer.tagging.core import CoreBrokenError

    core = _core(encoder, _with_images(sample_ts, clip, shift=0.0), clip, media)
    cover = base64.b64encode(_png("green")).decode()
    odd = base64.b64encode(_png("red", (97, 31))).decode()
    real = clip.encode_images

    def fails_on_odd(images: list[Any], **kw: Any) -> Any:
        if any(im.size == (97, 31) for im in images):
            raise RuntimeError("the model cannot read this one")
        return real(images, **kw)

    monkeypatch.setattr(clip, "encode_images", fails_on_odd)
    evs = [
        UploadEvent(id="a", title="tea", cover_b64=cover),
        UploadEvent(id="b", title="tea", cover_b64=odd),
        UploadEvent(id="c", cover_b64=odd),  # nothing the model can read: dead-lettered
    ]
    a, b, c = core.process_isolating(evs)
    assert not isinstance(a, BaseException) and a.inputs == {
        "text": True,
        "images": 1,
        "images_failed": 0,
    }
    assert not isinstance(b, BaseException) and b.inputs is not None
    assert b.inputs["images_failed"] == 1
    assert isinstance(c, NoContentError) and c.reason == "no_content"

    def broken(images: list[Any], **kw: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(clip, "encode_images", broken)
    with pytest.raises(CoreBrokenError):  # not the items' fault: nothing dead-lettered
        core.process_isolating([UploadEvent(id="d", title="tea", cover_b64=cover)])
    # the canary itself tries the image model: a batch that failed before it was prepared
    # is not isolated into dead letters item by item either
    with pytest.raises(CoreBrokenError):
        core.isolate([UploadEvent(id="e", title="tea", cover_b64=cover)], RuntimeError("x"))
    core.close()


def test_an_image_only_item_whose_store_timed_out_is_replayable_not_no_content(
    encoder: OnnxEncoder, sample_ts: TagSystem, clip: ClipEncoder, media: str
) -> None:
    core = _core(encoder, _with_images(sample_ts, clip, shift=0.0), clip, media)
    got = core.process_isolating(
        [UploadEvent(id=p, cover_url=f"{media}/{p}") for p in ("slow", "busy", "gone", "page")]
    )
    assert all(isinstance(r, NoContentError) for r in got)
    reasons = [r.reason for r in got if isinstance(r, NoContentError)]
    # the store's fault (a timeout, a 503): replayable; the item's (a 404, not an image): not
    assert reasons == ["image_unavailable", "image_unavailable", "no_content", "no_content"]
    core.close()


def test_a_batch_that_fails_to_tokenize_is_isolated_with_the_images_it_fetched(
    encoder: OnnxEncoder,
    sample_ts: TagSystem,
    clip: ClipEncoder,
    media: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tokenizing fails for the batch (before the encoder ran): its fetches had started with
    it, so the items are decided one by one with those images, each fetched once."""
    core = _core(encoder, _with_images(sample_ts, clip, shift=5.0), clip, media)
    real = core.encoder.tokenize_sorted

    def fails_for_batches(texts: list[str], **kw: Any) -> Any:
        if len(texts) > 1:
            raise RuntimeError("tokenizer fault")
        return real(texts, **kw)

    monkeypatch.setattr(core.encoder, "tokenize_sorted", fails_for_batches)
    paths = [f"/cover-tok-{i}.png" for i in range(3)]
    got = core.process_isolating(
        [UploadEvent(id=f"t{i}", cover_url=f"{media}{p}") for i, p in enumerate(paths)]
    )
    assert all(not isinstance(r, BaseException) and r.inputs["images"] == 1 for r in got)  # type: ignore[union-attr, index]
    assert [HITS[p] for p in paths] == [1, 1, 1]
    core.close()


def test_import_tags_embeds_the_tags_for_images_too(
    clip: ClipEncoder, model_dir: Path, tmp_path: Path
) -> None:
    vocab = tmp_path / "v.txt"
    vocab.write_text("dogs\nbeach holiday\ncoffee\n")
    out = tmp_path / "ts"
    argv = ["import-tags", str(vocab), "--format", "list", "--out", str(out)]
    argv += ["--model-dir", str(model_dir), "--image-model", str(clip.folder)]
    assert cli_exit(argv) in (0, None)
    ts = TagSystem.load(out)
    assert ts.image is not None and ts.image.model == clip.name and ts.image.rule == "max"
    assert ts.provenance["image_template"] == "a photo of {name}."
    want = clip.encode_texts(["a photo of beach holiday."])[0]
    assert float(ts.image.embeddings[ts.index_of("beach holiday")] @ want) > 0.999
    assert cli_exit([*argv[:-1], str(tmp_path / "no-such-model")]) == 3


def test_calibrate_fits_the_image_scale_on_labelled_items_with_images(
    clip: ClipEncoder, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """eval and calibrate read the items' images as the service does; calibrate fits the
    image scores onto the text's scale (on the fit part) before the gate, and records it."""
    labels = {"dogs": "white", "coffee": "brown", "beach holiday": "yellow", "baking": "orange"}
    vocab = tmp_path / "v.txt"
    vocab.write_text("\n".join(labels) + "\n")
    ts_dir, out = tmp_path / "ts", tmp_path / "cal"
    common = ["--model-dir", str(model_dir), "--image-model", str(clip.folder)]
    imported = ["import-tags", str(vocab), "--format", "list", "--out", str(ts_dir), *common]
    assert cli_exit(imported) in (0, None)
    rows = []
    for i in range(48):
        label = list(labels)[i % 4]
        cover = base64.b64encode(_png(labels[label], (24 + i, 24))).decode()
        text = f"post {i} about {label}" if i % 3 else ""  # a third have only the image
        rows.append({"id": str(i), "title": text, "cover_b64": cover, "labels": [label]})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(orjson.dumps(r).decode() + "\n" for r in rows))
    argv = ["calibrate", "--data", str(data), "--format", "jsonl", "--tag-system", str(ts_dir)]
    assert cli_exit([*argv, "--out", str(out), *common, "--json"]) in (0, None)
    res = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fit = res["image_fusion"]
    assert fit["pairs"] > 0 and fit["positives"] == 24  # the fit half, one gold tag each
    cal = TagSystem.load(out)
    assert cal.image is not None and (cal.image.scale, cal.image.shift) == (
        fit["scale"],
        fit["shift"],
    )
    assert cal.provenance["image_fusion"]["fitted_on"] == 24
    # without an image model the image-only items have nothing to be scored by
    from consumer.tools.evaluate import run_eval

    text_run = run_eval(data, "jsonl", tag_system=ts_dir, model_dir=model_dir)
    assert len(text_run.outcomes) == 32 and text_run.dataset.skipped["no_text"] == 16
