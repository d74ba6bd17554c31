"""The confluent-kafka runtime: consume a batch, tag it, produce, commit what is safe.

At-least-once: an input offset is committed only when the tag event (or dead-letter record)
of that input and of every earlier input of its partition has been acknowledged by the
broker (`OffsetTracker`). SIGTERM/SIGINT only set `stop`; the loop finishes the batch in
flight, drains the producer, commits and closes (quix-streams style).

A pipeline keeps the encoder busy: while the encode thread runs batch N, the loop polls,
decodes and tokenizes batch N+1; once N+1 is handed to the encoder, N is gated (LLM calls
included), produced and committed. Its records are in the offset tracker from the moment
they are read, so a commit never passes them; a partition rewound, revoked or lost while a
batch is ahead drops that batch's records of it (`_gen`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.service.health import HealthState
from consumer.service.reload import TagSystemWatcher
from consumer.tagging.config import Settings
from consumer.tagging.core import (
    CoreBrokenError,
    NoContentError,
    Prepared,
    TaggingCore,
    TagResult,
)
from consumer.tagging.dead_letters import (
    DeadLetter,
    Headers,
    connect_error_headers,
    is_truncated,
    producer_max_bytes,
    shrink,
)
from consumer.tagging.events import DecodeError, UploadEvent, ce_headers, decode, now_iso
from consumer.tagging.metrics import Metrics
from tagsys.errors import RuntimeFailure, TagstreamError, UnavailableError

log = structlog.get_logger(__name__)


class RepeatFilter(logging.Filter):
    """One line per distinct message per `every_s`: librdkafka logs a failed connect at every
    reconnect (hundreds a minute with a broker down), which buries everything else."""

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        return self.allow(record.getMessage())

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every_s:
                return False
            if len(self._last) > 4096:  # bounded: messages carry addresses and states
                self._last.clear()
            self._last[key] = now
        return True


KAFKA_LOGGER = logging.getLogger("librdkafka")  # librdkafka's own log lines, via logging
KAFKA_LOGGER.addFilter(RepeatFilter())
KAFKA_ERRORS = RepeatFilter()  # the same for error_cb's non-fatal errors

TP = tuple[str, int]


class KafkaRuntimeError(RuntimeFailure):
    """A Kafka failure the loop cannot ride out; `code` is librdkafka's error code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class OffsetTracker:
    """Per partition, the offsets read but not finished; commit up to the lowest of them."""

    def __init__(self) -> None:
        self._inflight: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}

    def add(self, tp: TP, offset: int) -> None:
        self._inflight.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TP, offset: int) -> None:
        self._inflight.get(tp, set()).discard(offset)

    def rewind(self, tp: TP, offset: int) -> None:
        """Abandon `offset` and everything after it: the partition re-reads from there."""
        inflight = self._inflight.get(tp, set())
        self._inflight[tp] = {o for o in inflight if o < offset}
        self._next[tp] = min(self._next.get(tp, offset), offset)

    def pending(self) -> int:
        return sum(len(s) for s in self._inflight.values())

    def committable(self, only: set[TP] | None = None) -> dict[TP, int]:
        """Offsets (next to read) that may be committed and were not committed yet."""
        out: dict[TP, int] = {}
        for tp, nxt in self._next.items():
            if only is not None and tp not in only:
                continue
            inflight = self._inflight.get(tp)
            safe = min(inflight) if inflight else nxt
            if safe > self._committed.get(tp, -1):
                out[tp] = safe
        return out

    def mark_committed(self, offsets: dict[TP, int]) -> None:
        for tp, off in offsets.items():
            self._committed[tp] = max(self._committed.get(tp, -1), off)

    def unmark(self, tps: set[TP]) -> None:
        """A commit failed: let the next commit send these partitions again."""
        for tp in tps:
            self._committed.pop(tp, None)

    def forget(self, tps: set[TP]) -> None:
        for tp in tps:
            self._inflight.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)


def _has_offset(m: Message) -> bool:
    off = m.offset()
    return m.topic() is not None and m.partition() is not None and off is not None and off >= 0


def _where(m: Message) -> tuple[TP, int]:
    """(topic, partition), offset of a consumed record (never None for a record)."""
    topic, part, off = m.topic(), m.partition(), m.offset()
    assert topic is not None and part is not None and off is not None
    return (topic, part), off


