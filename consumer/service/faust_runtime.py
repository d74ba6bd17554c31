"""`tagstream run --runtime faust`: the same tagging core on faust-streaming.

One agent takes batches with `stream.noack_take` (nothing is acked for us), decodes them, runs
`TaggingCore.process_isolating` in a worker thread (the event loop keeps heart-beating while
the encoder runs), sends tag events and dead letters, awaits every send's acknowledgement and
only then acks the batch's events; Faust commits acked offsets on its commit interval and on
rebalance. At-least-once.

A batch that fails (a broken core, a send the broker refuses) is never acked: the process
exits at once with `EXIT_BATCH_FAILED`, from the event-loop thread, so no Faust code (acks,
commits, an agent restart that would read on past the batch) runs after the failure, and a
restart re-reads the batch. See `_die`.

Differences from the default runtime are in docs/RELIABILITY.md ("Faust runtime").
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from consumer.service.health import HealthServer, HealthState
from consumer.service.stack import build_stack
from consumer.tagging.config import Settings
from consumer.tagging.core import NoContentError, TagResult
from consumer.tagging.dead_letters import (
    Headers,
    connect_error_headers,
    is_truncated,
    producer_max_bytes,
    shrink,
)
from consumer.tagging.events import DecodeError, UploadEvent, ce_headers, decode, now_iso
from consumer.tagging.metrics import Metrics
from tagsys.errors import TagstreamError

if TYPE_CHECKING:
    from faust.types import TP

log = structlog.get_logger(__name__)

# a batch failed: nothing of it (or after it) is acked; the orchestrator restarts the worker
EXIT_BATCH_FAILED = 1


def make_app(settings: Settings, stack: Any) -> Any:
    """A Faust app whose one agent runs the tagging core."""
    import faust

    brokers = [f"kafka://{h.strip()}" for h in settings.bootstrap_servers.split(",")]
    # a dead letter is the record plus headers: room for the largest record we can read
    max_bytes = producer_max_bytes(settings.max_event_bytes)
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
        consumer_max_fetch_size=max_bytes,
        producer_max_request_size=max_bytes,
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
    metrics: Metrics = stack.metrics
    health: HealthState = stack.health
    metrics.assigned_partitions.set_function(lambda: health.assigned)
    core = stack.core
    # before any topic exists: the topics' conductor creates the transport on first use
    app.transport = _transport_class(metrics)(app.conf.broker_consumer, app)
    source = app.topic(settings.input_topic, key_type=bytes, value_type=bytes)
    output = app.topic(settings.output_topic, key_type=bytes, value_type=bytes)
    dlq = app.topic(settings.dlq, key_type=bytes, value_type=bytes)
    progress = Progress(health)

    async def handle(events: list[Any]) -> None:
        """Decode, tag and send one batch; returns once every send is acknowledged and raises
        if any is not (a dead letter the broker finds too large is sent shrunk instead)."""
        t0 = time.perf_counter()
        good: list[tuple[Any, UploadEvent]] = []
        bad: list[tuple[Any, str, BaseException, str]] = []
        for ev in events:
            msg = ev.message
            try:
                upload = decode(ev.value, max_bytes=settings.max_event_bytes)
            except DecodeError as e:
                metrics.consumed.labels(outcome=e.reason).inc()
                log.warning(
                    "malformed_event",
                    topic=msg.topic,
                    partition=msg.partition,
                    offset=msg.offset,
                    reason=e.reason,
                )
                bad.append((msg, "decode", e, e.reason))
                continue
            metrics.consumed.labels(outcome="ok").inc()
            good.append((msg, upload))
        metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - t0)
        results: list[TagResult | BaseException] = []
        if good:
            loop = asyncio.get_running_loop()
            # raises CoreBrokenError when even a canary fails: nothing has been sent yet
            results = await loop.run_in_executor(None, core.process_isolating, [u for _, u in good])
        t1 = time.perf_counter()
        stamp = now_iso()
        waits: list[Awaitable[Any]] = []
        for (msg, upload), res in zip(good, results, strict=True):
            if not isinstance(res, TagResult):
                reason = res.reason if isinstance(res, NoContentError) else "process_error"
                metrics.consumed.labels(outcome=reason).inc()
                bad.append((msg, "process", res, reason))
                continue
            # an asyncio.Future (aiokafka's), which Faust types as a bare Awaitable
            fut: asyncio.Future[Any] = await output.send(  # type: ignore[assignment]
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
                force=True,  # now, not attached to an event until a commit
            )
            fut.add_done_callback(_on_tag_acked(metrics, res.decision.value, msg.timestamp))
            waits.append(fut)
        for msg, stage, exc, reason in bad:
            headers = connect_error_headers(
                msg.topic, msg.partition, msg.offset, msg.headers, stage, exc, reason
            )
            task = asyncio.ensure_future(
                send_dead_letter(dlq, msg.key, msg.value, headers, msg.timestamp or None)
            )
            task.add_done_callback(_on_dead_letter_acked(metrics, reason))
            waits.append(task)
        # every tag event and dead letter acknowledged before the batch may be acked
        await asyncio.gather(*waits)
        metrics.stage_seconds.labels(stage="produce").observe(time.perf_counter() - t1)

    @app.agent(source)
    async def tag(stream: Any) -> None:
        progress.queue = stream.channel.queue
        health.consuming = True  # ready once partitions are assigned, before a batch ends
        try:
            async for events in stream.noack_take(
                settings.batch_size, within=settings.batch_timeout_s
            ):
                batch = list(events)
                progress.started()
                metrics.batch_size.observe(len(batch))
                await handle(batch)
                for ev in batch:  # all its outputs are acknowledged: safe to commit
                    await stream.ack(ev)
                progress.finished()
        except asyncio.CancelledError:
            raise  # stopping: what is not acked stays uncommitted
        except BaseException as e:
            # a supervisor restart would go on reading after the batch it dropped
            _die(e, stack)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        metrics.rebalances.labels(event="assigned").inc()
        _count_assigned(app, settings, health, gone=set())

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        metrics.rebalances.labels(event="revoked").inc()
        _count_assigned(app, settings, health, gone=set(revoked))

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def watch_progress() -> None:
        await watch(app.consumer, settings.input_topic, metrics, progress)

    return app


@dataclass
class Progress:
    """Liveness from real progress: a finished batch, or being idle with nothing to do.

    A batch stuck in the encoder, or records nobody works off, stop the beats, so /healthz
    turns 503 after max.poll.interval, as with the default runtime's poll loop."""

    health: HealthState
    busy_since: float | None = None
    # the agent's input queue (fetched, not yet taken into a batch), once the agent runs
    queue: Any = None
    lag_series: set[tuple[str, int]] = field(default_factory=set)

    def started(self) -> None:
        self.busy_since = time.monotonic()

    def finished(self) -> None:
        self.busy_since = None
        self.health.beat()

    def check_idle(self, *, caught_up: bool, buffered: bool) -> bool:
        """Beat when no batch runs, nothing is buffered and every assigned partition is
        fetched to its high watermark: nothing to do is no stall."""
        idle = self.busy_since is None and caught_up and not buffered
        if idle:
            self.health.beat()
        return idle


