"""`tagstream demo`: the whole path on embedded defaults, then a readable summary.

Starts the embedded broker and (unless `--llm none`) the local LLM, sends the sample events,
runs the service until every event is tagged, shows a few tag events, shuts all down.
"""

from __future__ import annotations

import gc
import importlib.resources
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from consumer.service.runner import KafkaService
from consumer.service.stack import build_stack
from consumer.tagging.config import Settings
from consumer.tools.broker import EmbeddedBroker, create_topics
from consumer.tools.send import send_lines
from tagsys.errors import TagstreamError

INPUT, OUTPUT = "uploads", "tags"


def sample_events() -> list[bytes]:
    raw = importlib.resources.files("consumer").joinpath("sample", "events.jsonl").read_bytes()
    return [line for line in raw.splitlines() if line.strip()]


@dataclass
class DemoResult:
    events_in: int
    events_out: int
    llm_calls: int
    llm_status: dict[str, int]
    elapsed_s: float
    decisions: dict[str, int]
    tag_system: str
    encoder: str
    outputs: list[dict[str, Any]] = field(default_factory=list)
    llm_tokens: dict[str, int] = field(default_factory=dict)  # prompt / completion

    def summary(self) -> dict[str, Any]:
        return {
            "events_in": self.events_in,
            "events_out": self.events_out,
            "llm_calls": self.llm_calls,
            "llm_status": self.llm_status,
            "elapsed_s": round(self.elapsed_s, 3),
            "decisions": self.decisions,
            "tag_system": self.tag_system,
            "encoder": self.encoder,
            "llm_tokens": self.llm_tokens,
        }


def run_demo(
    *,
    llm: str = "local",
    model: str = "all-MiniLM-L6-v2",
    model_dir: Path | None = None,
    timeout_s: float = 300.0,
    console: Console | None = None,
    llm_extract: bool = False,
) -> DemoResult:
    con = console or Console(stderr=True)
    # the broker's log matters only when the demo fails: kept then (and named), else removed
    logdir = Path(tempfile.mkdtemp(prefix="tagstream-demo-"))
    try:
        result = _run(llm, model, model_dir, timeout_s, con, logdir / "broker.log", llm_extract)
    except BaseException:
        con.print(f"[yellow]the embedded broker's log is kept at {logdir / 'broker.log'}[/]")
        raise
    shutil.rmtree(logdir, ignore_errors=True)
    return result


