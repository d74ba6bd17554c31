"""`tagstream bench`: where the time goes, measured in one run on the same items.

(a) bare encoder throughput (tokenize + encode, no Kafka); (b) end-to-end throughput through
the embedded broker with the LLM off; their ratio, split into the share of the end-to-end
time the encoder was running (idle gaps are the pipeline's fault) and its own rate meanwhile
(a slower encoder is contention for the cores); the same without the pipeline (batches one
after another), and with a zero-cost encoder (the ceiling of everything around the encoder);
(c) end-to-end latency percentiles at a
fixed offered rate; (d) PyTorch (transformers, fp32, mean pooling — what sentence-transformers
runs) on the same items when torch is installed; (e) shortlist time per item against a
vocabulary the size of TagGPT's (40,238 tags).

(d), (a) and (b) run in rounds — PyTorch, encoder, end to end, again — and the ratios are
the median of each round's own ratio: a shared machine's speed drifts within a minute by
more than the 10% the goals are about, so two figures taken minutes apart would compare the
machine, not the code.
"""

from __future__ import annotations

import csv
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from consumer.service.runner import KafkaService
from consumer.tagging.core import Prepared, TaggingCore
from consumer.tagging.events import decode, event_text
from consumer.tagging.metrics import Metrics
from consumer.tools.broker import EmbeddedBroker, create_topics
from consumer.tools.demo import sample_events
from models_onnx import OnnxEncoder
from tagsys import TagSystem, shortlist

TAGGPT_TAGS = 40238  # lines in TagGPT's final_tags.csv


def shared_data_dir() -> Path | None:
    """../shared/data next to the working directory or next to the repository."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        d = base.parent / "shared" / "data"
        if d.is_dir():
            return d
    return None


def load_items(n: int, data: Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """Real questions from StackExchange cooking when the shared data is there, else the
    demo's sample events (repeated)."""
    data = data or shared_data_dir()
    cooking = data / "stackexchange" / "cooking.csv" if data else None
    items: list[dict[str, Any]] = []
    if cooking and cooking.is_file():
        with cooking.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f)):
                if len(items) >= n:
                    break
                items.append({"id": f"se-{i}", "title": row["title"], "caption": row["content"]})
        source = str(cooking)
    else:
        source = "sample events"
    base = [orjson.loads(line) for line in sample_events()]
    i = 0
    while len(items) < n:  # top up (or fill) with the sample events
        ev = dict(base[i % len(base)])
        ev["id"] = f"s-{i}"
        items.append(ev)
        i += 1
    return items[:n], source


