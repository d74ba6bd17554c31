"""The `tagstream` command. Every option of `run` is also an environment variable
`TAGSTREAM_…` (a few settings are environment variables only: README); other commands take
flags, and those of their options that read an environment variable say so in `--help`."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from pydantic import SecretStr, ValidationError
from rich.console import Console

from consumer.cli import logs
from tagsys.bank import BANK_K, BANK_WEIGHT
from tagsys.errors import TagstreamError
from tagsys.tree import TREE_WEIGHT

app = typer.Typer(
    help="Real-time tagging of uploaded content: Kafka in, ONNX encoder shortlist, "
    "selective LLM, tag events out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True)


class UnavailableChoice(StrEnum):
    review = "review"
    pause = "pause"


class RuntimeChoice(StrEnum):
    kafka = "kafka"
    faust = "faust"


class LLMMode(StrEnum):
    selective = "selective"
    generative = "generative"


class DeviceChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _env(name: str) -> str:
    return f"TAGSTREAM_{name.upper()}"


Bootstrap = Annotated[
    str,
    typer.Option(envvar=_env("bootstrap_servers"), help="Kafka bootstrap servers, HOST:PORT[,…]."),
]
ModelOpt = Annotated[str, typer.Option(envvar=_env("model"), help="Encoder name.")]


def _emit_json(obj: object) -> None:
    """The `--json` contract: one JSON object as the last stdout line."""
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


JsonOpt = Annotated[bool, typer.Option("--json", help="Last stdout line: one JSON object.")]
ModelDirOpt = Annotated[
    Path | None,
    typer.Option(
        envvar=_env("model_dir"),
        help="Where exported encoders live (default: ~/.cache/tagstream/models).",
    ),
]
LogLevel = Annotated[str, typer.Option(envvar=_env("log_level"), help="debug, info, warning.")]


@app.command()
def run(
    bootstrap_servers: Bootstrap = "127.0.0.1:9092",
    input_topic: Annotated[
        str, typer.Option(envvar=_env("input_topic"), help="Topic of upload events.")
    ] = "uploads",
    output_topic: Annotated[
        str, typer.Option(envvar=_env("output_topic"), help="Topic for tag events.")
    ] = "tags",
    group_id: Annotated[
        str, typer.Option(envvar=_env("group_id"), help="Consumer group id.")
    ] = "tagstream",
    tag_system: Annotated[
        Path | None,
        typer.Option(
            envvar=_env("tag_system"),
            help="Tag-system folder (default: the built-in sample vocabulary).",
        ),
    ] = None,
    llm: Annotated[
        str,
        typer.Option(
            envvar=_env("llm"),
            help="'none', 'local' (start the bundled SmolLM2 llama.cpp server) or the base URL "
            "of an OpenAI-compatible API, e.g. http://host:8000/v1.",
        ),
    ] = "none",
    llm_model: Annotated[
        str, typer.Option(envvar=_env("llm_model"), help="Model name sent to the LLM endpoint.")
    ] = "smollm2",
    llm_api_key: Annotated[
        str,
        typer.Option(
            envvar=_env("llm_api_key"),
            show_default=False,
            help="API key for the LLM endpoint (kept secret: never logged).",
        ),
    ] = "",
    llm_concurrency: Annotated[
        int, typer.Option(envvar=_env("llm_concurrency"), help="Concurrent LLM requests.")
    ] = 4,
    llm_timeout_s: Annotated[
        float,
        typer.Option(envvar=_env("llm_timeout_s"), help="Timeout of one LLM request, seconds."),
    ] = 30.0,
    model: ModelOpt = "all-MiniLM-L6-v2",
    model_dir: ModelDirOpt = None,
    device: Annotated[
        DeviceChoice,
        typer.Option(envvar=_env("device"), help="Where the encoder runs (auto: CUDA if usable)."),
    ] = DeviceChoice.auto,
    batch_size: Annotated[
        int, typer.Option(envvar=_env("batch_size"), help="Most records per batch.")
    ] = 64,
    batch_timeout_s: Annotated[
        float,
        typer.Option(envvar=_env("batch_timeout_s"), help="Longest wait to fill a batch, seconds."),
    ] = 0.05,
    pipeline: Annotated[
        bool,
        typer.Option(
            envvar=_env("pipeline"),
            help="Read, decode and tokenize the next batch while this one encodes; produce "
            "LLM items when answered instead of holding their batch.",
        ),
    ] = True,
    llm_max_pending: Annotated[
        int,
        typer.Option(
            envvar=_env("llm_max_pending"),
            help="LLM items awaiting answers across batches before the loop waits.",
        ),
    ] = 256,
    emit_embedding: Annotated[
        bool,
        typer.Option(
            envvar=_env("emit_embedding"), help="Put the content embedding on each tag event."
        ),
    ] = False,
    metrics_host: Annotated[
        str,
        typer.Option(envvar=_env("metrics_host"), help="Bind address of the metrics/health port."),
    ] = "0.0.0.0",
    metrics_port: Annotated[
        int,
        typer.Option(
            envvar=_env("metrics_port"), help="Port for /metrics, /healthz, /readyz (0: any)."
        ),
    ] = 9108,
    session_timeout_ms: Annotated[
        int,
        typer.Option(envvar=_env("session_timeout_ms"), help="Kafka consumer session.timeout.ms."),
    ] = 10000,
    dlq_topic: Annotated[
        str | None,
        typer.Option(envvar=_env("dlq_topic"), help="Dead-letter topic (default: <input>.dlq)."),
    ] = None,
    llm_unavailable: Annotated[
        UnavailableChoice,
        typer.Option(
            envvar=_env("llm_unavailable"),
            help="When the LLM is down: 'review' sends encoder tags with needs_review; 'pause' "
            "pauses the partition and re-reads from the item later.",
        ),
    ] = UnavailableChoice.review,
    llm_attempts: Annotated[
        int, typer.Option(envvar=_env("llm_attempts"), help="Tries per LLM request.")
    ] = 3,
    llm_mode: Annotated[
        LLMMode,
        typer.Option(
            envvar=_env("llm_mode"),
            help="selective: the LLM picks from the shortlist; generative: it proposes free "
            "tags, mapped onto the vocabulary by nearest embedding (the rest: new-tag "
            "candidates).",
        ),
    ] = LLMMode.selective,
    generative_threshold: Annotated[
        float,
        typer.Option(
            envvar=_env("generative_threshold"),
            min=0.0,
            max=1.0,
            help="Generative mode: least cosine for a free tag to map onto a vocabulary tag.",
        ),
    ] = 0.8,
    new_tags_file: Annotated[
        Path | None,
        typer.Option(
            envvar=_env("new_tags_file"),
            help="Generative mode: append unmapped LLM tags here (JSONL) for the next vocabulary.",
        ),
    ] = None,
    decisions_topic: Annotated[
        str | None,
        typer.Option(
            envvar=_env("decisions_topic"),
            help="Record every LLM decision (embedding, shortlist, choice) here for "
            "`tagstream distill --from-topic`.",
        ),
    ] = None,
    runtime: Annotated[
        RuntimeChoice,
        typer.Option(
            envvar=_env("runtime"),
            help="kafka (confluent-kafka, the default) or faust (faust-streaming, same core; "
            "needs the [faust] extra).",
        ),
    ] = RuntimeChoice.kafka,
    reload_interval_s: Annotated[
        float,
        typer.Option(
            envvar=_env("reload_interval_s"),
            min=0.0,
            help="Poll --tag-system this often; a new version applies from the next batch "
            "(0: off).",
        ),
    ] = 5.0,
    llm_rate_limit: Annotated[
        float,
        typer.Option(envvar=_env("llm_rate_limit"), help="LLM requests/s per process (0: off)."),
    ] = 0.0,
    check_topics: Annotated[
        bool,
        typer.Option(envvar=_env("check_topics"), help="Refuse to start when a topic is missing."),
    ] = True,
    log_level: LogLevel = "info",
) -> None:
    """Run the service until SIGTERM/SIGINT; then finish the batch, commit and exit 0."""
    from pydantic import SecretStr

    from consumer.service.serve import run_service
    from consumer.tagging.config import Settings

    logs.configure(log_level)
    settings = Settings(
        bootstrap_servers=bootstrap_servers,
        input_topic=input_topic,
        output_topic=output_topic,
        group_id=group_id,
        tag_system=tag_system,
        llm=llm,
        llm_model=llm_model,
        llm_api_key=SecretStr(llm_api_key),
        llm_concurrency=llm_concurrency,
        llm_timeout_s=llm_timeout_s,
        model=model,
        model_dir=model_dir,
        device=device.value,
        batch_size=batch_size,
        batch_timeout_s=batch_timeout_s,
        pipeline=pipeline,
        llm_max_pending=llm_max_pending,
        emit_embedding=emit_embedding,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        session_timeout_ms=session_timeout_ms,
        dlq_topic=dlq_topic,
        llm_unavailable=llm_unavailable.value,
        llm_attempts=llm_attempts,
        llm_mode=llm_mode.value,
        generative_threshold=generative_threshold,
        new_tags_file=new_tags_file,
        decisions_topic=decisions_topic,
        reload_interval_s=reload_interval_s,
        runtime=runtime.value,
        llm_rate_limit=llm_rate_limit,
        check_topics=check_topics,
    )
    run_service(settings)


@app.command()
def send(
    file: Annotated[
        Path,
        typer.Argument(
            help="JSONL file, one upload event per line ('-' for stdin).", allow_dash=True
        ),
    ],
    bootstrap_servers: Bootstrap = "127.0.0.1:9092",
    topic: Annotated[str, typer.Option(envvar=_env("input_topic"))] = "uploads",
) -> None:
    """Produce events from a JSONL file (key = the event's id); lines are sent as they are."""
    from consumer.tools.send import send_lines

    if str(file) == "-":
        n = send_lines(bootstrap_servers, topic, sys.stdin.buffer)
    else:
        with file.open("rb") as f:
            n = send_lines(bootstrap_servers, topic, f)
    err.print(f"sent {n} records to {topic}")


@app.command()
def demo(
    json: JsonOpt = False,
    llm: Annotated[
        str,
        typer.Option(
            envvar=_env("demo_llm"), help="'local' (bundled SmolLM2), 'none', or a base URL."
        ),
    ] = "local",
    model: ModelOpt = "all-MiniLM-L6-v2",
    model_dir: ModelDirOpt = None,
    log_level: LogLevel = "warning",
) -> None:
    """Embedded broker + local LLM + the sample events through the whole path, then a summary."""
    from consumer.tools.demo import print_report, run_demo

    logs.configure(log_level)
    res = run_demo(llm=llm, model=model, model_dir=model_dir, console=err)
    print_report(res, err)
    if json:
        _emit_json(res.summary())
    if res.events_out != res.events_in:
        raise typer.Exit(1)


@app.command()
def bench(
    json: JsonOpt = False,
    items: Annotated[int, typer.Option(help="Items for the throughput runs.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Encoder / consumer batch size.")] = 64,
    rate: Annotated[
        float | None,
        typer.Option(
            help="Offered events/s for the latency run (default: half the end-to-end rate)."
        ),
    ] = None,
    latency_items: Annotated[int, typer.Option(help="Events in the latency run.")] = 600,
    rounds: Annotated[
        int,
        typer.Option(
            min=1,
            help=(
                "Rounds of PyTorch, encoder and end-to-end runs; ratios are the median of "
                "each round's own."
            ),
        ),
    ] = 3,
    torch: Annotated[bool, typer.Option(help="Also time PyTorch when it is installed.")] = True,
    sweep_batch_tokens: Annotated[
        str | None,
        typer.Option(
            help="Also time the bare encoder at these padded-token budgets, e.g. 256,1024,16384."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Shared data folder (default: ../shared/data when present)."),
    ] = None,
    tag_system: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Tag-system folder the end-to-end runs tag with, and whose scoring is timed "
                "(e.g. a distilled head with --text-features); default: the sample vocabulary."
            )
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            envvar=_env("model"),
            help="Encoder name (default: the tag system's, else all-MiniLM-L6-v2).",
        ),
    ] = None,
    model_dir: ModelDirOpt = None,
    device: Annotated[
        DeviceChoice, typer.Option(envvar=_env("device"), help="auto, cpu or cuda.")
    ] = DeviceChoice.auto,
) -> None:
    """Measure encoder vs end-to-end throughput, latency, PyTorch and the 40k-tag shortlist."""
    from consumer.tools.bench import run_bench

    logs.configure("warning")
    res = run_bench(
        items=items,
        batch_size=batch_size,
        model=model,
        tag_system=tag_system,
        model_dir=model_dir,
        device=device.value,
        data=data,
        rate=rate,
        latency_items=latency_items,
        rounds=rounds,
        torch=torch,
        sweep=[int(x) for x in sweep_batch_tokens.split(",")] if sweep_batch_tokens else None,
        show_progress=sys.stderr.isatty() or not json,
    )
    out = res.to_json()
    for k, v in out.items():
        err.print(f"{k:<28} {v}")
    if json:
        _emit_json(out)