async def watch(consumer: Any, topic: str, metrics: Metrics, progress: Progress) -> bool:
    """Every second: the lag gauges (high watermark minus committed offset, as librdkafka's
    consumer_lag; series of partitions no longer assigned removed), then the idle beat.

    Idle is judged by the fetch position, not the commit: a partition whose records all
    expired has nothing to read and nothing to commit, yet keeps its lag."""
    try:
        assigned = sorted(tp for tp in consumer.assignment() if tp.topic == topic)
    except Exception:  # not started yet (ConsumerNotStarted)
        assigned = []
    lags = {tp.partition: consumer.lag(tp) for tp in assigned}
    now = {(topic, p) for p in lags}
    for t, p in progress.lag_series - now:
        metrics.lag.remove(t, str(p))
    progress.lag_series &= now
    for p, lag in lags.items():
        if lag is not None:
            metrics.lag.labels(topic=topic, partition=str(p)).set(lag)
            progress.lag_series.add((topic, p))
    caught_up = True
    for tp in assigned:
        caught_up = caught_up and await consumer.caught_up(tp)
    queued = progress.queue is not None and progress.queue.qsize() > 0
    return progress.check_idle(caught_up=caught_up, buffered=queued or bool(consumer.unacked))


def _count_assigned(app: Any, settings: Settings, health: HealthState, gone: set[Any]) -> None:
    """Input partitions owned (readiness); `gone`: being revoked, maybe still listed."""
    owned = {tp for tp in app.consumer.assignment() if tp.topic == settings.input_topic}
    health.assigned = len(owned - gone)