@dataclass
class BenchResult:
    items: int
    source: str
    encoder: str
    batch_size: int
    encoder_runs: list[float]
    e2e_runs: list[float]
    e2e_busy_runs: list[float]
    latency_rate_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    torch_runs: list[float] | None
    shortlist_ms_per_item_40k: float
    shortlist_numpy_ms_per_item_40k: float | None = None
    e2e_no_pipeline_items_per_s: float | None = None
    e2e_ceiling_items_per_s: float | None = None
    batch_tokens_sweep: dict[int, float] | None = None
    tag_system: str = ""
    scoring_ms_per_item: float | None = None
    images: dict[str, Any] | None = None  # `--image-model`: the image path's runs

    @property
    def encoder_items_per_s(self) -> float:
        return statistics.median(self.encoder_runs)

    @property
    def e2e_items_per_s(self) -> float:
        return statistics.median(self.e2e_runs)

    @property
    def e2e_encoder_busy_fraction(self) -> float:
        return statistics.median(self.e2e_busy_runs)

    @property
    def e2e_encode_items_per_s(self) -> float:
        """The encoder's own rate inside the end-to-end runs (items / seconds it ran):
        against `encoder_items_per_s`, how much the work around it slowed it down. NaN (null
        in JSON) when no run saw the encoder work, instead of failing after every phase ran."""
        inner = [e / b for e, b in zip(self.e2e_runs, self.e2e_busy_runs, strict=True) if b > 0]
        return statistics.median(inner) if inner else float("nan")

    @property
    def torch_items_per_s(self) -> float | None:
        return statistics.median(self.torch_runs) if self.torch_runs else None

    @property
    def e2e_to_encoder_ratio(self) -> float:
        """Median of the rounds' own ratios: each pair ran seconds apart."""
        return statistics.median(
            e / c for e, c in zip(self.e2e_runs, self.encoder_runs, strict=True)
        )

    @property
    def torch_speedup(self) -> float | None:
        if not self.torch_runs:
            return None
        return statistics.median(
            c / t for c, t in zip(self.encoder_runs, self.torch_runs, strict=True)
        )

    @property
    def scoring_to_encoder_time(self) -> float | None:
        """The tag system's scoring time per item over the bare encoder's: what a distilled
        head (and its n-grams) adds to the encoder's work."""
        if self.scoring_ms_per_item is None or not self.encoder_items_per_s:
            return None
        return self.scoring_ms_per_item / (1000.0 / self.encoder_items_per_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "encoder_items_per_s": round(self.encoder_items_per_s, 1),
            "e2e_items_per_s": round(self.e2e_items_per_s, 1),
            "e2e_to_encoder_ratio": round(self.e2e_to_encoder_ratio, 3),
            # e2e / encoder = busy fraction x (encode rate inside e2e / bare encoder rate)
            "e2e_encoder_busy_fraction": round(self.e2e_encoder_busy_fraction, 3),
            "e2e_encode_items_per_s": round(self.e2e_encode_items_per_s, 1),
            # the same run with `--no-pipeline` (batches one after another), for comparison
            "e2e_no_pipeline_items_per_s": (
                None
                if self.e2e_no_pipeline_items_per_s is None
                else round(self.e2e_no_pipeline_items_per_s, 1)
            ),
            # everything but the encoder (decode, tokenize, gate, produce, commit): the most a
            # faster encoder (a GPU) could give with this many CPU cores
            "e2e_ceiling_items_per_s": (
                None
                if self.e2e_ceiling_items_per_s is None
                else round(self.e2e_ceiling_items_per_s, 1)
            ),
            "latency_p50_ms": round(self.latency_p50_ms, 1),
            "latency_p95_ms": round(self.latency_p95_ms, 1),
            "latency_p99_ms": round(self.latency_p99_ms, 1),
            "latency_rate_per_s": round(self.latency_rate_per_s, 1),
            "torch_items_per_s": (
                None if self.torch_items_per_s is None else round(self.torch_items_per_s, 1)
            ),
            "torch_speedup": None if self.torch_speedup is None else round(self.torch_speedup, 2),
            "shortlist_ms_per_item_40k": round(self.shortlist_ms_per_item_40k, 4),
            "shortlist_numpy_ms_per_item_40k": (
                None
                if self.shortlist_numpy_ms_per_item_40k is None
                else round(self.shortlist_numpy_ms_per_item_40k, 4)
            ),
            # shortlist (head or cosine, lexical boost) of the tag system the e2e runs used
            "tag_system": self.tag_system,
            "scoring_ms_per_item": (
                None if self.scoring_ms_per_item is None else round(self.scoring_ms_per_item, 4)
            ),
            "scoring_to_encoder_time": (
                None
                if self.scoring_to_encoder_time is None
                else round(self.scoring_to_encoder_time, 3)
            ),
            "rounds": len(self.encoder_runs),
            "encoder_runs": [round(v, 1) for v in self.encoder_runs],
            "e2e_runs": [round(v, 1) for v in self.e2e_runs],
            "e2e_busy_runs": [round(v, 3) for v in self.e2e_busy_runs],
            "torch_runs": None
            if self.torch_runs is None
            else [round(v, 1) for v in self.torch_runs],
            "items": self.items,
            "batch_size": self.batch_size,
            "encoder": self.encoder,
            "source": self.source,
            **(
                {
                    "batch_tokens_sweep": {
                        str(k): round(v, 1) for k, v in self.batch_tokens_sweep.items()
                    }
                }
                if self.batch_tokens_sweep
                else {}
            ),
            **({"images": self.images} if self.images else {}),
        }


Step = Callable[[str, int], None]


