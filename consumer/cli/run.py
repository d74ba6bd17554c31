"""`tagstream run` (the service) and `tagstream send`."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from consumer.cli import logs
from consumer.cli.options import (
    Bootstrap,
    DeviceChoice,
    LLMMode,
    LogLevel,
    ModelDirOpt,
    ModelOpt,
    RuntimeChoice,
    UnavailableChoice,
    UnfittedChoice,
    env_option,
    err,
)


def run(
    bootstrap_servers: Bootstrap = "127.0.0.1:9092",
    input_topic: Annotated[str, env_option("input_topic", "Topic of upload events.")] = "uploads",
    output_topic: Annotated[str, env_option("output_topic", "Topic for tag events.")] = "tags",
    group_id: Annotated[str, env_option("group_id", "Consumer group id.")] = "tagstream",
    tag_system: Annotated[
        Path | None,
        env_option("tag_system", "Tag-system folder (default: the built-in sample vocabulary)."),
    ] = None,
    llm: Annotated[
        str,
        env_option(
            "llm",
            "'none', 'local' (start the bundled SmolLM2 llama.cpp server) or the base URL "
            "of an OpenAI-compatible API, e.g. http://host:8000/v1.",
        ),
    ] = "none",
    llm_model: Annotated[
        str, env_option("llm_model", "Model name sent to the LLM endpoint.")
    ] = "smollm2",
    llm_concurrency: Annotated[int, env_option("llm_concurrency", "Concurrent LLM requests.")] = 4,
    llm_timeout_s: Annotated[
        float, env_option("llm_timeout_s", "Timeout of one LLM request, seconds.")
    ] = 30.0,
    model: ModelOpt = "all-MiniLM-L6-v2",
    model_dir: ModelDirOpt = None,
    device: Annotated[
        DeviceChoice, env_option("device", "Where the encoder runs (auto: CUDA if usable).")
    ] = DeviceChoice.auto,
    batch_size: Annotated[int, env_option("batch_size", "Most records per batch.")] = 64,
    batch_timeout_s: Annotated[
        float, env_option("batch_timeout_s", "Longest wait to fill a batch, seconds.")
    ] = 0.05,
    pipeline: Annotated[
        bool,
        env_option(
            "pipeline",
            "Read, decode and tokenize the next batch while this one encodes; produce "
            "LLM items when answered instead of holding their batch.",
        ),
    ] = True,
    llm_max_pending: Annotated[
        int,
        env_option(
            "llm_max_pending", "LLM items awaiting answers across batches before the loop waits."
        ),
    ] = 256,
    emit_embedding: Annotated[
        bool, env_option("emit_embedding", "Put the content embedding on each tag event.")
    ] = False,
    metrics_host: Annotated[
        str, env_option("metrics_host", "Bind address of the metrics/health port.")
    ] = "0.0.0.0",
    metrics_port: Annotated[
        int, env_option("metrics_port", "Port for /metrics, /healthz, /readyz (0: any).")
    ] = 9108,
    session_timeout_ms: Annotated[
        int, env_option("session_timeout_ms", "Kafka consumer session.timeout.ms.")
    ] = 10000,
    dlq_topic: Annotated[
        str | None, env_option("dlq_topic", "Dead-letter topic (default: <input>.dlq).")
    ] = None,
    llm_unavailable: Annotated[
        UnavailableChoice,
        env_option(
            "llm_unavailable",
            "When the LLM is down: 'review' sends encoder tags with needs_review; 'pause' "
            "pauses the partition and re-reads from the item later.",
        ),
    ] = UnavailableChoice.review,
    unfitted_gate: Annotated[
        UnfittedChoice,
        env_option(
            "unfitted_gate",
            "A tag system whose gate was never fitted on labels or LLM decisions (zero-shot, "
            "the sample), or whose fit fell short of its target precision (reached: false): "
            "'llm' auto-accepts nothing (items go to the LLM, or out as review), 'trust' "
            "applies its thresholds anyway. Fit one with calibrate or distill.",
        ),
    ] = UnfittedChoice.llm,
    llm_handbook: Annotated[
        str | None,
        env_option(
            "llm_handbook",
            "Interest handbook (JSON, consumer/schemas/handbook.v1.json; 'sample' for the "
            "one bundled for the sample vocabulary): the section of an item's category "
            "guides the LLM, and its version is recorded with each decision.",
        ),
    ] = None,
    llm_extract: Annotated[
        bool,
        env_option(
            "llm_extract",
            "The LLM first extracts the item's facts (subject, entities, scene, intent; "
            "validated, bounded), then picks tags: one when one fits, extras only when the "
            "facts name them. Recorded in decision records.",
        ),
    ] = False,
    emit_extract: Annotated[
        bool, env_option("emit_extract", "Put the LLM's extract on the tag event too.")
    ] = False,
    audit_fraction: Annotated[
        float,
        env_option(
            "audit_fraction",
            "Share of auto-accepted items the LLM is asked about too (their tag events wait "
            "for it): tagstream_gate_agreement per tag-system version, and with "
            "--decisions-topic, records a re-fitted gate learns from.",
            min=0.0,
            max=1.0,
        ),
    ] = 0.0,
    image_model: Annotated[
        str | None,
        env_option(
            "image_model",
            "An image/text encoder pair exported with `export-onnx --clip` (a folder, or a "
            "name under --model-dir): cover_url, frame_urls and cover_b64 are scored against "
            "the tag system's image embeddings (import-tags --image-model). Off by default.",
        ),
    ] = None,
    image_hosts: Annotated[
        str,
        env_option(
            "image_hosts",
            "Where images may be fetched from, comma-separated: hostnames, *.domain, IPs, "
            "CIDRs. Nothing by default (no fetching). A private, loopback or link-local "
            "address is reached only when its IP or CIDR is listed too.",
        ),
    ] = "",
    image_schemes: Annotated[
        str, env_option("image_schemes", "URL schemes images may be fetched with.")
    ] = "https",
    image_max_frames: Annotated[
        int,
        env_option("image_max_frames", "Images read per item, the cover first.", min=1, max=16),
    ] = 4,
    llm_images: Annotated[
        bool,
        env_option(
            "llm_images",
            "A multimodal endpoint: send it the item's image URLs too (it fetches them). "
            "Without it the LLM gets the image's top tags as text.",
        ),
    ] = False,
    llm_attempts: Annotated[int, env_option("llm_attempts", "Tries per LLM request.")] = 3,
    llm_mode: Annotated[
        LLMMode,
        env_option(
            "llm_mode",
            "selective: the LLM picks from the shortlist; generative: it proposes free "
            "tags, mapped onto the vocabulary by nearest embedding (the rest: new-tag "
            "candidates).",
        ),
    ] = LLMMode.selective,
    generative_threshold: Annotated[
        float,
        env_option(
            "generative_threshold",
            "Generative mode: least cosine for a free tag to map onto a vocabulary tag.",
            min=0.0,
            max=1.0,
        ),
    ] = 0.8,
    new_tags_file: Annotated[
        Path | None,
        env_option(
            "new_tags_file",
            "Generative mode: append unmapped LLM tags here (JSONL) for the next vocabulary.",
        ),
    ] = None,
    decisions_topic: Annotated[
        str | None,
        env_option(
            "decisions_topic",
            "Record every LLM decision (embedding, shortlist, choice) here for "
            "`tagstream distill --from-topic`.",
        ),
    ] = None,
    runtime: Annotated[
        RuntimeChoice,
        env_option(
            "runtime",
            "kafka (confluent-kafka, the default) or faust (faust-streaming, same core; "
            "needs the [faust] extra).",
        ),
    ] = RuntimeChoice.kafka,
    reload_interval_s: Annotated[
        float,
        env_option(
            "reload_interval_s",
            "Poll --tag-system this often; a new version applies from the next batch (0: off).",
            min=0.0,
        ),
    ] = 5.0,
    llm_rate_limit: Annotated[
        float, env_option("llm_rate_limit", "LLM requests/s per process (0: off).")
    ] = 0.0,
    check_topics: Annotated[
        bool, env_option("check_topics", "Refuse to start when a topic is missing.")
    ] = True,
    log_level: LogLevel = "info",
) -> None:
    """Run the service until SIGTERM/SIGINT; then finish the batch, commit and exit 0."""
    given = dict(locals())  # first: the parameters alone
    from consumer.service.serve import run_service
    from consumer.tagging.config import Settings

    logs.configure(given.pop("log_level"))
    # each other parameter is the `Settings` field of its name (the README lists them all:
    # test_the_readme_names_every_setting_of_run)
    settings = Settings(**{k: v.value if isinstance(v, Enum) else v for k, v in given.items()})
    run_service(settings)


def env_only_help() -> str:
    """`run --help`'s epilog: the settings with no option (secrets, SASL, breaker, limits),
    named by their environment variables, so --help hides none of them."""
    import inspect

    from consumer.tagging.config import Settings

    flags = set(inspect.signature(run).parameters)
    names = [f"TAGSTREAM_{f.upper()}" for f in Settings.model_fields if f not in flags]
    return (
        "Environment only (secrets never go on the command line, where `ps` shows them): "
        + ", ".join(names)
        + ". The README describes each."
    )


def send(
    file: Annotated[
        Path,
        typer.Argument(
            help="JSONL file, one upload event per line ('-' for stdin).", allow_dash=True
        ),
    ],
    bootstrap_servers: Bootstrap = "127.0.0.1:9092",
    topic: Annotated[str, env_option("input_topic")] = "uploads",
) -> None:
    """Produce events from a JSONL file (key = the event's id); lines are sent as they are."""
    from consumer.tools.send import send_lines

    if str(file) == "-":
        n = send_lines(bootstrap_servers, topic, sys.stdin.buffer)
    else:
        with file.open("rb") as f:
            n = send_lines(bootstrap_servers, topic, f)
    err.print(f"sent {n} records to {topic}")