def _transport_class(metrics: Metrics) -> Any:
    """The aiokafka transport with a consumer that counts commits and knows its lag."""
    from faust.transport.drivers import aiokafka as driver

    class _Consumer(driver.Consumer):
        async def _commit(self, offsets: Mapping[TP, int]) -> bool:
            # every commit goes through here; False: refused or failed (Faust logged it)
            ok = await super()._commit(offsets)
            metrics.commits.labels(result="ok" if ok else "error").inc()
            return ok

        def lag(self, tp: TP) -> int | None:
            """High watermark (from the last fetch) minus the committed offset; None while
            either is unknown."""
            try:
                high = self.highwater(tp)
            except Exception:  # not started yet (ConsumerNotStarted)
                return None
            committed = self._committed_offset.get(tp)
            if high is None or committed is None:
                return None
            return max(0, high - committed)

        async def caught_up(self, tp: TP) -> bool:
            """Fetched up to the high watermark (position: the next offset to fetch)."""
            try:
                high = self.highwater(tp)
                position = await self.position(tp) if high is not None else None
            except Exception:  # not started, or revoked meanwhile: not known, so no
                return False
            return high is not None and position is not None and position >= high

    class _Transport(driver.Transport):
        Consumer = _Consumer

    return _Transport


async def send_dead_letter(
    dlq: Any,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    timestamp: float | None = None,
) -> bool:
    """Send one dead letter (with the record's timestamp) and await its acknowledgement;
    while the producer or the broker refuses it as too large, send it shrunk
    (`dead_letters.shrink`, step by step). Returns whether anything had to be cut; raises
    when even the smallest is refused, or on any other error."""
    k, body, hdrs, step = key, value, headers, 0
    while True:
        try:
            fut = await dlq.send(
                key=k, value=body, headers=_bytes_headers(hdrs), timestamp=timestamp, force=True
            )
            await fut
            return is_truncated(hdrs)
        except Exception as e:
            if not _too_large(e):
                raise
            smaller = shrink(key, value, headers, step)
            if smaller is None:
                raise
            log.warning("dead_letter_too_large", bytes=len(body or b""), shrink_step=step)
            k, body, hdrs = smaller
            step += 1


def _too_large(exc: BaseException) -> bool:
    """aiokafka's MessageSizeTooLargeError, raised by send (Faust wraps it in
    ProducerSendError) or by the acknowledgement (the broker's MESSAGE_TOO_LARGE)."""
    from aiokafka.errors import MessageSizeTooLargeError  # type: ignore[import-untyped]

    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, MessageSizeTooLargeError):
            return True
        e = e.__cause__
    return False


def _on_tag_acked(
    metrics: Metrics, decision: str, input_ts_s: float | None
) -> Callable[[asyncio.Future[Any]], None]:
    """Counted like the default runtime: once the broker acknowledged the tag event."""

    def done(fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        metrics.produced.labels(decision=decision).inc()
        if input_ts_s:
            metrics.e2e_seconds.observe(max(0.0, time.time() - input_ts_s))

    return done


def _on_dead_letter_acked(metrics: Metrics, reason: str) -> Callable[[asyncio.Future[Any]], None]:
    def done(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            metrics.dlq.labels(reason=reason).inc()
            if fut.result():  # something had to be cut
                metrics.dlq_truncated.inc()

    return done


def _die(exc: BaseException, stack: Any) -> NoReturn:
    """Exit now, non-zero, without returning to the event loop.

    Faust runs acks, commits (its timer, rebalances, shutdown) and the agent supervisor on this
    loop; the consumer thread commits only what the loop asks. Not yielding to the loop again
    means nothing after this failure is acked or committed, and no restarted agent reads past
    the failed batch. A graceful stop is no option: it waits for the batch's unacked events."""
    log.critical(
        "batch_failed_exiting",
        error=repr(exc),
        exit_code=EXIT_BATCH_FAILED,
        note="nothing of this batch is committed; a restart re-reads it",
    )
    try:
        if stack.local_llm is not None:
            stack.local_llm.stop()  # our own child process; the rest dies with us
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_BATCH_FAILED)


def _dumps(obj: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps(obj)


def _bytes_headers(headers: Headers) -> list[tuple[str, bytes]]:
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
    """Serve until SIGTERM/SIGINT (Faust's worker handles them: stop, commit, exit 0); a
    failed batch ends the process with `EXIT_BATCH_FAILED` instead (`_die`)."""
    check_supported(settings)
    try:
        import faust
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SystemExit(
            "the Faust runtime needs faust-streaming: pip install 'tagstream[faust]'"
        ) from e
    with build_stack(settings) as stack:
        health: HealthState = stack.health
        server = HealthServer(
            stack.metrics.registry, health, settings.metrics_host, settings.metrics_port
        ).start()
        log.info("metrics_listening", host=settings.metrics_host, port=server.port, runtime="faust")
        stack.core.warm_up()
        health.warmed = True
        app = make_app(settings, stack)

        class Worker(faust.Worker):
            async def on_stop(self) -> None:
                health.stopping = True  # not ready from the first moment of a shutdown
                await super().on_stop()

        worker = Worker(
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
            health.stopping = True
            server.stop()
            sys.stdout.flush()