def bench_encoder(
    encoder: OnnxEncoder,
    texts: list[str],
    batch_size: int,
    step: Step,
    max_batch_tokens: int | None = None,
) -> float:
    """Consumer-sized batches through the service's own path (length-sorted, token budget)."""
    encoder.encode(texts[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoder.encode(chunk, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
        step("encoder", len(chunk))
    return len(texts) / (time.perf_counter() - t0)


TorchRun = Callable[[Step], float]


def torch_runner(
    folder: str, texts: list[str], batch_size: int, max_length: int
) -> TorchRun | None:
    """Load the PyTorch model once; the returned function times one pass over `texts`.
    None when torch/transformers are not installed."""
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(folder)  # type: ignore[no-untyped-call]
    model = AutoModel.from_pretrained(folder).eval()

    def run(chunk: list[str]) -> None:
        enc = tok(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            out = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            v = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
            torch.nn.functional.normalize(v, dim=1)

    run(texts[:batch_size])
    # sentence-transformers' encode(): sort the whole list by length, then fixed-size batches
    # (its best case: offline, it sees every item at once; the service cannot)
    ordered = sorted(texts, key=len)

    def one_pass(step: Step) -> float:
        t0 = time.perf_counter()
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            run(chunk)
            step("torch", len(chunk))
        return len(texts) / (time.perf_counter() - t0)

    return one_pass


def bench_shortlist(
    dim: int, k: int, batch_size: int, rounds: int, step: Step
) -> tuple[float, float]:
    """ms per item against 40,238 unit tag vectors (the cost does not depend on the values):
    (the service's path, an ORT MatMul + TopK graph; the numpy reference)."""
    from models_onnx.matcher import OrtMatcher

    rng = np.random.default_rng(0)
    tags = rng.normal(size=(TAGGPT_TAGS, dim)).astype(np.float32)
    tags /= np.linalg.norm(tags, axis=1, keepdims=True)
    queries = rng.normal(size=(rounds, batch_size, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=2, keepdims=True)
    matcher = OrtMatcher(tags)
    out = []

    def ort_path(q: npt.NDArray[np.float32]) -> object:
        return matcher.top_k(q, k)

    def numpy_path(q: npt.NDArray[np.float32]) -> object:
        return shortlist(q, tags, k)

    for fn in (ort_path, numpy_path):
        fn(queries[0])  # warm-up
        t0 = time.perf_counter()
        for q in queries:
            fn(q)
            step("shortlist", len(q))
        out.append((time.perf_counter() - t0) * 1000 / (rounds * batch_size))
    return out[0], out[1]


def bench_scoring(
    core: TaggingCore, payloads: list[bytes], batch_size: int, rounds: int, step: Step
) -> float:
    """ms per item of the tag system's scoring alone, on embeddings made once: the median
    of `rounds` passes."""
    events = [decode(p) for p in payloads]
    texts = core.texts(events)
    emb = core.embed(events, texts)
    ts = core.tag_system
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for s in range(0, len(events), batch_size):
            ts.shortlist(emb[s : s + batch_size], texts[s : s + batch_size])
            step("scoring", min(batch_size, len(events) - s))
        runs.append((time.perf_counter() - t0) * 1000.0 / max(1, len(events)))
    return statistics.median(runs)


@contextmanager
def _service(
    broker: EmbeddedBroker, core: TaggingCore, batch_size: int, phase: str, pipeline: bool = True
) -> Iterator[KafkaService]:
    """A running service on topics of its own, `<phase>-in` and `<phase>-out`."""
    from consumer.tagging.config import Settings

    create_topics(broker.bootstrap, {f"{phase}-in": 3, f"{phase}-out": 3, f"{phase}-in.dlq": 1})
    s = Settings(
        bootstrap_servers=broker.bootstrap,
        input_topic=f"{phase}-in",
        output_topic=f"{phase}-out",
        group_id=f"bench-{phase}",
        batch_size=batch_size,
        session_timeout_ms=6000,
        metrics_port=0,
        pipeline=pipeline,
    )
    svc = KafkaService(s, core, core.metrics)
    stop = threading.Event()
    t = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while svc.health.assigned == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield svc
    finally:
        stop.set()
        t.join(60)


def _out_reader(broker: EmbeddedBroker, topic: str) -> Any:
    from confluent_kafka import OFFSET_END, Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"bench-{time.time_ns()}",
            "enable.auto.commit": False,
        }
    )
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_END) for p in parts])
    c.consume(1, 0.5)  # settle the assignment at the end of the topic
    return c


