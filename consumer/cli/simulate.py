"""`tagstream simulate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from consumer.cli import logs
from consumer.cli.options import (
    CalibrationChoice,
    CalibrationOpt,
    DataOpt,
    EmbeddingCacheOpt,
    EvalModelOpt,
    FormatOpt,
    JsonOpt,
    LevelOpt,
    LimitOpt,
    ModelDirOpt,
    TagSystemOpt,
    TagTemplateOpt,
    emit_json,
    err,
    precision_option,
    tracked,
)


def simulate_cmd(
    data: DataOpt,
    fmt: FormatOpt,
    llm_accuracy: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of items the simulated LLM gets right (it answers from the gold "
            "labels on the shortlist; otherwise one wrong shortlist tag).",
        ),
    ],
    distill_every: Annotated[
        int, typer.Option(min=10, help="Re-distil after this many new LLM decisions.")
    ] = 200,
    target_precision: Annotated[
        float, precision_option("Auto-accept precision each fitted gate aims at.")
    ] = 0.9,
    level: LevelOpt = 1,
    tag_system: TagSystemOpt = None,
    model: EvalModelOpt = None,
    model_dir: ModelDirOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Items per batch (swaps between).")] = 64,
    windows: Annotated[int, typer.Option(min=1, help="Windows of the stream reported.")] = 10,
    holdout: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.9,
            help="Share of decisions each fit holds out for its check (0: learn from all, "
            "check out-of-fold; cross calibration only).",
        ),
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the simulated LLM's mistakes.")] = 0,
    audit_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of auto-accepted items the LLM is asked about too (as `run`): their "
            "agreement is reported, and the answers join the decisions each fit learns from.",
        ),
    ] = 0.0,
    calibration: CalibrationOpt = CalibrationChoice.cross,
    shuffle: Annotated[
        int | None,
        typer.Option(
            help="Replay the file in a random order drawn from this seed instead of its own "
            "(how much the figures owe to one order)."
        ),
    ] = None,
    limit: LimitOpt = None,
    tag_template: TagTemplateOpt = None,
    embedding_cache: EmbeddingCacheOpt = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Draw LLM share and auto precision against items seen (PNG)."),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Run the learning loop on labelled data: the file replayed in order through the
    service's core, an LLM that answers from the gold labels (right with --llm-accuracy),
    re-distilled from its decisions every --distill-every.

    Until the first fit the gate accepts nothing (no unearned confidence); as the chart's
    CronJob, a fit short of its target is not published (the version live keeps tagging).
    Reports per window and overall: LLM share, auto-accept precision against gold, final
    precision / recall / F1, LLM calls saved.

    auto_ceiling: the most any gate could auto-accept at the target over the last fifth with
    the scorer live at the end (an oracle's pick; a version published during the last fifth
    learnt from part of it); auto_ceiling_unseen: the same with the version live when the
    last fifth began. Both are empty when no fit was published."""
    from consumer.cli.distill import load_labelled
    from consumer.tools.distill import check_holdout
    from consumer.tools.simulate import report, run_loop, shuffled
    from models_onnx import OnnxEncoder
    from tagsys import TagSystem

    logs.configure("warning")
    check_holdout(holdout, calibration.value)
    base = TagSystem.load(tag_system) if tag_system else None
    start, labelled, items, counts = load_labelled(
        data, fmt, level, base, model, model_dir, limit, tag_template, embedding_cache
    )
    if shuffle is not None:
        items, labelled = shuffled(items, labelled, shuffle)
    encoder = OnnxEncoder(start.encoder, model_dir=model_dir)
    with tracked("simulating", "items") as progress:
        res = run_loop(
            start,
            encoder,
            items,
            labelled,
            llm_accuracy=llm_accuracy,
            distill_every=distill_every,
            target_precision=target_precision,
            batch_size=batch_size,
            holdout=holdout,
            seed=seed,
            audit_fraction=audit_fraction,
            calibration=calibration.value,
            progress=progress,
        )
    out = report(res, labelled, start, target_precision=target_precision, windows=windows)
    out.update(
        llm_accuracy=llm_accuracy,
        distill_every=distill_every,
        calibration=calibration.value,
        shuffle=shuffle,
        **counts,
    )
    for k in ("items", "llm_calls", "llm_share", "llm_share_last_fifth", "auto_precision"):
        err.print(f"{k:<26} {_fmt(out[k])}")
    for k in (
        "auto_precision_last_fifth",
        "auto_ceiling",
        "auto_ceiling_unseen",
        "calls_saved_fraction",
        "f1",
    ):
        err.print(f"{k:<26} {_fmt(out[k])}")
    for k in ("audits", "gate_agreement"):
        err.print(f"{k:<26} {_fmt(out[k])}")
    live = sum(f["published"] for f in out["fits"])
    err.print(f"{'fits (published)':<26} {len(out['fits'])} ({live})")
    err.print("window      items  llm_share  auto_precision  f1")
    for w in out["windows"]:
        err.print(
            f"{w['from_item']:>6}-{w['to_item']:<6} {w['items']:>4}  {_fmt(w['llm_share']):>9}"
            f"  {_fmt(w['auto_precision']):>14}  {_fmt(w['f1'])}"
        )
    if plot is not None:
        draw(out, plot, title=f"{data.name}: LLM accuracy {llm_accuracy:g}")
        err.print(f"plot: {plot}")
    if json:
        emit_json(out)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def draw(out: dict[str, Any], path: Path, *, title: str) -> None:
    """LLM share and auto precision per window, against items seen."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from tagsys.errors import TagstreamError

        raise TagstreamError(
            f"--plot needs matplotlib: pip install 'tagstream[plot]' ({e})"
        ) from None
    xs = [w["to_item"] for w in out["windows"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [w["llm_share"] for w in out["windows"]], marker="o", label="LLM share")
    auto = [(x, w["auto_precision"]) for x, w in zip(xs, out["windows"], strict=True)]
    ax.plot(
        [x for x, p in auto if p is not None],
        [p for _, p in auto if p is not None],
        marker="s",
        label="auto-accept precision (gold)",
    )
    for f in out["fits"]:
        if f["published"]:
            ax.axvline(f["at_item"], color="grey", linewidth=0.5)
    ax.axhline(out["target_precision"], color="grey", linestyle="--", linewidth=0.8, label="target")
    ax.set_xlabel("items seen (grey: a re-distilled tag system goes live)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
