"""Assemble the service from settings: encoder, tag system, LLM, core, metrics, health."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from consumer.service.health import HealthState
from consumer.tagging.config import Settings
from consumer.tagging.core import TaggingCore
from consumer.tagging.handbook import Handbook
from consumer.tagging.image_stage import ImageOptions, ImageStage
from consumer.tagging.llm import SelectiveTagger
from consumer.tagging.llm_server import GEMMA, MODEL_NAME, LocalLLM
from consumer.tagging.metrics import Metrics
from consumer.tagging.parts import load_tag_system, make_tagger
from models_onnx import OnnxEncoder
from tagsys.errors import TagstreamError

log = structlog.get_logger(__name__)


@dataclass
class Stack:
    settings: Settings
    metrics: Metrics
    core: TaggingCore
    health: HealthState
    local_llm: LocalLLM | None


def image_stage(settings: Settings, metrics: Metrics) -> ImageStage | None:
    """The image path, when an image model is configured (off by default)."""
    if not settings.image_model:
        if settings.image_hosts.strip() or settings.llm_images:
            raise TagstreamError(
                "--image-hosts and --llm-images need --image-model (an image/text encoder "
                "pair exported with `tagstream export-onnx --clip`)"
            )
        return None
    opts = ImageOptions(
        model=settings.image_model,
        hosts=settings.image_hosts,
        schemes=settings.image_schemes,
        max_images=settings.image_max_frames,
        max_bytes=settings.image_max_bytes,
        max_pixels=settings.image_max_pixels,
        connect_timeout_s=settings.image_connect_timeout_s,
        read_timeout_s=settings.image_read_timeout_s,
        concurrency=settings.image_concurrency,
    )
    stage = opts.stage(metrics, settings.model_dir, settings.device)
    log.info(
        "image_model_loaded",
        image_model=stage.encoder.name,
        variant=stage.encoder.variant,
        hosts=list(stage.fetcher.policy.hosts) or "none (inline cover_b64 only)",
    )
    return stage


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
    images = image_stage(settings, metrics)
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
            trust_unfitted_gate=settings.unfitted_gate == "trust",
            audit_fraction=settings.audit_fraction,
            handbook=Handbook.load(settings.llm_handbook) if settings.llm_handbook else None,
            emit_extract=settings.emit_extract,
            images=images,
            llm_images=settings.llm_images,
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
