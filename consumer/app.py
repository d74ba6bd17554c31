"""Assemble the service from settings: encoder, tag system, LLM, core, metrics, health."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from consumer.config import Settings
from consumer.core import TaggingCore
from consumer.health import HealthServer, HealthState
from consumer.llm import SelectiveTagger
from consumer.llm_server import GEMMA, MODEL_NAME, LocalLLM
from consumer.metrics import Metrics
from consumer.resilience import CircuitBreaker, RateLimiter
from models_onnx import OnnxEncoder
from tagsys import TagSystem, build_tag_system, load_sample_tags
from tagsys.errors import TagstreamError

log = structlog.get_logger(__name__)


def sample_tag_system(encoder: OnnxEncoder) -> TagSystem:
    """The built-in demo vocabulary, embedded with `encoder`."""
    tags, gate, version = load_sample_tags()
    tag_enc = encoder.tag_encoder()
    return build_tag_system("sample", version, tags, tag_enc.encode, encoder.name, gate)


def load_tag_system(path: Path | None, encoder: OnnxEncoder) -> TagSystem:
    if path is None:
        ts = sample_tag_system(encoder)
        log.info("tag_system_sample", version=ts.version_id, tags=len(ts.tags))
        return ts
    ts = TagSystem.load(path)
    log.info("tag_system_loaded", path=str(path), version=ts.version_id, tags=len(ts.tags))
    return ts


def make_tagger(
    settings: Settings, base_url: str, model: str, key: SecretStr, metrics: Metrics
) -> SelectiveTagger:
    return SelectiveTagger(
        base_url,
        model,
        key,
        timeout_s=settings.llm_timeout_s,
        max_tokens=settings.llm_max_tokens,
        metrics=metrics,
        attempts=settings.llm_attempts,
        breaker=CircuitBreaker(settings.llm_breaker_failures, settings.llm_breaker_reset_s),
        limiter=RateLimiter(settings.llm_rate_limit) if settings.llm_rate_limit > 0 else None,
    )


@dataclass
class Stack:
    settings: Settings
    metrics: Metrics
    core: TaggingCore
    health: HealthState
    local_llm: LocalLLM | None


@contextlib.contextmanager
def build_stack(settings: Settings, registry: CollectorRegistry | None = None) -> Iterator[Stack]:
    """Everything but Kafka; stops the local LLM and the LLM thread pool on exit."""
    if settings.llm.strip().lower() == "local" and settings.llm_model != MODEL_NAME:
        # the service asks a chat model for JSON; the other bundled model is a base model
        raise TagstreamError(
            f"--llm local serves the bundled {MODEL_NAME} (the service needs a chat model), "
            f"not {settings.llm_model!r}; {GEMMA} is a base model for build-tags and "
            "describe-tags. Unset --llm-model / TAGSTREAM_LLM_MODEL or give an endpoint URL"
        )
    metrics = Metrics(registry)
    encoder = OnnxEncoder(settings.model, model_dir=settings.model_dir, device=settings.device)
    log.info("encoder_loaded", encoder=encoder.id, device=encoder.device)
    ts = load_tag_system(settings.tag_system, encoder)
    local: LocalLLM | None = None
    tagger: SelectiveTagger | None = None
    llm = settings.llm.strip()
    try:
        if llm.lower() == "local":
            local = LocalLLM().start()
            tagger = make_tagger(settings, local.base_url, local.model, SecretStr(""), metrics)
        elif llm.lower() not in ("", "none", "off"):
            tagger = make_tagger(settings, llm, settings.llm_model, settings.llm_api_key, metrics)
        core = TaggingCore(
            encoder,
            ts,
            tagger=tagger,
            metrics=metrics,
            llm_concurrency=settings.llm_concurrency,
            max_field_chars=settings.max_field_chars,
            emit_embedding=settings.emit_embedding,
            defer_when_llm_unavailable=settings.llm_unavailable == "pause",
            llm_mode=settings.llm_mode,
            generative_threshold=settings.generative_threshold,
            new_tags_file=settings.new_tags_file,
            max_batch_tokens=settings.max_batch_tokens,
        )
        health = HealthState(settings.max_poll_interval_ms / 1000)
        core.warm_up()
        health.warmed = True
        try:
            yield Stack(settings, metrics, core, health, local)
        finally:
            core.close()
    finally:
        if local is not None:
            local.stop()


def run_service(settings: Settings, registry: CollectorRegistry | None = None) -> None:
    """`tagstream run`: serve until SIGTERM/SIGINT, then finish the batch, commit, exit."""
    from consumer.runner import KafkaService

    if settings.runtime == "faust":
        from consumer.faust_runtime import run_faust

        run_faust(settings)
        return

    stop = threading.Event()
    healths: list[HealthState] = []

    def _stop(signum: int, _frame: object) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        for health in healths:  # not ready from this moment, not from the loop's next turn
            health.stopping = True
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with build_stack(settings, registry) as stack:
        healths.append(stack.health)
        server = HealthServer(
            stack.metrics.registry, stack.health, settings.metrics_host, settings.metrics_port
        ).start()
        log.info("metrics_listening", host=settings.metrics_host, port=server.port)
        try:
            KafkaService(settings, stack.core, stack.metrics, stack.health).run(stop)
        finally:
            server.stop()