class _InstantEncoderCore(TaggingCore):
    """The service with a zero-cost encoder (fixed unit vectors, tokenization still real):
    what the rest of the path can carry."""

    def encode_prepared(self, prep: Prepared) -> npt.NDArray[np.float32]:
        if prep.error is not None:
            raise prep.error
        v = np.ones((len(prep.texts), self.encoder.dim), dtype=np.float32)
        out: npt.NDArray[np.float32] = v / np.sqrt(self.encoder.dim)
        return out


@dataclass(frozen=True)
class E2ERun:
    items_per_s: float
    # encoder running / wall time: what is left to 1 is time the encoder waited for work
    busy_fraction: float


def _stage_sum(core: TaggingCore, stage: str) -> float:
    """Seconds the core spent in a stage so far (its histogram's sum)."""
    v = core.metrics.registry.get_sample_value(
        "tagstream_stage_duration_seconds_sum", {"stage": stage}
    )
    return float(v or 0.0)


def bench_e2e(
    broker: EmbeddedBroker,
    core: TaggingCore,
    payloads: list[bytes],
    batch_size: int,
    step: Step,
    phase: str = "e2e",
    pipeline: bool = True,
) -> E2ERun:
    """Send N events to a running service; time until N tag events are out. Also how long
    the encoder ran meanwhile (its stage histogram), to tell idle gaps from a slower encoder."""
    encode_before = _stage_sum(core, "encode")
    with _service(broker, core, batch_size, phase, pipeline):
        reader = _out_reader(broker, f"{phase}-out")
        prod = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
        t0 = time.perf_counter()
        for p in payloads:
            prod.produce(f"{phase}-in", value=p, key=orjson.loads(p)["id"].encode())
            prod.poll(0)
        prod.flush(30)
        seen = 0
        deadline = time.monotonic() + 600
        while seen < len(payloads) and time.monotonic() < deadline:
            got = sum(1 for m in reader.consume(1000, 0.1) if m.error() is None)
            seen += got
            step("e2e", got)
        elapsed = time.perf_counter() - t0
        reader.close()
    return E2ERun(seen / elapsed, (_stage_sum(core, "encode") - encode_before) / elapsed)


