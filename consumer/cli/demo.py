"""`tagstream demo`."""

from __future__ import annotations

from typing import Annotated

import typer

from consumer.cli import logs
from consumer.cli.options import (
    JsonOpt,
    LogLevel,
    ModelDirOpt,
    ModelOpt,
    emit_json,
    env_option,
    err,
)


def demo(
    json: JsonOpt = False,
    llm: Annotated[
        str, env_option("demo_llm", "'local' (bundled SmolLM2), 'none', or a base URL.")
    ] = "local",
    model: ModelOpt = "all-MiniLM-L6-v2",
    model_dir: ModelDirOpt = None,
    llm_extract: Annotated[
        bool,
        typer.Option(help="The LLM extracts each item's facts first (as `run --llm-extract`)."),
    ] = False,
    log_level: LogLevel = "warning",
) -> None:
    """Embedded broker + local LLM + the sample events through the whole path, then a summary."""
    from consumer.tools.demo import print_report, run_demo

    logs.configure(log_level)
    res = run_demo(llm=llm, model=model, model_dir=model_dir, console=err, llm_extract=llm_extract)
    print_report(res, err)
    if json:
        emit_json(res.summary())
    if res.events_out != res.events_in:
        raise typer.Exit(1)
