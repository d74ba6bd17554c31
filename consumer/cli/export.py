"""`tagstream export-onnx`."""

from __future__ import annotations

from typing import Annotated

import typer

from consumer.cli import logs
from consumer.cli.options import ModelDirOpt, env_option, err


def export_onnx(
    model: Annotated[
        str,
        env_option(
            "model",
            "Known encoder (all-MiniLM-L6-v2, multilingual-e5-small, embeddinggemma-300m), "
            "a Hugging Face "
            "model folder, or a hub id (needs hub access).",
        ),
    ] = "all-MiniLM-L6-v2",
    model_dir: ModelDirOpt = None,
    force: Annotated[
        bool, typer.Option(help="Re-export even if a verified export exists.")
    ] = False,
    fp16: Annotated[bool, typer.Option(help="Also write the fp16 (GPU) variant.")] = True,
    accept_gemma_terms: Annotated[
        bool,
        typer.Option(
            help="Accept the Gemma Terms of Use (ai.google.dev/gemma/terms), needed to fetch "
            "embeddinggemma-300m; or set TAGSTREAM_ACCEPT_GEMMA_TERMS=1.",
        ),
    ] = False,
) -> None:
    """(Re)export an encoder to ONNX: fp32, int8 per-channel (CPU) and fp16 (GPU) + manifest."""
    import os

    from models_onnx.export import export_encoder
    from models_onnx.registry import GEMMA_TERMS_ENV

    if accept_gemma_terms:
        os.environ[GEMMA_TERMS_ENV] = "1"
    logs.configure("warning")
    out = export_encoder(model, model_dir, force=force, fp16=fp16, step=lambda s: err.print(s))
    err.print(f"[green]ok[/] {out}")