@contextmanager
def _media_server(delay_ms: float) -> Iterator[str]:
    """A local media store: one 320x240 JPEG per path, each answered after `delay_ms` (an
    object store's first-byte latency), many at once."""
    import io
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG")
    body = buf.getvalue()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(delay_ms / 1000)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def bench_images(
    broker: EmbeddedBroker,
    encoder: OnnxEncoder,
    ts: TagSystem,
    image_model: Path,
    payloads: list[bytes],
    batch_size: int,
    delay_ms: float,
    step: Step,
) -> dict[str, Any]:
    """The same items end to end, text only and with a cover image each (fetched from a local
    store answering after `delay_ms`), pipelined and not: what images cost, and whether their
    fetches hide behind the encoder (`image_wait_fraction`: the share of the run the encode
    thread still waited for fetches after encoding a batch's text)."""
    from dataclasses import replace

    from consumer.tagging.image_stage import ImageStage
    from consumer.tagging.images import FetchPolicy
    from models_onnx.clip import ClipEncoder
    from tagsys import ImageSpace

    clip = ClipEncoder(image_model)
    space = ImageSpace(clip.name, clip.encode_texts([f"a photo of {t.name}." for t in ts.tags]))
    ts_img = replace(ts, image=space)
    out: dict[str, Any] = {"image_model": clip.id, "fetch_delay_ms": delay_ms}
    text_core = TaggingCore(encoder, ts, metrics=Metrics(CollectorRegistry()))
    out["text_items_per_s"] = round(
        bench_e2e(broker, text_core, payloads, batch_size, step, "img-text").items_per_s, 1
    )
    text_core.close()
    with _media_server(delay_ms) as base:
        with_images = [
            orjson.dumps({**orjson.loads(p), "cover_url": f"{base}/img/{i}.jpg"})
            for i, p in enumerate(payloads)
        ]
        policy = FetchPolicy(hosts=(base.removeprefix("http://"),), schemes=("http",))
        for phase, pipeline in (("img", True), ("img-serial", False)):
            metrics = Metrics(CollectorRegistry())
            core = TaggingCore(
                encoder, ts_img, metrics=metrics, images=ImageStage(clip, policy, metrics)
            )
            t0 = time.perf_counter()
            run = bench_e2e(broker, core, with_images, batch_size, step, phase, pipeline)
            wall = time.perf_counter() - t0
            key = "images_items_per_s" if pipeline else "images_no_pipeline_items_per_s"
            out[key] = round(run.items_per_s, 1)
            if pipeline:
                out["image_wait_fraction"] = round(_stage_sum(core, "image_wait") / wall, 3)
                out["image_encode_fraction"] = round(_stage_sum(core, "image_encode") / wall, 3)
                fetched = metrics.registry.get_sample_value(
                    "tagstream_image_fetches_total", {"result": "ok"}
                )
                out["images_fetched"] = int(fetched or 0)
            core.close()
    out["images_to_text_ratio"] = round(out["images_items_per_s"] / out["text_items_per_s"], 3)
    return out


def bench_latency(
    broker: EmbeddedBroker,
    core: TaggingCore,
    payloads: list[bytes],
    batch_size: int,
    rate: float,
    step: Step,
) -> tuple[float, float, float]:
    """Offer `rate` events/s; latency = tag event received − input sent (one clock)."""
    sent_at: dict[bytes, float] = {}
    lat: list[float] = []
    payloads = [orjson.dumps(orjson.loads(p) | {"id": f"lat-{i}"}) for i, p in enumerate(payloads)]
    with _service(broker, core, batch_size, "latency"):
        reader = _out_reader(broker, "latency-out")
        prod = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})

        def feed() -> None:
            t0 = time.perf_counter()
            for i, p in enumerate(payloads):
                due = t0 + i / rate
                while (now := time.perf_counter()) < due:
                    time.sleep(min(0.001, due - now))
                key = f"lat-{i}".encode()
                sent_at[key] = time.perf_counter()
                prod.produce("latency-in", value=p, key=key)
                prod.poll(0)
            prod.flush(30)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        deadline = time.monotonic() + len(payloads) / rate + 120
        while len(lat) < len(payloads) and time.monotonic() < deadline:
            for m in reader.consume(1000, 0.01):
                if m.error() is None:
                    now = time.perf_counter()
                    key = m.key() or b""
                    if key in sent_at:
                        lat.append((now - sent_at[key]) * 1000)
                        step("latency", 1)
        feeder.join(30)
        reader.close()
    arr = np.array(lat)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99]) if len(arr) else (np.nan,) * 3
    return float(p50), float(p95), float(p99)


