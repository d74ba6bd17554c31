"""`tagstream run --runtime faust`: the same tagging core on faust-streaming.

One agent takes batches with `stream.take_events` (Faust acks a batch's events only once the
agent comes back for the next batch), decodes them, runs `TaggingCore.process_isolating` in a
worker thread (the event loop keeps heart-beating while the encoder runs), sends tag events
and dead letters, and awaits every send's acknowledgement before it asks for the next batch.
Faust then commits acked offsets on its commit interval and on rebalance. At-least-once.

Differences from the default runtime are in docs/RELIABILITY.md ("Faust runtime").
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import structlog

from consumer.app import build_stack
from consumer.config import Settings
from consumer.core import TagResult
from consumer.events import DecodeError, UploadEvent, ce_headers, decode, now_iso
from consumer.health import HealthServer
from consumer.runner import connect_error_headers
from tagsys.errors import TagstreamError

log = structlog.get_logger(__name__)


def make_app(settings: Settings, stack: Any) -> Any:
    """A Faust app whose one agent runs the tagging core."""
    import faust

    brokers = [f"kafka://{h.strip()}" for h in settings.bootstrap_servers.split(",")]
    app = faust.App(
        settings.group_id,
        broker=brokers,
        autodiscover=False,
        # our own /metrics /healthz /readyz port; Faust's web server would be a second one and
        # a classic port clash between replicas on one host
        web_enabled=False,
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_ms / 3000),
        broker_commit_interval=1.0,
        broker_max_poll_interval=settings.max_poll_interval_ms / 1000,
        producer_acks=-1,
        # no leader topic or changelogs: this app keeps no tables
        topic_disable_leader=True,
        topic_allow_declare=False,
        stream_wait_empty=True,
        **_security(settings),
    )
    source = app.topic(settings.input_topic, key_type=bytes, value_type=bytes)
    output = app.topic(settings.output_topic, key_type=bytes, value_type=bytes)
    dlq = app.topic(settings.dlq, key_type=bytes, value_type=bytes)
    core, metrics, health = stack.core, stack.metrics, stack.health

    async def handle(events: list[Any]) -> None:
        good: list[tuple[Any, UploadEvent]] = []
        sends = []
        acked: list[tuple[str, str]] = []  # what each send is, for the metrics once acked
        for ev in events:
            msg = ev.message
            try:
                upload = decode(ev.value, max_bytes=settings.max_event_bytes)
            except DecodeError as e:
                metrics.consumed.labels(outcome=e.reason).inc()
                sends.append(await _dead_letter(dlq, msg, "decode", e, e.reason))
                acked.append(("dlq", e.reason))
                continue
            metrics.consumed.labels(outcome="ok").inc()
            good.append((msg, upload))
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(None, core.process_isolating, [u for _, u in good])
        stamp = now_iso()
        for (msg, upload), res in zip(good, results, strict=True):
            if not isinstance(res, TagResult):
                metrics.consumed.labels(outcome="process_error").inc()
                sends.append(await _dead_letter(dlq, msg, "process", res, "process_error"))
                acked.append(("dlq", "process_error"))
                continue
            fut = await output.send(
                key=upload.id.encode(),
                value=_dumps(core.to_payload(res)),
                headers=_bytes_headers(
                    ce_headers(
                        event_id=upload.id,
                        source_ref=f"{msg.topic}-{msg.partition}-{msg.offset}",
                        ce_source=settings.ce_source,
                        time_iso=stamp,
                    )
                ),
            )
            sends.append(fut)
            acked.append(("tag", res.decision.value))
        # every tag event and dead letter acknowledged before Faust may ack (commit) the batch
        await asyncio.gather(*sends)
        for kind, label in acked:  # counted like the default runtime: once the broker acked
            if kind == "dlq":
                metrics.dlq.labels(reason=label).inc()
            else:
                metrics.produced.labels(decision=label).inc()
        health.beat()

    @app.agent(source)
    async def tag(stream: Any) -> None:
        async for events in stream.take_events(
            settings.batch_size, within=settings.batch_timeout_s
        ):
            metrics.batch_size.observe(len(events))
            await handle(list(events))

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        health.assigned = len(
            [tp for tp in app.consumer.assignment() if tp.topic == settings.input_topic]
        )
        health.beat()

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def beat() -> None:  # the loop is alive even while the topic is idle
        health.beat()

    return app


def _dumps(obj: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps(obj)


async def _dead_letter(dlq: Any, msg: Any, stage: str, exc: BaseException, reason: str) -> Any:
    headers = connect_error_headers(
        msg.topic, msg.partition, msg.offset, msg.headers, stage, exc, reason
    )
    return await dlq.send(key=msg.key, value=msg.value, headers=_bytes_headers(headers))


def _bytes_headers(headers: list[tuple[str, str | bytes | None]]) -> list[tuple[str, bytes]]:
    return [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in headers]


def _security(settings: Settings) -> dict[str, Any]:
    """SASL(/SSL) credentials for aiokafka, from the same TAGSTREAM_* settings."""
    proto = (settings.security_protocol or "PLAINTEXT").upper()
    if proto == "PLAINTEXT" or not settings.sasl_mechanism:
        return {}
    import ssl

    from faust.auth import SASLCredentials

    password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
    creds = SASLCredentials(
        username=settings.sasl_username or "",
        password=password,
        mechanism=settings.sasl_mechanism,
        ssl_context=ssl.create_default_context() if "SSL" in proto else None,
    )
    return {"broker_credentials": creds}


def check_supported(settings: Settings) -> None:
    """Refuse what only the default runtime does, instead of silently doing something else."""
    unsupported = []
    if settings.llm_unavailable == "pause":
        unsupported.append("--llm-unavailable pause")
    if settings.decisions_topic:
        unsupported.append("--decisions-topic")
    if unsupported:
        raise TagstreamError(
            f"the Faust runtime does not support {', '.join(unsupported)}; use the default "
            "runtime (--runtime kafka) for it (docs/RELIABILITY.md, 'Faust runtime')"
        )
    if settings.tag_system is not None and settings.reload_interval_s > 0:
        log.warning("faust_runtime_no_hot_reload", tag_system=str(settings.tag_system))


def run_faust(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (Faust's worker handles them: stop, commit, exit 0)."""
    check_supported(settings)
    try:
        import faust
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SystemExit(
            "the Faust runtime needs faust-streaming: pip install 'tagstream[faust]'"
        ) from e
    with build_stack(settings) as stack:
        server = HealthServer(
            stack.metrics.registry, stack.health, settings.metrics_host, settings.metrics_port
        ).start()
        log.info("metrics_listening", host=settings.metrics_host, port=server.port, runtime="faust")
        stack.core.warm_up()
        stack.health.warmed = True
        app = make_app(settings, stack)
        worker = faust.Worker(
            app,
            loglevel=os.environ.get("TAGSTREAM_FAUST_LOG_LEVEL", "WARNING"),
            quiet=True,
            redirect_stdouts=False,
        )
        try:
            worker.execute_from_commandline()
        except SystemExit as e:
            if e.code not in (0, None):
                raise
        finally:
            server.stop()
            sys.stdout.flush()
