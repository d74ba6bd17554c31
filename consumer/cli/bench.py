"""`tagstream bench`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from consumer.cli import logs
from consumer.cli.options import (
    DeviceChoice,
    JsonOpt,
    ModelDirOpt,
    emit_json,
    env_option,
    print_table,
)


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
        Path | None, typer.Option(help="Shared data folder (default: ../shared/data when present).")
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
        env_option("model", "Encoder name (default: the tag system's, else all-MiniLM-L6-v2)."),
    ] = None,
    model_dir: ModelDirOpt = None,
    device: Annotated[DeviceChoice, env_option("device", "auto, cpu or cuda.")] = DeviceChoice.auto,
    image_model: Annotated[
        str | None,
        typer.Option(
            help="Also run the items end to end with a cover image each, fetched from a local "
            "store, with this image model (`export-onnx --clip`): images' cost and how much "
            "of their fetching hides behind the encoder."
        ),
    ] = None,
    image_delay_ms: Annotated[
        float, typer.Option(min=0.0, help="The local store's answer delay per image.")
    ] = 50.0,
) -> None:
    """Measure encoder vs end-to-end throughput, latency, PyTorch and the 40k-tag shortlist."""
    from consumer.tools.bench import run_bench
    from models_onnx.clip import clip_folder

    logs.configure("warning")
    res = run_bench(  # in the order of the options
        items=items,
        batch_size=batch_size,
        rate=rate,
        latency_items=latency_items,
        rounds=rounds,
        torch=torch,
        sweep=[int(x) for x in sweep_batch_tokens.split(",")] if sweep_batch_tokens else None,
        data=data,
        tag_system=tag_system,
        model=model,
        model_dir=model_dir,
        device=device.value,
        show_progress=sys.stderr.isatty() or not json,
        image_model=clip_folder(image_model, model_dir) if image_model else None,
        image_delay_ms=image_delay_ms,
    )
    out = res.to_json()
    print_table(out, 28)
    if json:
        emit_json(out)