def run_bench(
    *,
    items: int = 1000,
    batch_size: int = 64,
    model: str | None = None,
    tag_system: Path | None = None,
    model_dir: Path | None = None,
    device: str = "auto",
    data: Path | None = None,
    rate: float | None = None,
    latency_items: int = 600,
    torch: bool = True,
    show_progress: bool = True,
    sweep: list[int] | None = None,
    rounds: int = 3,
    image_model: Path | None = None,
    image_delay_ms: float = 50.0,
) -> BenchResult:
    from consumer.tagging.parts import sample_tag_system

    rows, source = load_items(items, data)
    payloads = [orjson.dumps(r) for r in rows]
    loaded = TagSystem.load(tag_system) if tag_system else None
    model = model or (loaded.encoder if loaded else "all-MiniLM-L6-v2")
    encoder = OnnxEncoder(model, model_dir=model_dir, device=device)  # type: ignore[arg-type]
    if loaded:
        loaded.check_encoder(encoder.name, encoder.dim)  # before minutes of runs, not after
    texts = [event_text(decode(p)) for p in payloads]
    ts = loaded or sample_tag_system(encoder)
    progress = Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        disable=not show_progress,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def step(name: str, n: int) -> None:
        progress.advance(tasks[name], n)

    with progress:
        tasks["encoder"] = progress.add_task("encoder", total=rounds * len(texts))
        tasks["e2e"] = progress.add_task("e2e", total=(rounds + 2) * len(payloads))
        tasks["latency"] = progress.add_task("latency", total=latency_items)
        tasks["torch"] = progress.add_task("torch", total=rounds * len(texts) if torch else 0)
        tasks["shortlist"] = progress.add_task("shortlist", total=2 * 20 * batch_size)
        tasks["sweep"] = progress.add_task("sweep", total=len(texts) * len(sweep or []))
        tasks["scoring"] = progress.add_task("scoring", total=rounds * len(payloads))
        if image_model is not None:
            progress.update(tasks["e2e"], total=(rounds + 5) * len(payloads))
        torch_pass: TorchRun | None = None
        if torch:
            from models_onnx.registry import resolve_source, spec_for

            spec = spec_for(model)
            torch_pass = torch_runner(resolve_source(spec), texts, batch_size, spec.max_length)
        enc_runs: list[float] = []
        e2e_runs: list[float] = []
        busy_runs: list[float] = []
        torch_runs: list[float] = []
        with EmbeddedBroker() as broker:
            core = TaggingCore(encoder, ts, metrics=Metrics(CollectorRegistry()))
            # PyTorch, bare encoder, end to end: the encoder run sits next to both it is
            # compared with
            for r in range(rounds):
                if torch_pass is not None:
                    torch_runs.append(torch_pass(step))
                enc_runs.append(bench_encoder(encoder, texts, batch_size, step))
                run = bench_e2e(broker, core, payloads, batch_size, step, f"e2e{r}")
                e2e_runs.append(run.items_per_s)
                busy_runs.append(run.busy_fraction)
            serial = bench_e2e(broker, core, payloads, batch_size, step, "serial", False)
            instant = _InstantEncoderCore(encoder, ts, metrics=Metrics(CollectorRegistry()))
            ceiling = bench_e2e(broker, instant, payloads, batch_size, step, "ceiling")
            instant.close()
            # half of what the service sustained end to end (the bare encoder's rate can be
            # well above it, and latency at that load is queueing, not the service)
            offered = rate or max(1.0, round(statistics.median(e2e_runs) * 0.5))
            lat_payloads = (payloads * (latency_items // len(payloads) + 1))[:latency_items]
            p50, p95, p99 = bench_latency(broker, core, lat_payloads, batch_size, offered, step)
            scoring_ms = bench_scoring(core, payloads, batch_size, rounds, step)
            core.close()
            images = (
                bench_images(
                    broker, encoder, ts, image_model, payloads, batch_size, image_delay_ms, step
                )
                if image_model is not None
                else None
            )
        sl, sl_numpy = bench_shortlist(encoder.dim, ts.gate.top_k, batch_size, 20, step)
        swept = {
            budget: bench_encoder(
                encoder, texts, batch_size, lambda _n, k: step("sweep", k), budget
            )
            for budget in (sweep or [])
        }
    return BenchResult(
        items=len(texts),
        source=source,
        encoder=encoder.id,
        batch_size=batch_size,
        encoder_runs=enc_runs,
        e2e_runs=e2e_runs,
        e2e_busy_runs=busy_runs,
        e2e_no_pipeline_items_per_s=serial.items_per_s,
        e2e_ceiling_items_per_s=ceiling.items_per_s,
        latency_rate_per_s=offered,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        torch_runs=torch_runs if torch_pass is not None else None,
        shortlist_ms_per_item_40k=sl,
        shortlist_numpy_ms_per_item_40k=sl_numpy,
        batch_tokens_sweep=swept or None,
        tag_system=ts.version_id,
        scoring_ms_per_item=scoring_ms,
        images=images,
    )
