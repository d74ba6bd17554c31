"""`tagstream eval` and `tagstream calibrate`: the service's scoring over labelled data."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from consumer.cli import logs
from consumer.cli.options import (
    AdaptOpt,
    DataOpt,
    EmbeddingCacheOpt,
    EvalImageModelOpt,
    EvalModelOpt,
    FormatOpt,
    ImageHostsOpt,
    ImageSchemesOpt,
    JsonOpt,
    LevelOpt,
    LimitOpt,
    ModelDirOpt,
    TagSystemOpt,
    TagVectors,
    UnfittedChoice,
    emit_json,
    env_option,
    err,
    precision_option,
    print_table,
    takes,
    tracked,
)


def _run_eval(
    data: Path,
    fmt: str,
    level: int,
    tag_system: Path | None,
    model: str | None,
    model_dir: Path | None,
    limit: int | None,
    adapt: bool,
    vectors: TagVectors,
    embedding_cache: Path | None,
    **llm: Any,
) -> Any:
    """`run_eval` on the options eval and calibrate share, with a progress bar while the items
    are embedded."""
    from consumer.tools.evaluate import run_eval

    with tracked("embedding", "embed") as progress:
        return run_eval(
            data,
            fmt,
            level=level,
            tag_system=tag_system,
            model=model,
            model_dir=model_dir,
            limit=limit,
            adapt_corpus=adapt,
            embedding_cache=embedding_cache,
            progress=progress,
            **llm,
            **asdict(vectors),
        )


def _images(model: str | None, hosts: str, schemes: str) -> Any:
    from consumer.tagging.image_stage import ImageOptions

    if model is None:
        if hosts:
            raise typer.BadParameter("needs --image-model", param_hint="--image-hosts")
        return None
    return ImageOptions(model=model, hosts=hosts, schemes=schemes)


@takes("vectors", TagVectors)
def eval_cmd(
    data: DataOpt,
    fmt: FormatOpt,
    level: LevelOpt = 1,
    tag_system: TagSystemOpt = None,
    model: EvalModelOpt = None,
    model_dir: ModelDirOpt = None,
    llm: Annotated[
        str, env_option("llm", "none, local (bundled SmolLM2), or an OpenAI-compatible URL.")
    ] = "none",
    llm_model: Annotated[str, env_option("llm_model")] = "smollm2",
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N labelled items.")] = None,
    adapt: AdaptOpt = False,
    vectors: TagVectors = TagVectors(),
    embedding_cache: EmbeddingCacheOpt = None,
    unfitted_gate: Annotated[
        UnfittedChoice,
        env_option(
            "unfitted_gate",
            "As `run`: 'llm' (a zero-shot gate, or one short of its target, auto-accepts "
            "nothing) or 'trust' (measure what its thresholds would accept).",
        ),
    ] = UnfittedChoice.llm,
    llm_handbook: Annotated[
        Path | None,
        typer.Option(help="Interest handbook guiding the LLM, as `run --llm-handbook`."),
    ] = None,
    llm_extract: Annotated[
        bool, typer.Option(help="The LLM states the facts first, as `run --llm-extract`.")
    ] = False,
    image_model: EvalImageModelOpt = None,
    image_hosts: ImageHostsOpt = "",
    image_schemes: ImageSchemesOpt = "https",
    json: JsonOpt = False,
) -> None:
    """Run the service's decision path (no Kafka) over labelled data and report quality."""
    from consumer.tagging.config import Settings
    from consumer.tools.evaluate import report

    logs.configure("warning")
    run_ = _run_eval(
        data,
        fmt.value,
        level,
        tag_system,
        model,
        model_dir,
        limit,
        adapt,
        vectors,
        embedding_cache,
        llm=llm,
        llm_model=llm_model,
        llm_api_key=Settings().llm_api_key,
        trust_unfitted_gate=unfitted_gate is UnfittedChoice.trust,
        handbook=llm_handbook,
        llm_extract=llm_extract,
        images=_images(image_model, image_hosts, image_schemes),
    )
    out = report(run_)
    for k, v in out.items():
        err.print(f"{k:<18} {round(v, 4) if isinstance(v, float) else v}")
    if json:
        emit_json(out)


@takes("vectors", TagVectors)
def calibrate_cmd(
    data: DataOpt,
    fmt: FormatOpt,
    out: Annotated[Path, typer.Option(help="Folder to write the calibrated tag system to.")],
    level: LevelOpt = 1,
    tag_system: TagSystemOpt = None,
    model: EvalModelOpt = None,
    model_dir: ModelDirOpt = None,
    target_precision: Annotated[float, precision_option("Auto-accept precision to reach.")] = 0.9,
    fit_fraction: Annotated[
        float,
        typer.Option(min=0.05, max=0.95, help="Share of items to fit on; the rest checks it."),
    ] = 0.5,
    limit: LimitOpt = None,
    adapt: AdaptOpt = False,
    vectors: TagVectors = TagVectors(),
    embedding_cache: EmbeddingCacheOpt = None,
    image_model: EvalImageModelOpt = None,
    image_hosts: ImageHostsOpt = "",
    image_schemes: ImageSchemesOpt = "https",
    json: JsonOpt = False,
) -> None:
    """Fit the gate (threshold, margin, max tags, per-tag thresholds) for a target auto-accept
    precision on labelled data; report it on held-out items; write a new tag-system version.

    held_out_after: the fitted gate's own figures. trusted: false when no setting reaches the
    target (reached: false): the service then auto-accepts nothing with this version.

    held_out_auto_ceiling: the most any gate could auto-accept there at the target with this
    scorer (an oracle picking the items); below the share you want, improve the scorer."""
    from consumer.tools.evaluate import run_calibrate

    logs.configure("warning")
    run_ = _run_eval(
        data,
        fmt.value,
        level,
        tag_system,
        model,
        model_dir,
        limit,
        adapt,
        vectors,
        embedding_cache,
        images=_images(image_model, image_hosts, image_schemes),
    )
    ts, cal, before, after = run_calibrate(
        run_, target_precision=target_precision, fit_fraction=fit_fraction
    )
    ts.save(out)
    if not cal.reached:
        err.print(
            f"[yellow]warning:[/] no gate reaches precision {target_precision} on the fit part: "
            "the service auto-accepts nothing with this tag system (`--unfitted-gate trust` "
            "would use the most precise gate, kept in it; held_out_auto_ceiling says how far "
            "any gate could go)"
        )
    res = {
        "tag_system": ts.version_id,
        "out": str(out),
        "reached": cal.reached,
        "trusted": ts.gate_fitted,
        "gate": ts.gate.to_dict() | {"tag_thresholds": len(ts.gate.tag_thresholds)},
        "held_out_before": {
            k: before[k] for k in ("auto_fraction", "auto_precision", "llm_fraction")
        },
        "held_out_after": {
            k: after[k] for k in ("auto_fraction", "auto_precision", "llm_fraction")
        },
        "held_out_auto_ceiling": after["auto_ceiling"],
        **({"image_fusion": after["image_fusion"]} if "image_fusion" in after else {}),
    }
    print_table(res, 16)
    if json:
        emit_json(res)
