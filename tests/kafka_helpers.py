"""Helpers for tests against the embedded broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from consumer.service.runner import KafkaService
from consumer.tagging.config import Settings
from consumer.tagging.core import TaggingCore
from consumer.tagging.llm import SelectiveTagger
from consumer.tagging.metrics import Metrics
from consumer.tagging.resilience import CircuitBreaker
from consumer.tools.broker import create_topics
from consumer.tools.demo import sample_events
from models_onnx import OnnxEncoder
from tagsys import GateConfig, TagSystem
from tests.conftest import FakeOpenAI


def make_topics(bootstrap: str, partitions: int, prefix: str = "") -> None:
    """uploads, tags and uploads.dlq (the service checks they exist)."""
    create_topics(
        bootstrap,
        {f"{prefix}uploads": partitions, f"{prefix}tags": partitions, f"{prefix}uploads.dlq": 1},
    )


def make_events(n: int, prefix: str = "ev") -> list[bytes]:
    base = [orjson.loads(line) for line in sample_events()]
    out = []
    for i in range(n):
        ev = dict(base[i % len(base)])
        ev["id"] = f"{prefix}-{i:05d}"
        out.append(orjson.dumps(ev))
    return out


def ids_of(events: list[bytes]) -> set[str]:
    return {orjson.loads(e)["id"] for e in events}


def metric(core: TaggingCore, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of the core's registry; 0 when it was never set (None for a removed
    series is `core.metrics.registry.get_sample_value`'s, where that matters)."""
    return core.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def wait_until(cond: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """Poll `cond` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a local endpoint; 0 when nothing listens (yet, or any more)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()
    except OSError:
        return 0, ""


def force_llm(ts: TagSystem) -> TagSystem:
    """`ts` with a gate no item passes: the LLM decides every item."""
    gate = GateConfig(top_k=5, accept_threshold=0.99, min_margin=0.5)
    return TagSystem(ts.name, "all-to-llm", ts.encoder, ts.tags, ts.embeddings, gate)


def llm_core(
    encoder: OnnxEncoder,
    ts: TagSystem,
    server: FakeOpenAI,
    breaker: CircuitBreaker | None = None,
    *,
    timeout_s: float = 60.0,
    attempts: int = 1,
    backoff_s: tuple[float, float] = (0.5, 8.0),
    **kw: Any,
) -> TaggingCore:
    """A core whose every item goes to `server` (`kw` for the core; `backoff_s`: the
    tagger's base and cap between attempts)."""
    metrics = Metrics(CollectorRegistry())
    tagger = SelectiveTagger(
        server.base_url,
        "fake",
        SecretStr(""),
        timeout_s=timeout_s,
        metrics=metrics,
        attempts=attempts,
        breaker=breaker,
        backoff_base_s=backoff_s[0],
        backoff_max_s=backoff_s[1],
    )
    return TaggingCore(encoder, force_llm(ts), tagger=tagger, metrics=metrics, **kw)


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """SIGTERM, then the exit code (0 expected: the service finishes, commits, exits)."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout_s)


def reap(proc: subprocess.Popen[bytes]) -> None:
    """In a `finally`: kill what a failed test left running."""
    if proc.poll() is None:
        proc.kill()


def spawn_run(
    bootstrap: str, model_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`tagstream run` as a process, as an operator starts it (6 s sessions for Tansu)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consumer.cli",
            "run",
            "--bootstrap-servers",
            bootstrap,
            "--session-timeout-ms",
            "6000",
            "--metrics-host",
            "127.0.0.1",
            *args,
        ],
        env=os.environ | {"TAGSTREAM_MODEL_DIR": str(model_dir)} | (env or {}),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def settings_for(bootstrap: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "input_topic": "uploads",
        "output_topic": "tags",
        "group_id": "tagstream-test",
        "session_timeout_ms": 6000,
        "metrics_port": 0,
        "batch_size": 32,
    }
    return Settings(**(base | kw))


@contextmanager
def running(service: KafkaService) -> Iterator[threading.Event]:
    """Run the service in a thread; on exit, stop it and re-raise anything it raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            service.run(stop)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(60)
        assert not t.is_alive(), "service did not stop within 60 s"
        if errors:
            raise errors[0]


def service(settings: Settings, core: TaggingCore) -> KafkaService:
    return KafkaService(settings, core, core.metrics)


class TopicReader:
    """Reads a whole topic by assignment (no consumer group, so no join wait)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{time.time_ns()}",
                "enable.auto.commit": False,
            }
        )
        md = self.consumer.list_topics(topic, timeout=10)
        parts = md.topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.records: list[Any] = []
        self.keys: set[bytes] = set()

    def poll(self, timeout_s: float = 0.2) -> int:
        for m in self.consumer.consume(500, timeout_s):
            if m.error() is None:
                self.records.append(m)
                self.keys.add(m.key() or b"")
        return len(self.records)

    def wait_for(self, keys: int, timeout_s: float) -> int:
        """Poll until `keys` distinct keys arrived or `timeout_s` passed; the count."""
        deadline = time.monotonic() + timeout_s
        while len(self.keys) < keys and time.monotonic() < deadline:
            self.poll()
        return len(self.keys)

    def close(self) -> None:
        self.consumer.close()


def read_topic(
    bootstrap: str, topic: str, *, expect: int, timeout_s: float = 60.0, settle_s: float = 0.0
) -> list[Any]:
    """All records of `topic`, once `expect` distinct keys arrived (+settle), or at timeout."""
    reader = TopicReader(bootstrap, topic)
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            reader.poll()
            if len(reader.keys) >= expect:
                if settle_until is None:
                    settle_until = time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
    finally:
        reader.close()
    return reader.records


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return sum(max(tp.offset, 0) for tp in tps)


def committed_reaches(
    bootstrap: str, group: str, partitions: int, total: int, timeout_s: float = 60.0
) -> bool:
    """Whether the group's commits on `uploads` add up to `total` within `timeout_s`."""
    return wait_until(
        lambda: committed_total(bootstrap, group, "uploads", partitions) == total, timeout_s
    )


class KafkaKit:
    """The broker-side helpers of a test, bound to its broker (the `kafka` fixture): topics,
    sending, reading, commits, settings and a running service, without repeating the
    bootstrap address in every call."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def topics(self, partitions: int, prefix: str = "") -> None:
        make_topics(self.bootstrap, partitions, prefix)

    def send(self, lines: list[bytes], topic: str = "uploads") -> int:
        from consumer.tools.send import send_lines

        return send_lines(self.bootstrap, topic, lines)

    def read(
        self, topic: str, *, expect: int, timeout_s: float = 60.0, settle_s: float = 0.0
    ) -> list[Any]:
        return read_topic(
            self.bootstrap, topic, expect=expect, timeout_s=timeout_s, settle_s=settle_s
        )

    def committed(self, group: str, partitions: int, topic: str = "uploads") -> int:
        return committed_total(self.bootstrap, group, topic, partitions)

    def settings(self, **kw: Any) -> Settings:
        return settings_for(self.bootstrap, **kw)

    def serve(self, settings: Settings, core: TaggingCore) -> Any:
        """`with kafka.serve(s, core):` the service runs in a thread (see `running`)."""
        return running(service(settings, core))

    def spawn(
        self, model_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return spawn_run(self.bootstrap, model_dir, log, *args, env=env)
