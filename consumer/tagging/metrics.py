"""Prometheus metrics, all under the `tagstream_` prefix, on a registry passed in.

Buckets follow text-embeddings-inference: x1.5 steps from 10 µs for stage latencies,
powers of two for batch sizes.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

STAGES = ("decode", "tokenize", "encode", "match", "llm", "produce")
# with an image model: waiting for the batch's fetches (after its text is encoded), encoding
IMAGE_STAGES = ("image_wait", "image_encode")
# refused: the endpoint answered 4xx (bad key, model, request); never retried or deferred
LLM_STATUSES = (
    "ok",
    "error",
    "timeout",
    "rate_limited",
    "unavailable",
    "refused",
    "invalid",
    "empty",
)


def _stage_buckets() -> list[float]:
    out, b = [], 1e-5
    while b < 60:
        out.append(round(b, 7))
        b *= 1.5
    return out


def _pkg_version() -> str:
    try:
        return version("tagstream")
    except PackageNotFoundError:
        return "dev"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total, memory, open fds: the dashboard's CPU panel reads them
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.consumed = Counter(
            "tagstream_events_consumed_total",
            "Input records read, by outcome (ok, or the reason a record was malformed).",
            ["outcome"],
            registry=r,
        )
        self.produced = Counter(
            "tagstream_events_produced_total",
            "Tag events acknowledged by the broker, by decision (encoder, llm, review).",
            ["decision"],
            registry=r,
        )
        self.produce_errors = Counter(
            "tagstream_produce_errors_total",
            "Tag events the broker did not acknowledge (retried; never committed past).",
            registry=r,
        )
        self.stage_seconds = Histogram(
            "tagstream_stage_duration_seconds",
            "Time per pipeline stage, per batch (llm: per request).",
            ["stage"],
            buckets=_stage_buckets(),
            registry=r,
        )
        self.e2e_seconds = Histogram(
            "tagstream_end_to_end_seconds",
            "From the input record's timestamp to the broker's ack of its tag event.",
            buckets=_stage_buckets(),
            registry=r,
        )
        self.batch_size = Histogram(
            "tagstream_batch_size",
            "Events per consumed batch.",
            buckets=[2.0**i for i in range(0, 12)],
            registry=r,
        )
        self.llm_requests = Counter(
            "tagstream_llm_requests_total",
            "LLM requests by status (" + ", ".join(LLM_STATUSES) + ").",
            ["status"],
            registry=r,
        )
        self.llm_tokens = Counter(
            "tagstream_llm_tokens_total",
            "LLM tokens used, by kind (prompt, completion).",
            ["kind"],
            registry=r,
        )
        self.llm_retries = Counter(
            "tagstream_llm_retries_total",
            "LLM requests repeated after a retryable failure (timeout, 429, 5xx, bad answer).",
            registry=r,
        )
        self.llm_circuit_open = Gauge(
            "tagstream_llm_circuit_open",
            "1 while the LLM circuit breaker is open (items skip the LLM).",
            registry=r,
        )
        self.llm_waiting = Gauge(
            "tagstream_llm_waiting_items",
            "Items awaiting their LLM answer; produced when it arrives (offsets held below).",
            registry=r,
        )
        self.llm_routed = Counter(
            "tagstream_llm_routed_total",
            "Items the gate found uncertain and routed to the LLM (or to review when it is off).",
            registry=r,
        )
        self.llm_rejected_tags = Counter(
            "tagstream_llm_rejected_tags_total",
            "Tags in LLM answers that were not on the item's shortlist (dropped).",
            registry=r,
        )
        self.tag_system_reloads = Counter(
            "tagstream_tag_system_reloads_total",
            "Hot reloads of the tag system: ok (switched at a batch boundary) or error (refused).",
            ["result"],
            registry=r,
        )
        self.decisions_recorded = Counter(
            "tagstream_decisions_recorded_total",
            "LLM decisions acknowledged on the decisions topic (training data for distill).",
            registry=r,
        )
        self.new_tag_candidates = Counter(
            "tagstream_new_tag_candidates_total",
            "Generative mode: LLM tags that mapped onto no vocabulary tag (new-tag candidates).",
            registry=r,
        )
        self.lag = Gauge(
            "tagstream_consumer_lag_messages",
            "Consumer lag per assigned partition, from librdkafka statistics.",
            ["topic", "partition"],
            registry=r,
        )
        self.dlq = Counter(
            "tagstream_dlq_events_total",
            "Records sent to the dead-letter topic (acknowledged), by reason.",
            ["reason"],
            registry=r,
        )
        self.dlq_truncated = Counter(
            "tagstream_dlq_truncated_total",
            "Dead letters sent with their value cut (the broker refused them as too large).",
            registry=r,
        )
        self.llm_deferrals_exhausted = Counter(
            "tagstream_llm_deferrals_exhausted_total",
            "Pause mode: items deferred --llm-max-deferrals times, then sent as review.",
            registry=r,
        )
        self.rebalances = Counter(
            "tagstream_rebalance_events_total",
            "Partitions assignment changes seen by this consumer (assigned, revoked, lost).",
            ["event"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "tagstream_assigned_partitions",
            "Input partitions this replica owns (0: idle, e.g. more replicas than partitions).",
            registry=r,
        )
        self.producer_recreated = Counter(
            "tagstream_producer_recreated_total",
            "Producers replaced after a fatal error or no acknowledgement for too long.",
            registry=r,
        )
        self.partition_pauses = Counter(
            "tagstream_partition_pauses_total",
            "Partitions paused and rewound because the LLM was unavailable (pause mode).",
            registry=r,
        )
        self.commits = Counter(
            "tagstream_commits_total",
            "Offset commits by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.llm_extracts = Counter(
            "tagstream_llm_extracts_total",
            "--llm-extract answers by whether their extract (subject, entities, scene, intent) "
            "was valid: ok, or invalid (the answer is retried once, then the item is review).",
            ["result"],
            registry=r,
        )
        self.audits = Counter(
            "tagstream_audits_total",
            "Auto-accepted items the LLM was asked about too (the audit sample), by whether "
            "its answer agreed with the encoder's tags (agree, disagree, no_answer).",
            ["result"],
            registry=r,
        )
        self.gate_agreement = Gauge(
            "tagstream_gate_agreement",
            "Share of audited auto-accepted items whose LLM answer is the encoder's tags, per "
            "tag-system version (since this process started).",
            ["tag_system"],
            registry=r,
        )
        self.gate_fitted = Gauge(
            "tagstream_gate_fitted",
            "1 when the running tag system's gate was fitted on labels or LLM decisions and "
            "reached its target precision; 0: its confidence is unmeasured or short of its "
            "target, and it auto-accepts nothing (TAGSTREAM_UNFITTED_GATE).",
            registry=r,
        )
        self.image_fetches = Counter(
            "tagstream_image_fetches_total",
            "Images an event referenced (cover_url, frame_urls, cover_b64), by result: ok, "
            "or why it was not used (host, private_address, redirect, timeout, too_large, "
            "content_type, not_an_image, bomb, ...). The item then goes on with what it has.",
            ["result"],
            registry=r,
        )
        self.build_info = Info(
            "tagstream_build", "Version of tagstream, encoder and tag system.", registry=r
        )
        self.build_info.info({"version": _pkg_version(), "encoder": "", "tag_system": ""})
        for s in STAGES:
            self.stage_seconds.labels(stage=s)
        for status in LLM_STATUSES:
            self.llm_requests.labels(status=status)
        for d in ("encoder", "llm", "review"):
            self.produced.labels(decision=d)
        self.consumed.labels(outcome="ok")
        # counters alerts take `increase()` of exist at 0 from the start: the first error
        # then counts (a series that first appears at 1 has no increase)
        for result in ("ok", "error"):
            self.tag_system_reloads.labels(result=result)
            self.commits.labels(result=result)

    def set_build(self, encoder: str, tag_system: str) -> None:
        self.build_info.info(
            {"version": _pkg_version(), "encoder": encoder, "tag_system": tag_system}
        )