@app.command("export-onnx")
def export_onnx(
    model: Annotated[
        str,
        typer.Option(
            envvar=_env("model"),
            help=(
                "Known encoder (all-MiniLM-L6-v2, multilingual-e5-small), a Hugging Face "
                "model folder, or a hub id (needs hub access)."
            ),
        ),
    ] = "all-MiniLM-L6-v2",
    model_dir: ModelDirOpt = None,
    force: Annotated[
        bool, typer.Option(help="Re-export even if a verified export exists.")
    ] = False,
    fp16: Annotated[bool, typer.Option(help="Also write the fp16 (GPU) variant.")] = True,
) -> None:
    """(Re)export an encoder to ONNX: fp32, int8 per-channel (CPU) and fp16 (GPU) + manifest."""
    from models_onnx.export import export_encoder

    logs.configure("warning")
    out = export_encoder(model, model_dir, force=force, fp16=fp16, step=lambda s: err.print(s))
    err.print(f"[green]ok[/] {out}")


@app.command("replay-dlq")
def replay_dlq_cmd(
    bootstrap_servers: Bootstrap = "127.0.0.1:9092",
    dlq_topic: Annotated[str, typer.Option(help="The dead-letter topic to read.")] = "uploads.dlq",
    to_topic: Annotated[
        str | None,
        typer.Option(help="Send here (default: each record's original topic)."),
    ] = None,
    id: Annotated[
        list[str] | None, typer.Option("--id", help="Only records with this key (repeatable).")
    ] = None,
    reason: Annotated[
        list[str] | None,
        typer.Option("--reason", help="Only this error reason, e.g. not_json (repeatable)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Stop after this many records.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would be sent; send nothing.")] = False,
    follow: Annotated[
        bool,
        typer.Option(
            help="Keep reading new dead letters until Ctrl-C or SIGTERM. Dead letters of "
            "records that were themselves replays (header tagstream.replayed_from: the replay "
            "failed again) are skipped and counted, never re-sent in a loop; a later run "
            "without --follow replays them."
        ),
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Re-send chosen dead-letter records to their input topic (after a fix).

    Without --follow: one pass over the records there at start (up to each partition's high
    watermark then), so a replayed record that fails again while the service runs waits in
    the DLQ for the next run instead of looping. Dead letters whose value was truncated to fit
    the DLQ cannot be replayed: they are skipped and counted (skipped_truncated)."""
    import signal
    import threading

    from consumer.tools.dlq import replay_dlq

    logs.configure("warning")
    stop = threading.Event()
    restore: dict[signal.Signals, Any] = {}
    if follow:
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        rep = replay_dlq(
            bootstrap_servers,
            dlq_topic,
            to_topic=to_topic,
            ids=set(id) if id else None,
            reasons=set(reason) if reason else None,
            limit=limit,
            dry_run=dry_run,
            follow=follow,
            stop=stop,
        )
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
    verb = "would replay" if dry_run else "replayed"
    err.print(
        f"scanned {rep.scanned}, matched {rep.matched}, {verb} "
        f"{rep.matched if dry_run else rep.replayed}: {dict(rep.by_reason)} → {dict(rep.by_target)}"
        f"; skipped {rep.skipped_truncated} truncated"
        + (f", {rep.skipped_replayed} failed replays" if follow else "")
    )
    if json:
        _emit_json(
            {
                "scanned": rep.scanned,
                "matched": rep.matched,
                "replayed": rep.replayed,
                "skipped_truncated": rep.skipped_truncated,
                "skipped_replayed": rep.skipped_replayed,
                "by_reason": dict(rep.by_reason),
                "by_target": dict(rep.by_target),
            }
        )


class DescribeStyle(StrEnum):
    examples = "examples"
    descriptions = "descriptions"


class PromptStyle(StrEnum):
    auto = "auto"
    chat = "chat"
    fewshot = "fewshot"


class DataFormat(StrEnum):
    kuairec = "kuairec"
    stackexchange = "stackexchange"
    jsonl = "jsonl"


DataOpt = Annotated[Path, typer.Option("--data", help="Labelled data file.")]
FormatOpt = Annotated[
    DataFormat,
    typer.Option(
        "--format", help="kuairec (CSV), stackexchange (CSV) or jsonl (events + `labels`)."
    ),
]
LevelOpt = Annotated[int, typer.Option(min=1, max=3, help="KuaiRec category level (1-3).")]
TagSystemOpt = Annotated[
    Path | None,
    typer.Option(
        help="Tag-system folder; without it, zero-shot: the vocabulary is the file's labels."
    ),
]
EvalModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Encoder (default: the tag system's; zero-shot: multilingual-e5-small for "
        "kuairec, all-MiniLM-L6-v2 otherwise). embeddinggemma-300m: zero-shot recall@10 "
        "+5 to +16 points on the shared data, at a sixth of e5's speed on CPU "
        "(docs/QUALITY.md)."
    ),
]
AdaptOpt = Annotated[
    bool,
    typer.Option(
        help="Adapt the zero-shot tags to the file's unlabelled text (lexical prototypes + "
        "hubness bias; no labels used)."
    ),
]
BankOpt = Annotated[
    Path | None,
    typer.Option(
        help="A larger tag system of the same domain and encoder (e.g. TagGPT's vocabulary, "
        "imported with import-tags): each tag's vector is mixed with its nearest bank tags'. "
        "No labels used."
    ),
]
BankKOpt = Annotated[int, typer.Option(min=1, help="Bank neighbours per tag.")]
EmbeddingCacheOpt = Annotated[
    Path | None,
    typer.Option(
        envvar=_env("embedding_cache"),
        help="Folder for the items' vectors, keyed by encoder weights and texts: a rerun on "
        "the same items with another tag system skips the encoder.",
    ),
]
TagTemplateOpt = Annotated[
    str | None,
    typer.Option(
        help="How a tag's name is embedded, with {name} for it: put the tags in their domain, "
        "e.g. '{name} (cooking)' (\"equipment\" alone is vague). Recorded in the tag "
        "system. Default: the name alone.",
    ),
]
BankWeightOpt = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Share of the tag's own vector in the mix.")
]
TreeOpt = Annotated[
    Path | None,
    typer.Option(
        help="A category tree of the same encoder (a hierarchy CSV imported with import-tags "
        "--format hierarchy): a tag with children there is mixed with their names' mean. "
        "A taxonomy, no item labels.",
    ),
]
TreeWeightOpt = Annotated[
    float,
    typer.Option(min=0.0, max=1.0, help="Share of the tag's own vector in the --tree mix."),
]


def _progress(label: str) -> Any:
    """A bar on a terminal; timed plain lines otherwise (nohup, CI, a Job's log)."""
    from consumer.tools.progress import progress

    return progress(label, err)


def _run_eval(data: Path, fmt: str, **kw: Any) -> Any:
    """`run_eval` with a progress bar while the items are embedded."""
    from consumer.tools.evaluate import run_eval

    with _progress("embedding") as bar:
        task = bar.add_task("embed", total=None)
        return run_eval(
            data, fmt, progress=lambda d, t: bar.update(task, completed=d, total=t), **kw
        )


def _print_metrics(out: dict[str, Any]) -> None:
    for k, v in out.items():
        err.print(f"{k:<18} {round(v, 4) if isinstance(v, float) else v}")


@app.command("eval")
def eval_cmd(
    data: DataOpt,
    fmt: FormatOpt,
    level: LevelOpt = 1,
    tag_system: TagSystemOpt = None,
    model: EvalModelOpt = None,
    model_dir: ModelDirOpt = None,
    llm: Annotated[
        str,
        typer.Option(
            envvar=_env("llm"), help="none, local (bundled SmolLM2), or an OpenAI-compatible URL."
        ),
    ] = "none",
    llm_model: Annotated[str, typer.Option(envvar=_env("llm_model"))] = "smollm2",
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N labelled items.")] = None,
    adapt: AdaptOpt = False,
    bank: BankOpt = None,
    bank_k: BankKOpt = BANK_K,
    bank_weight: BankWeightOpt = BANK_WEIGHT,
    tree: TreeOpt = None,
    tree_weight: TreeWeightOpt = TREE_WEIGHT,
    tag_template: TagTemplateOpt = None,
    embedding_cache: EmbeddingCacheOpt = None,
    json: JsonOpt = False,
) -> None:
    """Run the service's decision path (no Kafka) over labelled data and report quality."""
    from consumer.tagging.config import Settings
    from consumer.tools.evaluate import report

    logs.configure("warning")
    run_ = _run_eval(
        data,
        fmt.value,
        level=level,
        tag_system=tag_system,
        model=model,
        model_dir=model_dir,
        llm=llm,
        llm_model=llm_model,
        llm_api_key=Settings().llm_api_key,
        limit=limit,
        adapt_corpus=adapt,
        bank=bank,
        bank_k=bank_k,
        bank_weight=bank_weight,
        tree=tree,
        tree_weight=tree_weight,
        tag_template=tag_template,
        embedding_cache=embedding_cache,
    )
    out = report(run_)
    _print_metrics(out)
    if json:
        _emit_json(out)


@app.command("calibrate")
def calibrate_cmd(
    data: DataOpt,
    fmt: FormatOpt,
    out: Annotated[Path, typer.Option(help="Folder to write the calibrated tag system to.")],
    level: LevelOpt = 1,
    tag_system: TagSystemOpt = None,
    model: EvalModelOpt = None,
    model_dir: ModelDirOpt = None,
    target_precision: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Auto-accept precision to reach.")
    ] = 0.9,
    fit_fraction: Annotated[
        float,
        typer.Option(min=0.05, max=0.95, help="Share of items to fit on; the rest checks it."),
    ] = 0.5,
    limit: Annotated[int | None, typer.Option(help="Use the first N labelled items.")] = None,
    adapt: AdaptOpt = False,
    bank: BankOpt = None,
    bank_k: BankKOpt = BANK_K,
    bank_weight: BankWeightOpt = BANK_WEIGHT,
    tree: TreeOpt = None,
    tree_weight: TreeWeightOpt = TREE_WEIGHT,
    tag_template: TagTemplateOpt = None,
    embedding_cache: EmbeddingCacheOpt = None,
    json: JsonOpt = False,
) -> None:
    """Fit the gate (threshold, margin, max tags, per-tag thresholds) for a target auto-accept
    precision on labelled data; report it on held-out items; write a new tag-system version.

    held_out_auto_ceiling: the most any gate could auto-accept there at the target with this
    scorer (an oracle picking the items); below the share you want, improve the scorer."""
    from consumer.tools.evaluate import run_calibrate

    logs.configure("warning")
    run_ = _run_eval(
        data,
        fmt.value,
        level=level,
        tag_system=tag_system,
        model=model,
        model_dir=model_dir,
        limit=limit,
        adapt_corpus=adapt,
        bank=bank,
        bank_k=bank_k,
        bank_weight=bank_weight,
        tree=tree,
        tree_weight=tree_weight,
        tag_template=tag_template,
        embedding_cache=embedding_cache,
    )
    ts, cal, before, after = run_calibrate(
        run_, target_precision=target_precision, fit_fraction=fit_fraction
    )
    ts.save(out)
    if not cal.reached:
        err.print(
            f"[yellow]warning:[/] no gate reaches precision {target_precision} on the fit part; "
            "kept the most precise one (held_out_auto_ceiling says how far any gate could go)"
        )
    res = {
        "tag_system": ts.version_id,
        "out": str(out),
        "reached": cal.reached,
        "gate": ts.gate.to_dict() | {"tag_thresholds": len(ts.gate.tag_thresholds)},
        "held_out_before": {
            k: before[k] for k in ("auto_fraction", "auto_precision", "llm_fraction")
        },
        "held_out_after": {
            k: after[k] for k in ("auto_fraction", "auto_precision", "llm_fraction")
        },
        "held_out_auto_ceiling": after["auto_ceiling"],
    }
    for k, v in res.items():
        err.print(f"{k:<16} {v}")
    if json:
        _emit_json(res)


@app.command("distill")
def distill_cmd(
    out: Annotated[Path, typer.Option(help="Folder to write the distilled tag system to.")],
    data: Annotated[Path | None, typer.Option("--data", help="Labelled data file.")] = None,
    fmt: Annotated[
        DataFormat | None, typer.Option("--format", help="kuairec, stackexchange or jsonl.")
    ] = None,
    level: LevelOpt = 1,
    tag_system: Annotated[
        Path | None,
        typer.Option(
            help="Base tag system (default with --data: zero-shot over the file's labels; "
            "required with --from-topic)."
        ),
    ] = None,
    from_topic: Annotated[
        str | None,
        typer.Option(
            help="Learn from the LLM decisions recorded on this topic (read up to its end "
            "as seen at start, while the service may go on recording)."
        ),
    ] = None,
    bootstrap_servers: Bootstrap = "127.0.0.1:9092",
    model: EvalModelOpt = None,
    model_dir: ModelDirOpt = None,
    holdout: Annotated[
        float, typer.Option(min=0.05, max=0.9, help="Share of items held out (by id hash).")
    ] = 0.3,
    target_precision: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Auto-accept precision the gate aims at.")
    ] = 0.9,
    limit: Annotated[int | None, typer.Option(help="Use the first N labelled items.")] = None,
    version: Annotated[str | None, typer.Option(help="Version of the new tag system.")] = None,
    tag_template: TagTemplateOpt = None,
    embedding_cache: EmbeddingCacheOpt = None,
    text_features: Annotated[
        bool,
        typer.Option(
            help=(
                "The head also reads the text's hashed character n-grams (1-3 characters; "
                "docs/QUALITY.md: KuaiRec F1 0.39 -> 0.46, cooking unchanged; slower "
                "fitting, and tags x buckets x 4 bytes in head.npz)."
            )
        ),
    ] = False,
    text_buckets: Annotated[
        int, typer.Option(min=256, max=2**20, help="Hash buckets of --text-features.")
    ] = 16384,
    include_steerable: Annotated[
        bool,
        typer.Option(
            help="With --from-topic: learn from generative-mode decisions too (their text "
            "could steer the tags: left out by default, counted under skipped.steerable)."
        ),
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Fit a light head on the encoder embeddings from labelled data or recorded LLM
    decisions, recalibrate the gate, write a new tag-system version; report before/after on
    held-out items (written to OUT.heldout.jsonl when --data is used).

    auto_ceiling: the most any gate could auto-accept there at the target with that scorer
    (an oracle picking the items)."""
    from consumer.tools.distill import (
        distill,
        labelled_from_decisions,
        labelled_from_file,
        write_heldout,
    )
    from tagsys import TagSystem, TagSystemError

    logs.configure("warning")
    base = TagSystem.load(tag_system) if tag_system else None
    extra: dict[str, Any] = {}
    labelled: Any
    if from_topic:
        if base is None:
            raise TagSystemError("--from-topic needs --tag-system (the vocabulary decided over)")
        from consumer.tools.distill_topic import read_decisions

        records = read_decisions(bootstrap_servers, from_topic)
        labelled, skipped = labelled_from_decisions(
            records, base, include_steerable=include_steerable
        )
        extra.update(decisions=len(records), skipped=skipped)
    else:
        if data is None or fmt is None:
            raise TagSystemError("give --data and --format (labelled data) or --from-topic")
        with _progress("embedding") as bar:
            task = bar.add_task("embed", total=None)
            base, labelled, items, counts = labelled_from_file(
                data,
                fmt.value,
                level=level,
                base=base,
                model=model,
                model_dir=model_dir,
                limit=limit,
                progress=lambda d, t: bar.update(task, completed=d, total=t),
                tag_template=tag_template,
                embedding_cache=embedding_cache,
            )
        extra.update(counts)
        heldout = out.with_name(out.name + ".heldout.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        extra["heldout_file"] = str(heldout)
        extra["heldout_written"] = write_heldout(items, holdout, heldout)
    from tagsys.textfeat import TextFeatures

    with _progress("fitting") as bar:
        task = bar.add_task("fit", total=None)
        new, rep = distill(
            base,
            labelled,
            holdout=holdout,
            target_precision=target_precision,
            version=version,
            text=TextFeatures(buckets=text_buckets) if text_features else None,
            progress=lambda d, t: bar.update(task, completed=d, total=t),
        )
    new.save(out)
    res = {**rep, **extra, "out": str(out)}
    for k, v in res.items():
        err.print(f"{k:<20} {v}")
    if json:
        _emit_json(res)


@app.command("build-tags")
def build_tags_cmd(
    data: DataOpt,
    fmt: FormatOpt,
    out: Annotated[Path, typer.Option(help="Folder to write the tag system to.")],
    llm: Annotated[
        str,
        typer.Option(
            envvar=_env("llm"),
            help="local (a bundled model, see --llm-model) or an OpenAI-compatible URL.",
        ),
    ] = "local",
    llm_model: Annotated[
        str | None,
        typer.Option(
            envvar=_env("llm_model"),
            help=(
                "Model at the endpoint (needed with a URL). With --llm local: gemma3-270m "
                "(Gemma 3 270M base, the default: far better proposals, docs/QUALITY.md) or "
                "smollm2 (SmolLM2-135M-Instruct, chat)."
            ),
        ),
    ] = None,
    prompt: Annotated[
        PromptStyle,
        typer.Option(
            help=(
                "How proposals are asked: chat (JSON schema, /chat/completions), fewshot "
                "(a base model continues examples, /completions), or auto: fewshot for "
                "the bundled base model, chat otherwise."
            ),
        ),
    ] = PromptStyle.auto,
    work: Annotated[
        Path | None,
        typer.Option(help="Folder for the resumable proposal log (default: <out>.work)."),
    ] = None,
    samples: Annotated[int, typer.Option(min=1, max=10, help="LLM samples per item.")] = 3,
    max_tags: Annotated[int, typer.Option(min=1, max=20, help="Tags asked per sample.")] = 5,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Concurrent LLM calls.")] = 4,
    limit: Annotated[int | None, typer.Option(help="Use the first N items.")] = None,
    level: Annotated[
        int,
        typer.Option(
            min=1,
            max=3,
            help="KuaiRec category level the report's gold check reads (the LLM never sees it).",
        ),
    ] = 1,
    min_items: Annotated[
        int, typer.Option(min=1, help="Keep tags proposed for at least this many items.")
    ] = 2,
    merge_threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help=(
                "Cosine above which tags merge (aliases); default: the encoder's — 0.9 for "
                "MiniLM, 0.97 for e5, whose cosines run high."
            ),
        ),
    ] = None,
    hierarchy: Annotated[
        Path | None,
        typer.Option(help="Category hierarchy CSV: each tag gets its nearest category."),
    ] = None,
    llm_categories: Annotated[
        bool,
        typer.Option(
            help="Ask the LLM for each tag's category (one of --hierarchy's nodes when given)."
        ),
    ] = False,
    describe: Annotated[
        bool,
        typer.Option(
            help=(
                "Describe every tag: one line from a chat model, or --describe-samples "
                "sampled example posts or descriptions from a base model (fewshot), as "
                "describe-tags does."
            )
        ),
    ] = False,
    describe_samples: Annotated[
        int,
        typer.Option(min=1, max=50, help="Texts sampled per tag with --prompt fewshot."),
    ] = 5,
    describe_style: Annotated[
        DescribeStyle,
        typer.Option(
            help="With --describe and --prompt fewshot: example posts (embedded as content) "
            "or descriptions, as describe-tags --style."
        ),
    ] = DescribeStyle.examples,
    name: Annotated[str, typer.Option(help="Tag-system name.")] = "built",
    version: Annotated[str, typer.Option(help="Tag-system version.")] = "1",
    model: Annotated[
        str | None,
        typer.Option(
            envvar=_env("model"),
            help=(
                "Encoder for merging and the tag vectors (default: multilingual-e5-small for "
                "kuairec, all-MiniLM-L6-v2 otherwise)."
            ),
        ),
    ] = None,
    model_dir: ModelDirOpt = None,
    tag_template: TagTemplateOpt = None,
    json: JsonOpt = False,
) -> None:
    """Build a tag system from a corpus: LLM proposals (several samples per item, resumable),
    normalise, count, frequency floor, merge synonyms, categories, descriptions, embed."""
    import contextlib
    import os

    from consumer.tagging.config import Settings
    from consumer.tagging.llm_server import BASE_MODELS, GEMMA, MODELS, LocalLLM
    from consumer.tagging.metrics import Metrics
    from consumer.tagging.parts import make_tagger
    from consumer.tools.build_tags import Proposer, build_tags
    from consumer.tools.describe import Describer
    from consumer.tools.evaluate import DEFAULT_MODEL, template_for
    from consumer.tools.propose import FewShotProposer
    from models_onnx import OnnxEncoder

    logs.configure("warning")
    template = template_for(None, tag_template)  # checked before the LLM's hours
    local_llm = llm.strip().lower() == "local"
    if llm_model is None:
        if not local_llm:
            raise typer.BadParameter(
                "name the endpoint's model (--llm-model or TAGSTREAM_LLM_MODEL)",
                param_hint="--llm-model",
            )
        llm_model = GEMMA
    if local_llm and llm_model not in MODELS:
        raise typer.BadParameter(
            f"{llm_model!r} is no bundled model; with --llm local use one of {', '.join(MODELS)}",
            param_hint="--llm-model",
        )
    style = prompt
    if style is PromptStyle.auto:
        style = PromptStyle.fewshot if llm_model in BASE_MODELS else PromptStyle.chat
    if style is PromptStyle.fewshot and llm_categories:
        raise typer.BadParameter(
            "--llm-categories needs a chat model (a base model cannot answer with one of a "
            "list); use --hierarchy alone, or --prompt chat with an instruction-tuned model",
            param_hint="--llm-categories",
        )
    settings = Settings()
    metrics = Metrics()
    encoder = OnnxEncoder(model or DEFAULT_MODEL[fmt.value], model_dir=model_dir)
    with contextlib.ExitStack() as stack:
        if local_llm:
            local = stack.enter_context(
                LocalLLM(model=llm_model, parallel=concurrency, threads=os.cpu_count() or 2)
            )
            url, key = local.base_url, SecretStr("")
        else:
            url, key = llm, settings.llm_api_key
        tagger = make_tagger(settings, url, llm_model, key, metrics)
        proposer: Proposer = tagger
        describer = None
        if style is PromptStyle.fewshot:
            proposer = FewShotProposer(url, llm_model, key)
            if describe:
                describer = Describer(
                    url,
                    llm_model,
                    key,
                    samples=describe_samples,
                    concurrency=concurrency,
                    style=describe_style.value,
                    template=template,  # the prompt names the tag as its vector does
                )
        with _progress("building") as bar:
            task = bar.add_task("build", total=None)

            def step(label: str, done: int, total: int) -> None:
                bar.update(task, description=label, completed=done, total=total)

            ts, rep = build_tags(
                data,
                fmt.value,
                out,
                tagger,
                encoder,
                work=work or out.with_name(out.name + ".work"),
                samples=samples,
                max_tags=max_tags,
                concurrency=concurrency,
                limit=limit,
                min_items=min_items,
                merge_threshold=merge_threshold,
                hierarchy=hierarchy,
                llm_categories=llm_categories,
                describe=describe,
                name=name,
                version=version,
                tag_template=template,
                progress=step,
                proposer=proposer,
                describer=describer,
                level=level,
            )
    res = {"tag_system": ts.version_id, "out": str(out), **rep.to_dict()}
    for k, v in res.items():
        err.print(f"{k:<14} {v}")
    if rep.unreadable:
        err.print(
            f"[yellow]warning:[/] {encoder.name} cannot read {rep.unreadable} of the "
            f"{rep.kept} kept tags (mostly unknown tokens: their vectors say nothing, so they "
            "were not merged); use an encoder for their language, e.g. --model "
            "multilingual-e5-small"
        )
    if rep.failed:
        err.print(
            f"[yellow]warning:[/] {len(rep.failed)} items got no answer (e.g. "
            f"{next(iter(rep.failed.items()))}); rerun with the same --work to ask again"
        )
    if json:
        _emit_json(res)


class VocabFormat(StrEnum):
    json = "json"
    taggpt = "taggpt"
    list = "list"
    hierarchy = "hierarchy"


def _encode_with_progress(enc: Any, texts: list[str], label: str, kind: str = "passage") -> Any:
    import numpy as np

    out = np.empty((len(texts), enc.dim), dtype=np.float32)
    with _progress(label) as bar:
        task = bar.add_task(label, total=len(texts))
        for s in range(0, len(texts), 512):
            out[s : s + 512] = enc.encode(texts[s : s + 512], kind=kind)
            bar.update(task, completed=min(len(texts), s + 512))
    return out


@app.command("import-tags")
def import_tags(
    file: Annotated[Path, typer.Argument(help="The vocabulary file.")],
    out: Annotated[Path, typer.Option(help="Folder to write the tag system to.")],
    fmt: Annotated[
        VocabFormat,
        typer.Option(
            "--format",
            help="json ({name, version, gate?, tags: [{id?, name, aliases?, category?, "
            "description?, descriptions?, examples?}]}), taggpt (`tag||['alias', ...]`, no "
            "header), list (one tag per line) or hierarchy (CSV with a header, one top-down "
            "path per row; a KuaiRec data file is read by its category-name columns).",
        ),
    ] = VocabFormat.json,
    columns: Annotated[
        str | None,
        typer.Option(
            help="With --format hierarchy: the path's columns, top level first, comma "
            "separated (default: every column).",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Tag-system name (default: from the file).")] = (
        None
    ),
    version: Annotated[str | None, typer.Option(help="Version (default: from the file or 1).")] = (
        None
    ),
    lexical_boost: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="Score added when a tag is named in the text (default 0.1)."
        ),
    ] = None,
    model: ModelOpt = "all-MiniLM-L6-v2",
    model_dir: ModelDirOpt = None,
    bank: BankOpt = None,
    bank_k: BankKOpt = BANK_K,
    bank_weight: BankWeightOpt = BANK_WEIGHT,
    tree: TreeOpt = None,
    tree_weight: TreeWeightOpt = TREE_WEIGHT,
    tag_template: TagTemplateOpt = None,
) -> None:
    """Embed a vocabulary with an encoder and write a versioned tag-system folder."""
    from dataclasses import replace

    from consumer.tagging.events import unmark_hashtags
    from consumer.tools.evaluate import expand, template_for
    from models_onnx import OnnxEncoder
    from tagsys import TagSystem, embed_tags, template_provenance
    from tagsys.gate import GateConfig
    from tagsys.vocab import read_vocabulary

    logs.configure("warning")
    template = template_for(None, tag_template)
    cols = tuple(c.strip() for c in columns.split(",") if c.strip()) if columns else None
    vocab = read_vocabulary(file, fmt.value, columns=cols)
    for p in vocab.problems[:10]:
        err.print(f"[yellow]warning:[/] {p}")
    if len(vocab.problems) > 10:
        err.print(f"[yellow]warning:[/] … and {len(vocab.problems) - 10} more")
    gate = vocab.gate or GateConfig(lexical_boost=0.1)
    if lexical_boost is not None:
        gate = replace(gate, lexical_boost=lexical_boost)
    enc = OnnxEncoder(model, model_dir=model_dir)
    unreadable = enc.unreadable([t.name for t in vocab.tags])
    if unreadable:
        err.print(
            f"[yellow]warning:[/] {enc.name} cannot read {len(unreadable)} of the "
            f"{len(vocab.tags)} tag names (mostly unknown tokens, e.g. "
            f"{vocab.tags[unreadable[0]].name!r}): such tags get near-identical vectors; use an "
            "encoder for their language, e.g. --model multilingual-e5-small"
        )
    tag_enc = enc.tag_encoder()
    emb = embed_tags(
        vocab.tags,
        lambda texts: _encode_with_progress(tag_enc, texts, "embedding"),
        template=template,
        # example posts are content: the service's text treatment, the encoder's query side
        encode_content=lambda texts: _encode_with_progress(
            tag_enc, [unmark_hashtags(t) for t in texts], "embedding examples", kind="query"
        ),
    )
    ts = TagSystem(
        name=name or vocab.name,
        version=version or vocab.version,
        encoder=enc.name,
        tags=vocab.tags,
        embeddings=emb,
        gate=gate,
        provenance={
            "imported_from": file.name,
            "format": fmt.value,
            **template_provenance(template),
        },
    )
    ts = expand(
        ts, tree=tree, tree_weight=tree_weight, bank=bank, bank_k=bank_k, bank_weight=bank_weight
    )
    ts.save(out)
    n_alias = sum(len(t.aliases) for t in ts.tags)
    err.print(
        f"[green]ok[/] {ts.version_id}: {len(ts.tags)} tags ({n_alias} aliases) embedded with "
        f"{enc.id} → {out}"
    )


@app.command("describe-tags")
def describe_tags_cmd(
    out: Annotated[
        Path,
        typer.Option(
            help="Vocabulary JSON to write: the tags with `descriptions` (or `examples`); "
            "embed it with `import-tags OUT --format json`."
        ),
    ],
    vocab: Annotated[Path | None, typer.Option(help="Vocabulary file to describe.")] = None,
    vocab_format: Annotated[
        VocabFormat, typer.Option(help="Format of --vocab.")
    ] = VocabFormat.json,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Or labelled data: its distinct gold labels, by name only (as zero-shot eval)."
        ),
    ] = None,
    fmt: Annotated[DataFormat | None, typer.Option("--format", help="Format of --data.")] = None,
    level: LevelOpt = 1,
    llm: Annotated[
        str,
        typer.Option(
            envvar=_env("describe_llm"),
            help="local (the bundled Gemma 3 270M base model) or an OpenAI-compatible URL "
            "with a /completions endpoint.",
        ),
    ] = "local",
    llm_model: Annotated[str, typer.Option(envvar=_env("describe_llm_model"))] = "gemma3-270m",
    samples: Annotated[
        int, typer.Option(min=1, max=50, help="Texts sampled per tag (fewer: noisier).")
    ] = 20,
    style: Annotated[
        DescribeStyle,
        typer.Option(
            help="examples: a post or video caption that would carry the tag, embedded as "
            "content is (bundled model: KuaiRec level 1 / 2 recall@10 0.649 / 0.377 → 0.714 / "
            "0.478, but cooking 0.727 → 0.682; docs/QUALITY.md); descriptions: what the "
            "tag's items are about, embedded as tags are (level 1 / 2: 0.681 / 0.352)."
        ),
    ] = DescribeStyle.examples,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Concurrent LLM calls.")] = 1,
    tag_template: Annotated[
        str | None,
        typer.Option(
            help="How the prompt names a tag, with {name} for it: put the tags in their "
            "domain, e.g. '{name} (cooking)'. Only the prompt: the tag keeps its name. "
            "Default: the name alone.",
        ),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Sample example posts (or short descriptions) of every tag from a base LLM, by name
    alone; `import-tags` then mixes their mean into each tag's vector."""
    import contextlib
    import json as jsonlib
    import os

    from consumer.tagging.config import Settings
    from consumer.tagging.llm_server import GEMMA, LocalLLM
    from consumer.tools.describe import PROMPT_VERSIONS, Describer
    from tagsys import DEFAULT_TEMPLATE, Tag, check_template
    from tagsys.datasets import load
    from tagsys.vocab import read_vocabulary

    logs.configure("warning")
    template = check_template(tag_template) if tag_template else DEFAULT_TEMPLATE
    if (vocab is None) == (data is None):
        raise TagstreamError("give either --vocab FILE or --data FILE --format F")
    if data is not None:
        if fmt is None:
            raise TagstreamError("--data needs --format (kuairec, stackexchange or jsonl)")
        labels = load(data, fmt.value, level=level).labels
        if not labels:
            raise TagstreamError(f"{data}: no gold labels found")
        tags = [Tag(id=label, name=label) for label in labels]
        name, version, source = f"{data.stem}-labels", "1", data.name
    else:
        assert vocab is not None
        v = read_vocabulary(vocab, vocab_format.value)
        tags, name, version, source = v.tags, v.name, v.version, vocab.name
    with contextlib.ExitStack() as stack:
        if llm.strip().lower() == "local":
            # no broker or consumer to leave a core to here: llama.cpp gets them all
            local = stack.enter_context(
                LocalLLM(model=GEMMA, parallel=concurrency, threads=os.cpu_count() or 2)
            )
            url, model, key = local.base_url, local.model, SecretStr("")
        else:
            url, model, key = llm, llm_model, Settings().llm_api_key
        describer = Describer(
            url,
            model,
            key,
            samples=samples,
            concurrency=concurrency,
            style=style.value,
            template=template,
        )
        with _progress("describing") as bar:
            task = bar.add_task("describe", total=len(tags) * samples)
            described, rep = describer.describe(
                tags, lambda done, total: bar.update(task, completed=done, total=total)
            )
    doc = {
        "name": name,
        "version": version,
        "provenance": {
            "described_by": model,
            "prompt": PROMPT_VERSIONS[style.value],
            "style": style.value,
            "samples": samples,
            **({"prompt_template": template} if template != DEFAULT_TEMPLATE else {}),
            "source": source,
        },
        "tags": [t.to_dict() for t in described],
    }
    out.write_text(jsonlib.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    res = {
        "out": str(out),
        "tags": rep.tags,
        "described": rep.described,
        "requests": rep.requests,
        "failed": rep.failed,
    }
    for k, v2 in res.items():
        err.print(f"{k:<10} {v2}")
    if rep.failed:
        err.print(
            f"[yellow]warning:[/] {rep.failed} requests gave no text, e.g. "
            f"{rep.errors[0] if rep.errors else 'an empty answer'}"
        )
    if json:
        _emit_json(res)


@app.command("llm-serve")
def llm_serve(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 in a container).")] = (
        "127.0.0.1"
    ),
    parallel: Annotated[int, typer.Option(help="Concurrent request slots.")] = 2,
    model: Annotated[
        str,
        typer.Option(
            help="smollm2 (SmolLM2-135M-Instruct, chat) or gemma3-270m (Gemma 3 270M base, "
            "completions only: what describe-tags uses)."
        ),
    ] = "smollm2",
) -> None:
    """Serve a bundled small LLM as an OpenAI-compatible API (foreground)."""
    import os

    from consumer.tagging.llm_server import serve

    serve(port, parallel, 2048, os.cpu_count() or 2, host, model)


def main(argv: list[str] | None = None) -> Any:
    try:
        return app(args=argv, standalone_mode=True)
    except TagstreamError as e:
        err.print(f"[red]error:[/] {e}")
        raise SystemExit(2) from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        err.print(f"[red]invalid setting[/] {where}: {first['msg']}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
