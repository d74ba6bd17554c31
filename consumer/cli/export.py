"""`tagstream export-onnx`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from consumer.cli import logs
from consumer.cli.options import ModelDirOpt, env_option, err

CLIP_HELP = (
    "A local CLIP or SigLIP checkpoint folder to export as an image/text encoder pair "
    "instead of a text encoder (always re-exports; not with --model)."
)


def export_onnx(
    ctx: typer.Context,
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
    clip: Annotated[Path | None, typer.Option("--clip", metavar="SRC_DIR", help=CLIP_HELP)] = None,
    name: Annotated[
        str | None,
        typer.Option(help="With --clip: the model's name (default: the folder's name)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="With --clip: the folder to write (default: the model dir / NAME)."),
    ] = None,
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
    """(Re)export an encoder to ONNX: fp32, int8 per-channel (CPU) and fp16 (GPU) + manifest;
    or, with --clip, a CLIP-family image/text pair.

    --clip takes a Hugging Face checkpoint folder that you bring (config.json, weights,
    tokenizer.json, preprocessor_config.json): nothing is downloaded. Made for
    openai/clip-vit-base-patch32 (MIT) and google/siglip-base-patch16-224 (Apache-2.0; its
    folder needs a tokenizer.json); LAION's CLIP-ViT-B-32 open_clip checkpoints only through
    their Hugging Face transformers ports. The weights' licence applies to the export: check
    it before you ship it."""
    import os

    from models_onnx.export import export_encoder
    from models_onnx.registry import GEMMA_TERMS_ENV

    if clip is not None:
        # an explicit --model conflicts; TAGSTREAM_MODEL (what `run` reads) does not
        source = ctx.get_parameter_source("model")
        if source is not None and source.name == "COMMANDLINE":
            raise typer.BadParameter("--clip and --model are exclusive", param_hint="--model")
        _export_clip(clip, name, out, model_dir, fp16)
        return
    if name is not None or out is not None:
        raise typer.BadParameter("--name and --out go with --clip", param_hint="--clip")
    if accept_gemma_terms:
        os.environ[GEMMA_TERMS_ENV] = "1"
    logs.configure("warning")
    folder = export_encoder(model, model_dir, force=force, fp16=fp16, step=lambda s: err.print(s))
    err.print(f"[green]ok[/] {folder}")


def _export_clip(
    src: Path, name: str | None, out: Path | None, model_dir: Path | None, fp16: bool
) -> None:
    from models_onnx.clip import export_clip
    from models_onnx.registry import model_path

    name = name or src.resolve().name
    target = out or model_path(name, model_dir)
    variants = ("fp32", "int8", "fp16") if fp16 else ("fp32", "int8")
    logs.configure("warning")
    export_clip(src, target, name=name, variants=variants, say=lambda s: err.print(s))
    err.print(f"[green]ok[/] {target}")