@dataclass
class _Out:
    """One record to produce for one input offset: a tag event or a dead letter."""

    topic: str
    tp: TP
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    kind: str  # "tag", "dlq" or "decision"
    label: str  # decision (tag) or reason (dlq), for metrics
    input_ts_ms: int | None = None
    timestamp_ms: int | None = None  # DLQ records keep the original timestamp
    attempts: int = 0
    seq: int = 0
    shrunk: int = 0  # dead letters: shrink steps taken (`dead_letters.shrink`)
    full: DeadLetter | None = None  # the uncut dead letter
    # the partition's assignment epoch when submitted: an ack of an earlier assignment must
    # not complete the same offset read again after the partition came back
    epoch: int = 0

    def shrink(self) -> bool:
        """Cut a dead letter one step further (the broker or producer found it too large);
        False when it is no dead letter or cannot get smaller."""
        if self.kind != "dlq":
            return False
        if self.full is None:
            self.full = (self.key, self.value, self.headers)
        cut = shrink(*self.full, self.shrunk)
        if cut is None:
            return False
        self.key, self.value, self.headers = cut
        self.shrunk += 1
        return True


class ConsumeError(TagstreamError):
    """librdkafka could not deliver the record at this offset (a corrupt or undecodable
    batch, say): dead-lettered without a value, so no commit moves past it silently."""


# produce errors that mean "this record is too large" (librdkafka's own check, the broker's)
TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


@dataclass
class _Staged:
    """A batch read, decoded and tokenized, handed to the encode thread."""

    records: list[Message]
    good: list[tuple[Message, UploadEvent]]
    bad: list[tuple[Message, str, BaseException, str]]  # msg, stage, exc, reason
    gens: dict[TP, int]  # partition generations when read (see KafkaService._gen_of)
    prep: Prepared | None = None
    emb: Future[Any] | None = None
    done: bool = False


def dead_letter_headers(m: Message, stage: str, exc: BaseException, reason: str) -> Headers:
    (topic, part), off = _where(m)
    return connect_error_headers(topic, part, off, m.headers(), stage, exc, reason)


