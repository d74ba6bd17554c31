"""The pieces every runner assembles (the service, `eval`, the demo): the built-in sample tag
system, a tag system from disk, the LLM tagger from settings."""

from __future__ import annotations

from pathlib import Path

import structlog
from pydantic import SecretStr

from consumer.tagging.config import Settings
from consumer.tagging.llm import SelectiveTagger
from consumer.tagging.metrics import Metrics
from consumer.tagging.resilience import CircuitBreaker, RateLimiter
from models_onnx import OnnxEncoder
from tagsys import TagSystem, build_tag_system, load_sample_tags

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
        extract=settings.llm_extract,
    )
