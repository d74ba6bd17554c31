"""The `tagstream` command. Every option of `run` is also an environment variable
`TAGSTREAM_…` (a few settings are environment variables only: README); other commands take
flags, and those of their options that read an environment variable say so in `--help`.

One module per command or group of commands; the options that several share are declared
once in `options`. The commands are registered here, in the order `--help` lists them."""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from consumer.cli import (
    bench,
    build,
    demo,
    distill,
    dlq,
    evaluate,
    export,
    llm,
    run,
    simulate,
    vocab,
)
from consumer.cli.options import err
from tagsys.errors import EXIT_CONFIG, TagstreamError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(epilog=run.env_only_help())(run.run)
app.command()(run.send)
app.command()(demo.demo)
app.command()(bench.bench)
app.command("export-onnx")(export.export_onnx)
app.command("replay-dlq")(dlq.replay_dlq_cmd)
app.command("eval")(evaluate.eval_cmd)
app.command("calibrate")(evaluate.calibrate_cmd)
app.command("distill")(distill.distill_cmd)
app.command("simulate")(simulate.simulate_cmd)
app.command("build-tags")(build.build_tags_cmd)
app.command("import-tags")(vocab.import_tags)
app.command("describe-tags")(vocab.describe_tags_cmd)
handbook = typer.Typer(
    no_args_is_help=True,
    help="The interest handbook that guides the LLM: draft one from your data, check one.",
)
handbook.command("draft")(vocab.handbook_draft_cmd)
handbook.command("check")(vocab.handbook_check_cmd)
app.add_typer(handbook, name="handbook")
app.command("llm-serve")(llm.llm_serve)


def prose(text: str | None) -> str | None:
    """A docstring as `--help` should show it: each paragraph one line, for rich to wrap
    (typer keeps the source's line breaks after the first paragraph)."""
    if not text:
        return text
    paras = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(
        p if p.startswith("\b") else " ".join(line.strip() for line in p.split("\n")) for p in paras
    )


def _reflow(group: typer.Typer) -> None:
    for cmd in group.registered_commands:
        cmd.help = prose(cmd.help or (cmd.callback.__doc__ if cmd.callback else None))
        cmd.epilog = prose(cmd.epilog)


_reflow(app)
_reflow(handbook)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"tagstream {version('tagstream')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Real-time tagging of uploaded content: Kafka in, ONNX encoder shortlist, selective LLM,
    tag events out.

    Exit codes: 0 success, 1 runtime failure, 2 usage error, 3 configuration or input error,
    4 a broker or endpoint unreachable (or refusing the credentials)."""


assert app.registered_callback is not None
app.registered_callback.help = prose(_root.__doc__)


def main(argv: list[str] | None = None) -> Any:
    try:
        return app(args=argv, standalone_mode=True)
    except TagstreamError as e:
        err.print(f"[red]error:[/] {e}", soft_wrap=True)  # one line, for logs and scripts
        raise SystemExit(e.exit_code) from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        at = f" {where}" if where else ""
        err.print(f"[red]invalid setting[/]{at}: {first['msg']}", soft_wrap=True)
        raise SystemExit(EXIT_CONFIG) from None


if __name__ == "__main__":
    main()