def _run(
    llm: str,
    model: str,
    model_dir: Path | None,
    timeout_s: float,
    con: Console,
    broker_log: Path,
    llm_extract: bool = False,
) -> DemoResult:
    events = sample_events()
    t0 = time.monotonic()
    with EmbeddedBroker(log_path=broker_log) as broker:
        con.print(f"[bold]broker[/] Tansu on {broker.bootstrap}")
        create_topics(broker.bootstrap, {INPUT: 3, OUTPUT: 3, f"{INPUT}.dlq": 1})
        settings = Settings(
            bootstrap_servers=broker.bootstrap,
            input_topic=INPUT,
            output_topic=OUTPUT,
            group_id="tagstream-demo",
            llm=llm,
            model=model,
            model_dir=model_dir,
            session_timeout_ms=6000,
            metrics_port=0,
            # the sample's hand-set gate, trusted so the demo shows all three decisions; `run`
            # sends what an unfitted gate would accept to the LLM instead (unfitted_gate)
            unfitted_gate="trust",
            llm_extract=llm_extract,
            emit_extract=llm_extract,
        )
        if llm == "local":
            con.print("[bold]llm[/] starting SmolLM2-135M-Instruct (llama.cpp) …")
        with build_stack(settings, CollectorRegistry()) as stack:
            con.print(
                f"[bold]encoder[/] {stack.core.encoder.id} on {stack.core.encoder.device}; "
                f"[bold]tag system[/] {stack.core.tag_system.version_id} (its gate is "
                "hand-set, trusted for the demo; `run` sends what an unfitted gate would "
                "accept to the LLM)"
            )
            sent = send_lines(broker.bootstrap, INPUT, events)
            con.print(f"[bold]sent[/] {sent} sample events to '{INPUT}'")
            stop = threading.Event()
            service = KafkaService(settings, stack.core, stack.metrics, stack.health)
            errors: list[BaseException] = []
            worker = threading.Thread(target=_serve, args=(service, stop, errors), name="service")
            worker.start()
            try:
                outputs = _collect(broker.bootstrap, sent, timeout_s, stop)
            finally:
                stop.set()
                worker.join(60)
                del service  # let librdkafka's handles go before the broker does
                gc.collect()
            if errors:
                raise TagstreamError(f"the service failed: {errors[0]}") from errors[0]
            reg = stack.metrics.registry
            llm_status = {
                s: int(reg.get_sample_value("tagstream_llm_requests_total", {"status": s}) or 0)
                for s in ("ok", "error", "timeout", "invalid", "empty")
            }
            result = DemoResult(
                events_in=sent,
                events_out=len(outputs),
                llm_calls=sum(llm_status.values()),
                llm_status={k: v for k, v in llm_status.items() if v},
                elapsed_s=time.monotonic() - t0,
                decisions=dict(Counter(o["decision"] for o in outputs.values())),
                tag_system=stack.core.tag_system.version_id,
                encoder=stack.core.encoder.id,
                outputs=list(outputs.values()),
                llm_tokens={
                    k: int(reg.get_sample_value("tagstream_llm_tokens_total", {"kind": k}) or 0)
                    for k in ("prompt", "completion")
                },
            )
    return result


def _serve(service: KafkaService, stop: threading.Event, errors: list[BaseException]) -> None:
    try:
        service.run(stop)
    except BaseException as e:  # surfaced in the main thread
        errors.append(e)
        stop.set()


def _collect(
    bootstrap: str, expected: int, timeout_s: float, stop: threading.Event
) -> dict[str, dict[str, Any]]:
    """Read the output topic until one tag event per input id has arrived."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"demo-reader-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "logger": logging.getLogger("librdkafka"),
        }
    )
    c.subscribe([OUTPUT])
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline and not stop.is_set():
            for m in c.consume(100, 0.2):
                value = m.value()
                if m.error() is None and value:
                    ev = orjson.loads(value)
                    seen[ev["id"]] = ev
    finally:
        c.close()
    if len(seen) < expected and not stop.is_set():
        raise TagstreamError(f"only {len(seen)}/{expected} tag events within {timeout_s}s")
    return seen


def print_report(res: DemoResult, con: Console, show: int = 6) -> None:
    con.print(
        f"\n[bold green]{res.events_out}/{res.events_in} events tagged[/] in "
        f"{res.elapsed_s:.1f}s · decisions {res.decisions} · LLM calls {res.llm_calls}"
    )
    table = Table(title="a few tag events", show_lines=False)
    for col in ("id", "decision", "tags (score, source)"):
        table.add_column(col)
    picked = sorted(res.outputs, key=lambda o: o["id"])
    by_decision: dict[str, list[dict[str, Any]]] = {}
    for o in picked:
        by_decision.setdefault(o["decision"], []).append(o)
    rows: list[dict[str, Any]] = []
    while len(rows) < min(show, len(picked)):
        for group in by_decision.values():
            if group and len(rows) < show:
                rows.append(group.pop(0))
    for o in rows:
        tags = ", ".join(f"{t['name']} ({t['score']:.2f}, {t['source']})" for t in o["tags"])
        flag = " [yellow]needs review[/]" if o["needs_review"] else ""
        table.add_row(o["id"], o["decision"] + flag, tags or "—")
    con.print(table)
    if rows:  # one the LLM decided, when there is one: it shows the most
        full = next((o for o in rows if o["decision"] == "llm"), rows[0])
        con.print("one tag event in full:")
        con.print_json(orjson.dumps(full).decode())
