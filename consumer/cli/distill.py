"""`tagstream distill`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from consumer.cli import logs
from consumer.cli.options import (
    DATA_HELP,
    Bootstrap,
    CalibrationChoice,
    CalibrationOpt,
    DataFormat,
    EmbeddingCacheOpt,
    EvalModelOpt,
    JsonOpt,
    LevelOpt,
    LimitOpt,
    ModelDirOpt,
    TagTemplateOpt,
    emit_json,
    err,
    precision_option,
    print_table,
    tracked,
)

if TYPE_CHECKING:
    from consumer.tools.distill import Labelled
    from tagsys import TagSystem
    from tagsys.datasets import Item


def load_labelled(
    data: Path,
    fmt: DataFormat,
    level: int,
    base: TagSystem | None,
    model: str | None,
    model_dir: Path | None,
    limit: int | None,
    tag_template: str | None,
    embedding_cache: Path | None,
) -> tuple[TagSystem, Labelled, list[Item], dict[str, int]]:
    """`labelled_from_file` behind a progress bar, for the commands that learn from a file."""
    from consumer.tools.distill import labelled_from_file

    with tracked("embedding", "embed") as progress:
        return labelled_from_file(
            data,
            fmt.value,
            level=level,
            base=base,
            model=model,
            model_dir=model_dir,
            limit=limit,
            progress=progress,
            tag_template=tag_template,
            embedding_cache=embedding_cache,
        )


def _figure(fraction: float, precision: float | None) -> str:
    return "no item accepted" if precision is None else f"{fraction:.3f} at {precision:.3f}"


def distill_cmd(
    out: Annotated[Path, typer.Option(help="Folder to write the distilled tag system to.")],
    data: Annotated[Path | None, typer.Option("--data", help=DATA_HELP)] = None,
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
        float,
        typer.Option(
            min=0.0,
            max=0.9,
            help="Share of items held out (by id hash) for the before/after check. 0: learn "
            "from every item, check out-of-fold (cross calibration only).",
        ),
    ] = 0.3,
    target_precision: Annotated[
        float, precision_option("Auto-accept precision the gate aims at.")
    ] = 0.9,
    limit: LimitOpt = None,
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
    calibration: CalibrationOpt = CalibrationChoice.cross,
    include_steerable: Annotated[
        bool,
        typer.Option(
            help="With --from-topic: learn from generative-mode decisions too (their text "
            "could steer the tags: left out by default, counted under skipped.steerable)."
        ),
    ] = False,
    require_reached: Annotated[
        bool,
        typer.Option(
            help="Write nothing and exit 3 when no gate reaches --target-precision (such a "
            "version would auto-accept nothing): the chart's CronJob runs with it, so the "
            "live version keeps tagging."
        ),
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Fit a light head on the encoder embeddings from labelled data or recorded LLM
    decisions, recalibrate the gate, write a new tag-system version; report before/after on
    held-out items (written to OUT.heldout.jsonl when --data is used).

    With --holdout 0 the check is out-of-fold. A version whose gate reaches no setting at
    --target-precision (reached: false) auto-accepts nothing in the service.

    auto_ceiling: the most any gate could auto-accept there at the target with that scorer
    (an oracle picking the items)."""
    from consumer.tools.distill import (
        check_holdout,
        distill,
        labelled_from_decisions,
        write_heldout,
    )
    from tagsys import TagSystem, TagSystemError

    logs.configure("warning")
    check_holdout(holdout, calibration.value)
    base = TagSystem.load(tag_system) if tag_system else None
    extra: dict[str, Any] = {}
    labelled: Any
    items: list[Any] = []
    if from_topic:
        if base is None:
            raise TagSystemError("--from-topic needs --tag-system (the vocabulary decided over)")
        from consumer.tagging.config import Settings
        from consumer.tools.distill_topic import read_decisions

        # the brokers' security settings as the service reads them (TAGSTREAM_SECURITY_*,
        # TAGSTREAM_SASL_*): a CronJob beside the service needs the same login
        kafka = Settings(bootstrap_servers=bootstrap_servers).kafka_common()
        records = read_decisions(bootstrap_servers, from_topic, kafka=kafka)
        labelled, skipped = labelled_from_decisions(
            records, base, include_steerable=include_steerable
        )
        extra.update(decisions=len(records), skipped=skipped)
    else:
        if data is None or fmt is None:
            raise TagSystemError("give --data and --format (labelled data) or --from-topic")
        base, labelled, items, counts = load_labelled(
            data, fmt, level, base, model, model_dir, limit, tag_template, embedding_cache
        )
        extra.update(counts)
    from tagsys.textfeat import TextFeatures

    with tracked("fitting", "fit") as progress:
        new, rep = distill(
            base,
            labelled,
            holdout=holdout,
            target_precision=target_precision,
            version=version,
            text=TextFeatures(buckets=text_buckets) if text_features else None,
            calibration=calibration.value,
            progress=progress,
        )
    short = (
        f"no gate reaches precision {target_precision} on these {rep['calibration_items']} items"
    )
    if not rep["reached"] and require_reached:
        raise TagSystemError(
            f"{short} (the most precise kept: "
            f"{_figure(rep['fit_auto_fraction'], rep['fit_auto_precision'])}); no version written "
            f"(--require-reached). Lower --target-precision, or improve the labels"
        )
    new.save(out)
    if items and holdout > 0:  # with 0 nothing is held out: the check is out-of-fold
        heldout = out.with_name(out.name + ".heldout.jsonl")
        extra["heldout_file"] = str(heldout)
        extra["heldout_written"] = write_heldout(items, holdout, heldout)
    if not rep["reached"]:
        err.print(
            f"[yellow]warning:[/] {short}: this version auto-accepts nothing (items go to the "
            "LLM, or out as review) unless the service runs with --unfitted-gate trust. Lower "
            "--target-precision, or improve the labels (docs/OPERATIONS.md)."
        )
    res = {**rep, **extra, "out": str(out)}
    print_table(res, 20)
    if json:
        emit_json(res)
