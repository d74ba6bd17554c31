"""`tagstream llm-serve`."""

from __future__ import annotations

from typing import Annotated

import typer


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