class KafkaService:
    def __init__(
        self,
        settings: Settings,
        core: TaggingCore,
        metrics: Metrics,
        health: HealthState | None = None,
        *,
        max_produce_attempts: int = 5,
        drain_timeout_s: float | None = None,
        stuck_after_s: float = 20.0,
        pipeline_batches: int = 1,
        revoke_timeout_s: float | None = None,
        stats_interval_ms: int = 5000,
    ) -> None:
        self.s = settings
        self.core = core
        self.metrics = metrics
        poll_interval_s = settings.max_poll_interval_ms / 1000
        self.health = health or HealthState(poll_interval_s)
        metrics.assigned_partitions.set_function(lambda: self.health.assigned)
        self.tracker = OffsetTracker()
        self.max_produce_attempts = max_produce_attempts
        # Every wait is bounded by the clock that watches it: a batch (LLM answers, acks)
        # within half of max.poll.interval, so the loop polls again in time; a revoke well
        # inside the rebalance (whose timeout is max.poll.interval too): the group waits on it
        self.loop_budget_s = poll_interval_s / 2
        self.drain_timeout_s = drain_timeout_s or self.loop_budget_s
        self.revoke_timeout_s = revoke_timeout_s or min(30.0, poll_interval_s / 10)
        self.stats_interval_ms = stats_interval_ms
        self.stuck_after_s = stuck_after_s
        # batches whose records may still await acknowledgement while the next one encodes
        self.pipeline_batches = pipeline_batches
        # the batch the encode thread works on while the loop reads the next one
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tagstream-encode")
        self._ahead: _Staged | None = None
        # bumped when a partition is rewound, revoked or lost: a batch read before that
        # must not emit its records of the partition (they are read again, or not ours)
        self._gen_of: dict[TP, int] = {}
        # items whose LLM answer is still to come: produced when it arrives, while later
        # batches go on (their offsets stay uncommitted until then); (record, result, gen)
        self._llm_wait: list[tuple[Message, TagResult, int]] = []
        self._seq = itertools.count()
        self._gen = 0  # producer generation: callbacks of a replaced producer are ignored
        self._pending: dict[int, _Out] = {}
        # outputs (tag event, dead letter, decision record) not yet acknowledged, per input
        # offset: the input is done, and may be committed past, only when this reaches 0
        self._owed: dict[tuple[TP, int], int] = {}
        # pause mode: how often the record at an offset was deferred (capped, then review)
        self._deferrals: dict[tuple[TP, int], int] = {}
        self._assigned: set[TP] = set()
        self._epoch: dict[TP, int] = {}  # bumped when a partition stops being ours
        self._stop: threading.Event | None = None
        self._stopping_deadline: float | None = None
        # one budget per loop iteration, shared by all its waits (LLM answers, acks), so
        # their sum stays inside max.poll.interval
        self._iter_deadline = float("inf")
        # seconds spent waiting in `_drain` with records owed and no acknowledgement since
        # the last one (time the loop spends elsewhere, an encoder stuck say, does not count)
        self._silent_s = 0.0
        self._retry: list[_Out] = []
        self._failed: list[_Out] = []
        self._producer_fatal = False
        self._last_left, self._last_progress = 0, time.monotonic()  # producer progress
        self._paused_until: dict[TP, float] = {}
        self._pause_s: dict[TP, float] = {}
        try:
            self.consumer = Consumer(self._consumer_conf())
            self.producer = Producer(self._producer_conf())
        except KafkaException as e:  # librdkafka refuses the configuration (SASL, SSL files)
            raise TagstreamError(f"invalid Kafka client configuration: {e}") from None
        self.watcher: TagSystemWatcher | None = None
        if settings.tag_system is not None and settings.reload_interval_s > 0:
            self.watcher = TagSystemWatcher(
                settings.tag_system, core.tag_system, metrics, settings.reload_interval_s
            )

    # ---- configuration -------------------------------------------------------------------
    def _consumer_conf(self) -> dict[str, Any]:
        return self.s.kafka_common() | {
            "group.id": self.s.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": self.s.session_timeout_ms,
            "max.poll.interval.ms": self.s.max_poll_interval_ms,
            "statistics.interval.ms": self.stats_interval_ms,
            "stats_cb": self._on_stats,
            "on_commit": self._on_commit,
            "error_cb": self._on_error,
            "logger": KAFKA_LOGGER,
        }

    def _producer_conf(self) -> dict[str, Any]:
        return self.s.kafka_common() | {
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.timeout.ms": 60000,
            # a dead letter is the record plus headers: room for the largest record we can read
            "message.max.bytes": producer_max_bytes(self.s.max_event_bytes),
            "error_cb": self._on_producer_error,
            "logger": KAFKA_LOGGER,
        }

    # ---- callbacks -----------------------------------------------------------------------
    def _on_stats(self, raw: str) -> None:
        try:
            stats = orjson.loads(raw)
            parts = stats.get("topics", {}).get(self.s.input_topic, {}).get("partitions", {})
            for pid, p in parts.items():
                lag = p.get("consumer_lag", -1)
                if pid == "-1" or (self.s.input_topic, int(pid)) not in self._assigned:
                    continue  # not ours (any more): its series was removed on revoke/loss
                if lag is not None and lag >= 0:
                    self.metrics.lag.labels(topic=self.s.input_topic, partition=pid).set(lag)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            log.warning("bad_librdkafka_stats")

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        # librdkafka reports synchronous commits here too; _commit already counted and
        # logged them, so this only makes sure a failed commit is sent again next time.
        if err:
            self.tracker.unmark({(p.topic, p.partition) for p in partitions})

    @staticmethod
    def _on_error(err: KafkaError) -> None:
        if err.fatal():
            log.error("kafka_fatal_error", error=str(err))
        elif KAFKA_ERRORS.allow(str(err)):
            log.warning("kafka_error", error=str(err))

    def _on_producer_error(self, err: KafkaError) -> None:
        self._on_error(err)
        if err.fatal():
            self._producer_fatal = True  # e.g. the idempotent producer's state was lost

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions_assigned", partitions=[(p.topic, p.partition) for p in partitions])
        self._assigned |= {(p.topic, p.partition) for p in partitions}  # cooperative: adds
        self.health.assigned = len(self._assigned)
        self.metrics.rebalances.labels(event="assigned").inc()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Bounded by `revoke_timeout_s`, well inside the rebalance: what is acknowledged by
        then is committed; the rest of the revoked partitions' work (the batch read ahead,
        LLM answers still to come, unacknowledged records) is given up, and their new owner
        re-reads it from the commit. Waiting for it all could outlast the rebalance and get
        this member fenced, stalling the whole group."""
        revoked = {(p.topic, p.partition) for p in partitions}
        log.info("partitions_revoked", partitions=sorted(revoked))
        self.metrics.rebalances.labels(event="revoked").inc()
        self._bump(revoked)  # the batch ahead and the LLM waits drop their records of these
        try:
            self._drain(timeout_s=self.revoke_timeout_s, until=self._revoke_deadline())
        except KafkaRuntimeError as e:
            if not self.health.stopping:
                raise  # out of consume(): the service stops without committing past it
            log.warning("revoke_on_stop_not_drained", error=str(e))  # failing already
        finally:
            self._commit(only=revoked)
            self._release(revoked)

    def _revoke_deadline(self) -> float:
        """A revoke's own budget, whatever is left of the iteration's (the rebalance waits)."""
        deadline = time.monotonic() + self.revoke_timeout_s
        if self._stopping_deadline is not None:
            deadline = min(deadline, self._stopping_deadline)
        return deadline

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {(p.topic, p.partition) for p in partitions}
        log.warning("partitions_lost", partitions=sorted(lost))
        self.metrics.rebalances.labels(event="lost").inc()
        self._bump(lost)  # not ours any more: the batch ahead drops its records of these
        self._release(lost)

    def _release(self, tps: set[TP]) -> None:
        """Forget partitions that are no longer ours (revoked or lost). A pause of ours is
        lifted first (librdkafka keeps it across a re-assignment, and nothing would resume
        it); their records still to be re-sent are dropped (the new owner re-reads them)."""
        paused = [TopicPartition(t, p) for t, p in tps if (t, p) in self._paused_until]
        if paused:
            with contextlib.suppress(KafkaException):
                self.consumer.resume(paused)
        for tp in tps:
            self._epoch[tp] = self._epoch.get(tp, 0) + 1
        self._retry = [o for o in self._retry if o.tp not in tps]
        self._failed = [o for o in self._failed if o.tp not in tps]
        self.tracker.forget(tps)
        self._assigned -= tps
        self.health.assigned = len(self._assigned)
        for key in [k for k in (*self._owed, *self._deferrals) if k[0] in tps]:
            self._owed.pop(key, None)
            self._deferrals.pop(key, None)
        for tp in tps:
            self._paused_until.pop(tp, None)
            self._pause_s.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(tp[0], str(tp[1]))

    def _on_delivery(self, out: _Out, gen: int, err: KafkaError | None, msg: Message) -> None:
        if gen != self._gen or self._pending.get(out.seq) is not out:
            return  # a replaced producer's callback: the record was re-sent
        del self._pending[out.seq]
        if out.epoch != self._epoch.get(out.tp, 0):
            return  # of a partition given up since: its new owner (maybe us) re-reads it
        if err is not None:
            self._produce_failed(out, err)
            return
        self._silent_s = 0.0
        key = (out.tp, out.offset)
        left = self._owed.get(key, 1) - 1
        if left > 0:
            self._owed[key] = left
        else:
            self._owed.pop(key, None)
            self.tracker.done(out.tp, out.offset)  # every output of this input is acked
        if out.kind == "decision":
            self.metrics.decisions_recorded.inc()
            return
        if out.kind == "dlq":
            if is_truncated(out.headers):
                self.metrics.dlq_truncated.inc()
            self.metrics.dlq.labels(reason=out.label).inc()
            return
        self.metrics.produced.labels(decision=out.label).inc()
        if out.input_ts_ms:
            self.metrics.e2e_seconds.observe(max(0.0, time.time() - out.input_ts_ms / 1000))

    # ---- the loop ------------------------------------------------------------------------
    def check_topics(self, timeout_s: float = 10.0) -> None:
        """Fail fast, with the fix in the message, when the brokers cannot be reached (or
        refuse the credentials) or a topic we need does not exist."""
        try:
            md = self.consumer.list_topics(timeout=timeout_s)
        except KafkaException as e:
            kerr = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
            reason = kerr.str() if kerr is not None else str(e)
            raise UnavailableError(
                f"cannot reach the brokers at {self.s.bootstrap_servers}: {reason} "
                f"(waited {timeout_s:g} s; check the address, the network and "
                "--security-protocol / SASL settings)"
            ) from None
        missing = [
            t
            for t in (self.s.input_topic, self.s.output_topic, self.s.dlq, self.s.decisions_topic)
            if t and (t not in md.topics or md.topics[t].error is not None)
        ]
        if missing:
            raise TagstreamError(
                f"topic(s) {', '.join(missing)} do not exist on {self.s.bootstrap_servers}; "
                "create them (the dead-letter topic defaults to <input>.dlq, --dlq-topic "
                "changes it) or pass --no-check-topics if the broker creates topics itself"
            )

    def run(self, stop: threading.Event, on_batch: Callable[[int], None] | None = None) -> None:
        """Consume until `stop` is set; then finish, commit and close. Raises on fatal errors."""
        try:
            if self.s.check_topics:
                self.check_topics()
            self.consumer.subscribe(
                [self.s.input_topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            log.info(
                "consuming",
                topic=self.s.input_topic,
                group=self.s.group_id,
                output=self.s.output_topic,
                dlq=self.s.dlq,
            )
            self.health.stopping = False
            self._stop = stop
            while not stop.is_set():
                self._iter_deadline = time.monotonic() + self.loop_budget_s
                if self.watcher is not None:  # between batches: a clean version boundary
                    images = self.core.images
                    new = self.watcher.poll(
                        self.core.encoder.name,
                        self.core.encoder.dim,
                        (images.name, images.dim) if images is not None else None,
                    )
                    if new is not None:
                        self.core.swap_tag_system(new)
                self._resume_due()
                msgs = self.consumer.consume(self.s.batch_size, self.s.batch_timeout_s)
                self.health.beat()
                n = self._handle(msgs)
                if on_batch is not None and n:
                    on_batch(n)
            # SIGTERM: finish what was read within the shutdown budget (inside the pod's grace
            # period); what is not finished by then stays uncommitted
            self._iter_deadline = float("inf")
            self._stopping()
            self._finish_all()
        finally:
            self._stopping()  # after a failure: do not linger either
            try:
                # after a failure the batch ahead is abandoned (its records stay uncommitted)
                self._drain()
                self._commit()
            finally:
                self._encoder.shutdown(wait=True, cancel_futures=True)
                self.consumer.close()
                self.producer.flush(5)
                log.info("stopped", pending=self.tracker.pending())

    def _handle(self, msgs: list[Message]) -> int:
        """Read a batch and hand it to the encoder; then finish the batch before it.
        Returns how many records were finished."""
        staged = self._stage(msgs)
        if staged is None:
            n = self._finish_ahead()
            self._emit_answered()
            # idle: let acknowledgements arrive and be committed, but keep polling: an
            # output that is slow to be acked (its broker down) must not stop the loop
            self._drain(timeout_s=max(0.1, self.s.batch_timeout_s))
            self._commit()
            return n
        previous, self._ahead = self._ahead, staged
        if staged.prep is not None:
            staged.emb = self._encoder.submit(self.core.encode_prepared, staged.prep)
        n = self._finish(previous) if previous is not None else 0
        if not self.s.pipeline:
            n += self._finish_ahead()
        return n

    def _stage(self, msgs: list[Message]) -> _Staged | None:
        records: list[Message] = []
        unreadable: set[int] = set()  # ids of error events that stand for a record
        for m in msgs:
            err = m.error()
            if err is None:
                records.append(m)
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.fatal():
                raise KafkaRuntimeError(f"fatal consumer error: {err}", err.code())
            elif _has_offset(m):
                # a record librdkafka could not hand over (_BAD_MSG, failed decompression):
                # later records would move the commit past it, so it is dead-lettered
                records.append(m)
                unreadable.add(id(m))
            else:
                log.warning("consumer_error", error=str(err))
        if not records:
            return None
        self.metrics.batch_size.observe(len(records))
        staged = _Staged(records, [], [], {})
        t0 = time.perf_counter()
        for m in records:
            tp, off = _where(m)
            self.tracker.add(tp, off)
            staged.gens[tp] = self._gen_of.get(tp, 0)
            if id(m) in unreadable:
                self.metrics.consumed.labels(outcome="consume_error").inc()
                log.error(
                    "unreadable_record",
                    topic=tp[0],
                    partition=tp[1],
                    offset=off,
                    error=str(m.error()),
                )
                staged.bad.append((m, "consume", ConsumeError(str(m.error())), "consume_error"))
                continue
            try:
                ev = decode(m.value(), max_bytes=self.s.max_event_bytes)
            except DecodeError as e:
                self.metrics.consumed.labels(outcome=e.reason).inc()
                log.warning(
                    "malformed_event",
                    topic=tp[0],
                    partition=tp[1],
                    offset=off,
                    reason=e.reason,
                    error=str(e),
                )
                staged.bad.append((m, "decode", e, e.reason))
                continue
            self.metrics.consumed.labels(outcome="ok").inc()
            staged.good.append((m, ev))
        self.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - t0)
        if staged.good:
            staged.prep = self.core.prepare([ev for _, ev in staged.good])
        return staged

    def _bump(self, tps: set[TP]) -> None:
        for tp in tps:
            self._gen_of[tp] = self._gen_of.get(tp, 0) + 1

    def _stopping(self) -> None:
        """Not ready any more, and the shutdown budget starts (once)."""
        self.health.stopping = True
        if self._stopping_deadline is None:
            self._stopping_deadline = time.monotonic() + self.s.shutdown_timeout_s

    def _deadline(self, budget_s: float) -> float:
        """now + budget, but never past this iteration's budget, nor past the shutdown
        deadline once a stop was asked for (mid-iteration too: waits are cut short)."""
        if self._stop is not None and self._stop.is_set():
            self._stopping()
        deadline = min(time.monotonic() + budget_s, self._iter_deadline)
        if self._stopping_deadline is not None:
            deadline = min(deadline, self._stopping_deadline)
        return deadline

    def _finish_all(self) -> None:
        """The batch ahead and every LLM answer still to come (stop), within the shutdown
        deadline: an item still unanswered then is left uncommitted (re-read on restart)."""
        self._finish_ahead()
        self._emit_answered(wait_all=True)

    def _emit_answered(self, *, wait_all: bool = False) -> None:
        """Produce the LLM items whose answers arrived; wait for the oldest ones beyond
        `llm_max_pending` (backpressure), or for all of them; never past the loop budget."""
        keep: list[tuple[Message, TagResult, int]] = []
        stamp = now_iso()
        waiting = self._llm_wait
        deadline = self._deadline(self.loop_budget_s)
        for i, (m, res, gen) in enumerate(waiting):
            tp, _ = _where(m)
            if self._gen_of.get(tp, 0) != gen:
                continue  # revoked or lost since it was read: not ours to emit
            fut = res.llm_future
            if fut is not None and not fut.done():
                must = wait_all or len(waiting) - i > self.s.llm_max_pending
                if must:
                    wait_futures([fut], timeout=max(0.0, deadline - time.monotonic()))
                if not fut.done():  # not due, or not answered in time: stays uncommitted
                    keep.append((m, res, gen))
                    continue
            try:
                self.core.complete_llm(res)
            except Exception as e:
                self.metrics.consumed.labels(outcome="process_error").inc()
                self._submit(self._dead_letter(m, "process", e, "process_error"))
                continue
            self._emit(m, res, stamp)
        self._llm_wait = keep
        self.metrics.llm_waiting.set(len(keep))

    def _emit(self, m: Message, res: TagResult, stamp: str) -> None:
        """The tag event of one decided record, and its LLM decision when recorded: both
        must be acknowledged before the input may be committed past."""
        self._submit(self._tag_event(m, res, stamp))
        if self.s.decisions_topic and (rec := self.core.decision_record(res)):
            self._submit(self._decision(m, rec))

    def _finish_ahead(self) -> int:
        ahead, self._ahead = self._ahead, None
        return self._finish(ahead) if ahead is not None else 0

    def _await_batch_llm(self, results: list[TagResult | BaseException]) -> None:
        """Pause mode and `--no-pipeline`: the batch's LLM answers, within the loop budget.
        Unanswered then: deferred in pause mode (re-read later); otherwise they wait like
        the pipeline's LLM items, produced when answered."""
        futs = [r.llm_future for r in results if isinstance(r, TagResult) and r.llm_future]
        if not futs:
            return
        wait_futures(futs, timeout=max(0.0, self._deadline(self.loop_budget_s) - time.monotonic()))
        for i, r in enumerate(results):
            if not isinstance(r, TagResult) or r.llm_future is None:
                continue
            if r.llm_future.done():
                try:
                    self.core.complete_llm(r)
                except Exception as e:
                    results[i] = e
            elif r.audit:  # an audit never holds up what the gate accepted
                r.llm_future.cancel()
                r.llm_future, r.llm_status = None, "timeout"
            elif self.core.defer_when_llm_unavailable:
                r.llm_future.cancel()
                r.llm_future, r.llm_status, r.deferred = None, "timeout", True

    def _deferred(self, m: Message, res: TagResult) -> bool:
        """Pause mode: whether this record is re-read later. A record deferred more than
        `llm_max_deferrals` times goes out as review instead, so a partition never stalls
        on one item."""
        tp, off = _where(m)
        if not res.deferred:
            self._deferrals.pop((tp, off), None)
            return False
        n = self._deferrals.get((tp, off), 0) + 1
        if n <= self.s.llm_max_deferrals:
            self._deferrals[(tp, off)] = n
            return True
        self._deferrals.pop((tp, off), None)
        res.deferred = False  # stays `review` with the encoder's tags
        self.metrics.llm_deferrals_exhausted.inc()
        log.warning(
            "llm_deferrals_exhausted", topic=tp[0], partition=tp[1], offset=off, deferrals=n - 1
        )
        return False

    def _finish(self, staged: _Staged) -> int:
        """Gate, produce and commit a batch whose embeddings are (being) computed."""
        if staged.done:  # a rebalance callback inside this finish finished it already
            return 0
        staged.done = True
        results: list[TagResult | BaseException] = []
        if staged.prep is not None and staged.emb is not None:
            try:
                results = self.core.decide_isolating(staged.prep, staged.emb, wait_llm=False)
            except CoreBrokenError as e:
                raise KafkaRuntimeError(str(e)) from e
            # pause mode needs the answers now (it rewinds to the first it lacks), and so
            # does --no-pipeline; otherwise LLM items are produced when answered
            if self.core.defer_when_llm_unavailable or not self.s.pipeline:
                self._await_batch_llm(results)
        t0 = time.perf_counter()
        live = {tp for tp, g in staged.gens.items() if self._gen_of.get(tp, 0) == g}
        bad = [b for b in staged.bad if _where(b[0])[0] in live]
        tagged: list[tuple[Message, TagResult]] = []
        for (m, _ev), res in zip(staged.good, results, strict=True):
            if _where(m)[0] not in live:
                continue  # rewound, revoked or lost since it was read
            if isinstance(res, TagResult):
                tagged.append((m, res))
            else:  # the item's own fault (no_content), or it failed alone (process_error)
                reason = res.reason if isinstance(res, NoContentError) else "process_error"
                self.metrics.consumed.labels(outcome=reason).inc()
                bad.append((m, "process", res, reason))
        # pause mode: from the first deferred item on, a partition is re-read later
        rewind: dict[TP, int] = {}
        for m, res in tagged:
            if self._deferred(m, res):
                tp, off = _where(m)
                rewind[tp] = min(rewind.get(tp, off), off)
        stamp = now_iso()
        for m, stage, exc, reason in bad:
            tp, off = _where(m)
            if tp not in rewind or off < rewind[tp]:
                self._submit(self._dead_letter(m, stage, exc, reason))
        for m, res in tagged:
            tp, off = _where(m)
            if tp not in rewind or off < rewind[tp]:
                if res.llm_future is not None:
                    self._llm_wait.append((m, res, staged.gens[tp]))
                    continue
                self._emit(m, res, stamp)
        self._emit_answered()
        seen = {_where(m)[0] for m in staged.records} & live
        if rewind:
            self._pause_and_rewind(rewind, seen)
        else:
            for tp in seen:
                self._pause_s.pop(tp, None)
        # the previous batch's records may still be in flight: the next batch encodes meanwhile
        self._drain(max_pending=max(1, self.s.batch_size) * self.pipeline_batches)
        self.metrics.stage_seconds.labels(stage="produce").observe(time.perf_counter() - t0)
        self._commit()
        return len(staged.records)

    def _tag_event(self, m: Message, res: TagResult, stamp: str) -> _Out:
        tp, off = _where(m)
        ts_type, ts = m.timestamp()
        return _Out(
            topic=self.s.output_topic,
            tp=tp,
            offset=off,
            key=res.event.id.encode(),
            value=orjson.dumps(self.core.to_payload(res)),
            headers=ce_headers(
                event_id=res.event.id,
                source_ref=f"{tp[0]}-{tp[1]}-{off}",
                ce_source=self.s.ce_source,
                time_iso=stamp,
            ),
            kind="tag",
            label=res.decision.value,
            input_ts_ms=ts if ts_type != 0 and ts > 0 else None,
        )

    def _decision(self, m: Message, record: dict[str, Any]) -> _Out:
        tp, off = _where(m)
        assert self.s.decisions_topic is not None
        return _Out(
            topic=self.s.decisions_topic,
            tp=tp,
            offset=off,
            key=str(record["id"]).encode(),
            value=orjson.dumps(record),
            headers=[],
            kind="decision",
            label="llm",
        )

    def _dead_letter(self, m: Message, stage: str, exc: BaseException, reason: str) -> _Out:
        tp, off = _where(m)
        ts_type, ts = m.timestamp()
        return _Out(
            topic=self.s.dlq,
            tp=tp,
            offset=off,
            key=m.key(),
            # an unreadable record's "value" is librdkafka's error text: send none
            value=None if isinstance(exc, ConsumeError) else m.value(),
            headers=dead_letter_headers(m, stage, exc, reason),
            kind="dlq",
            label=reason,
            timestamp_ms=ts if ts_type != 0 and ts > 0 else None,
        )

    # ---- pause / resume (LLM unavailable in pause mode) ------------------------------------
    def _pause_and_rewind(self, rewind: dict[TP, int], seen: set[TP]) -> None:
        now = time.monotonic()
        self._bump(set(rewind))
        for tp, off in rewind.items():
            self.tracker.rewind(tp, off)
            part = TopicPartition(tp[0], tp[1], off)
            self.consumer.pause([part])
            self.consumer.seek(part)
            wait = min(self._pause_s.get(tp, self.s.llm_pause_s / 2) * 2, 300.0)
            self._pause_s[tp] = wait
            self._paused_until[tp] = now + wait
            self.metrics.partition_pauses.inc()
            log.warning(
                "llm_unavailable_pausing", topic=tp[0], partition=tp[1], offset=off, seconds=wait
            )
        for tp in seen - set(rewind):
            self._pause_s.pop(tp, None)

    def _resume_due(self) -> None:
        if not self._paused_until:
            return
        now = time.monotonic()
        due = [tp for tp, t in self._paused_until.items() if t <= now]
        if due:
            self.consumer.resume([TopicPartition(t, p) for t, p in due])
            for tp in due:
                del self._paused_until[tp]
            log.info("partitions_resumed", partitions=due)

    # ---- producing -----------------------------------------------------------------------
    def _submit(self, out: _Out) -> None:
        """Send an output of an input offset; the input is done when all of them are acked."""
        key = (out.tp, out.offset)
        self._owed[key] = self._owed.get(key, 0) + 1
        out.epoch = self._epoch.get(out.tp, 0)
        self._send(out)

    def _send(self, out: _Out) -> None:
        """Hand one record to the producer. A synchronous refusal is handled like a failed
        delivery (retried, shrunk, or the stop), never raised past the loop."""
        out.seq = next(self._seq)
        kwargs: dict[str, Any] = {}
        if out.timestamp_ms:
            kwargs["timestamp"] = out.timestamp_ms
        while True:
            try:
                self.producer.produce(
                    out.topic,
                    key=out.key,
                    value=out.value,
                    headers=out.headers,
                    on_delivery=partial(self._on_delivery, out, self._gen),
                    **kwargs,
                )
            except BufferError:
                self.producer.poll(0.1)  # local queue full: serve callbacks, then retry
                continue
            except KafkaException as e:
                self._produce_failed(out, e.args[0])
                return
            self._pending[out.seq] = out
            return

    def _produce_failed(self, out: _Out, err: KafkaError) -> None:
        """A record not acknowledged: a dead letter too large is cut and re-sent; anything
        else is re-sent a few times, then `_drain` stops the service without committing."""
        self.metrics.produce_errors.inc()
        if out.epoch != self._epoch.get(out.tp, 0):
            return  # of a partition given up since: nothing to re-send
        if err.code() in TOO_LARGE and out.shrink():
            log.warning(
                "dead_letter_truncated",
                topic=out.topic,
                offset=out.offset,
                value_bytes=len(out.value or b""),
                step=out.shrunk,
                error=str(err),
            )
            self._retry.append(out)
            return
        if err.fatal():
            self._producer_fatal = True
        out.attempts += 1
        log.warning(
            "produce_failed",
            topic=out.topic,
            offset=out.offset,
            error=str(err),
            attempt=out.attempts,
        )
        (self._retry if out.attempts < self.max_produce_attempts else self._failed).append(out)

    def _recreate_producer(self, reason: str) -> None:
        """Replace a fatal or stuck producer and re-send what it never acknowledged."""
        log.warning("producer_recreated", reason=reason, pending=len(self._pending))
        self.metrics.producer_recreated.inc()
        old = self.producer
        self._gen += 1
        try:
            old.purge(in_queue=True, in_flight=True)
            old.poll(0)
        except KafkaException as e:
            log.warning("producer_purge_failed", error=str(e))
        self._producer_fatal = False
        self.producer = Producer(self._producer_conf())
        resend = list(self._pending.values()) + self._retry
        self._pending.clear()
        self._retry = []
        for out in resend:
            self._send(out)

    def _drain(
        self, max_pending: int = 0, *, timeout_s: float | None = None, until: float | None = None
    ) -> None:
        """Serve delivery reports until at most `max_pending` records await acknowledgement
        (0: all of them); re-send failures a few times; replace a fatal or stuck producer.

        Between batches the loop passes one batch's worth, so the next batch encodes while
        the last one's acknowledgements arrive (the encoder is not idle on a broker round
        trip). Bounded by `until`, else `timeout_s` within the iteration's (and the
        shutdown's) budget: past it, the unacknowledged inputs stay uncommitted and the loop
        goes on polling. What stops the service (without committing past the record): a
        record refused `max_produce_attempts` times, or no acknowledgement at all for
        `drain_timeout_s` while records are owed (a broker that takes nothing)."""
        deadline = until or self._deadline(self.drain_timeout_s if timeout_s is None else timeout_s)
        last = time.monotonic()
        while True:
            if max_pending:
                self.producer.poll(0)
            else:
                self.producer.flush(max(0.0, min(0.5, deadline - time.monotonic())))
            if self._failed:
                bad = self._failed[0]
                raise KafkaRuntimeError(
                    f"record for {bad.tp[0]}[{bad.tp[1]}]@{bad.offset} not acknowledged after "
                    f"{bad.attempts} attempts; not committing past it"
                )
            if self._producer_fatal:
                self._recreate_producer("fatal error")
                continue
            if self._retry:
                retry, self._retry = self._retry, []
                for out in retry:
                    self._send(out)
                continue
            left = len(self._pending)
            now = time.monotonic()
            if left != self._last_left or left == 0:
                self._last_left, self._last_progress = left, now
            self._silent_s = self._silent_s + (now - last) if left else 0.0
            last = now
            if left <= max_pending:
                return
            if self._silent_s > self.drain_timeout_s:
                raise KafkaRuntimeError(
                    f"no acknowledgement for {self.drain_timeout_s:.0f}s ({left} records "
                    "owed); not committing past them"
                )
            if now - self._last_progress > self.stuck_after_s:
                self._recreate_producer(f"no acknowledgement for {self.stuck_after_s:.0f}s")
                self._last_progress = now
            if now > deadline:
                log.debug("drain_deadline", unacknowledged=left)
                return
            if max_pending:
                self.producer.poll(0.05)

    def _commit(self, only: set[TP] | None = None) -> None:
        """Synchronous, of what is acknowledged. A partition whose commit failed (the call,
        or its own error in the result) is sent again by the next commit."""
        offsets = self.tracker.committable(only)
        if not offsets:
            return
        tps = [TopicPartition(t, p, off) for (t, p), off in offsets.items()]
        try:
            result = self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as e:
            self.metrics.commits.labels(result="error").inc()
            log.warning("commit_failed", error=str(e))
            return
        failed = {(p.topic, p.partition): p.error for p in result or [] if p.error is not None}
        if failed:
            self.metrics.commits.labels(result="error").inc()
            log.warning(
                "commit_failed", partitions={f"{t}[{p}]": str(e) for (t, p), e in failed.items()}
            )
        else:
            self.metrics.commits.labels(result="ok").inc()
        self.tracker.mark_committed({tp: off for tp, off in offsets.items() if tp not in failed})
