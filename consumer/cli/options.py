"""What the `tagstream` commands share: the choices (enums), every option that more than one
command takes (declared once, as `Annotated` aliases), the stderr console and the output
helpers. Imports no command module."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast, get_type_hints

import orjson
import typer
from rich.console import Console

from tagsys.bank import BANK_K, BANK_WEIGHT
from tagsys.tree import TREE_WEIGHT

err = Console(stderr=True)
Progress = Callable[[int, int], None]


def env(name: str) -> str:
    """The environment variable of a setting: `TAGSTREAM_<NAME>`."""
    return f"TAGSTREAM_{name.upper()}"


def env_option(name: str, help: str | None = None, **kw: Any) -> Any:
    """An option that also reads the environment variable `TAGSTREAM_<NAME>` (every option of
    `run`: each is the `Settings` field of its name)."""
    return typer.Option(envvar=env(name), help=help, **kw)


def emit_json(obj: object) -> None:
    """The `--json` contract: one JSON object as the last stdout line."""
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def print_table(res: dict[str, Any], width: int) -> None:
    """A result on stderr, one `name value` line an entry, the names padded to `width`."""
    for k, v in res.items():
        err.print(f"{k:<{width}} {v}")


def progress_bar(label: str) -> Any:
    """A bar on a terminal; timed plain lines otherwise (nohup, CI, a Job's log)."""
    from consumer.tools.progress import progress

    return progress(label, err)


@contextmanager
def tracked(label: str, task: str, total: int | None = None) -> Iterator[Progress]:
    """A progress bar with one task, and the `(done, total)` callback that moves it."""
    with progress_bar(label) as bar:
        task_id = bar.add_task(task, total=total)
        yield lambda d, t: bar.update(task_id, completed=d, total=t)


# the choices of options: each member's value is its name
UnavailableChoice = StrEnum("UnavailableChoice", ["review", "pause"])
UnfittedChoice = StrEnum("UnfittedChoice", ["llm", "trust"])
RuntimeChoice = StrEnum("RuntimeChoice", ["kafka", "faust"])
LLMMode = StrEnum("LLMMode", ["selective", "generative"])
DeviceChoice = StrEnum("DeviceChoice", ["auto", "cpu", "cuda"])
PromptStyle = StrEnum("PromptStyle", ["auto", "chat", "fewshot"])
DataFormat = StrEnum("DataFormat", ["kuairec", "stackexchange", "jsonl"])
VocabFormat = StrEnum("VocabFormat", ["json", "taggpt", "list", "hierarchy"])
CalibrationChoice = StrEnum("CalibrationChoice", ["cross", "split"])


class DescribeStyle(StrEnum):
    """A class, not a call: `Describer` takes its values as a `Literal`, which mypy sees here."""

    examples = "examples"
    descriptions = "descriptions"


# Kafka, encoder, logging, output
Bootstrap = Annotated[
    str, env_option("bootstrap_servers", "Kafka bootstrap servers, HOST:PORT[,…].")
]
ModelOpt = Annotated[str, env_option("model", "Encoder name.")]
ModelDirOpt = Annotated[
    Path | None,
    env_option("model_dir", "Where exported encoders live (default: ~/.cache/tagstream/models)."),
]
LogLevel = Annotated[str, env_option("log_level", "debug, info, warning.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Last stdout line: one JSON object.")]

# labelled data, tag systems (eval, calibrate, distill, build-tags, import-tags, describe-tags)
DATA_HELP = "Labelled data file."
DataOpt = Annotated[Path, typer.Option("--data", help=DATA_HELP)]
FormatOpt = Annotated[
    DataFormat,
    typer.Option(
        "--format", help="kuairec (CSV), stackexchange (CSV) or jsonl (events + `labels`)."
    ),
]
LevelOpt = Annotated[int, typer.Option(min=1, max=3, help="KuaiRec category level (1-3).")]
LimitOpt = Annotated[int | None, typer.Option(help="Use the first N labelled items.")]
OutOpt = Annotated[Path, typer.Option(help="Folder to write the tag system to.")]
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
CalibrationOpt = Annotated[
    CalibrationChoice,
    typer.Option(
        help="How the distilled gate is calibrated: cross = on out-of-fold scores of every "
        "train item, head fitted on all of them (5 folds, 6 fits); split = head on 80%, gate "
        "on the other 20% (one fit; misses the target precision more often on small data)."
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
ImageModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Embed the tags for images too, with this image/text encoder pair's text tower "
        "(a folder from `export-onnx --clip`, or its name under --model-dir): `run "
        "--image-model` then scores images against them.",
    ),
]
EvalImageModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Score the items' images too, as `run --image-model` (the tag system must carry "
        "that model's image embeddings); calibrate then fits the image scores' scale first.",
    ),
]
ImageHostsOpt = Annotated[
    str, typer.Option(help="Where the items' images may be fetched from, as `run --image-hosts`.")
]
ImageSchemesOpt = Annotated[str, typer.Option(help="As `run --image-schemes`.")]
ImageTemplateOpt = Annotated[
    str, typer.Option(help="With --image-model: how a tag is put for the image side.")
]
EmbeddingCacheOpt = Annotated[
    Path | None,
    env_option(
        "embedding_cache",
        "Folder for the items' vectors, keyed by encoder weights and texts: a rerun on "
        "the same items with another tag system skips the encoder.",
    ),
]


# the gate (calibrate, distill)
def precision_option(help: str) -> Any:
    """--target-precision: the auto-accept precision a gate is fitted for."""
    return typer.Option(min=0.0, max=1.0, help=help)


# LLM calls (build-tags, describe-tags)
ConcurrencyOpt = Annotated[int, typer.Option(min=1, max=256, help="Concurrent LLM calls.")]


def samples_option(help: str) -> Any:
    """How many texts the describer samples per tag (`consumer.tools.describe.Describer`)."""
    return typer.Option(min=1, max=50, help=help)


@dataclass(frozen=True)
class TagVectors:
    """How the tag vectors are made (eval, calibrate, import-tags): each tag's name embedded
    through --tag-template, then mixed with a category tree's children and a bank's neighbours
    (`consumer.tools.evaluate.expand`). A command takes these options with `takes`."""

    bank: Annotated[
        Path | None,
        typer.Option(
            help="A larger tag system of the same domain and encoder (e.g. TagGPT's vocabulary, "
            "imported with import-tags): each tag's vector is mixed with its nearest bank tags'. "
            "No labels used."
        ),
    ] = None
    bank_k: Annotated[int, typer.Option(min=1, help="Bank neighbours per tag.")] = BANK_K
    bank_weight: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of the tag's own vector in the mix.")
    ] = BANK_WEIGHT
    tree: Annotated[
        Path | None,
        typer.Option(
            help="A category tree of the same encoder (a hierarchy CSV imported with import-tags "
            "--format hierarchy): a tag with children there is mixed with their names' mean. "
            "A taxonomy, no item labels.",
        ),
    ] = None
    tree_weight: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of the tag's own vector in the --tree mix."),
    ] = TREE_WEIGHT
    tag_template: TagTemplateOpt = None

    def mix(self) -> dict[str, Any]:
        """The keywords of `expand`: all but the template."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tag_template"}


Command = TypeVar("Command", bound=Callable[..., Any])


def takes(name: str, group: type[Any]) -> Callable[[Command], Command]:
    """Give a command the options of `group` (a dataclass of options that several commands
    share) as one parameter, `name`: `--help` lists them where that parameter stands, as if
    each were written there, and the command gets one `group` object built from them."""
    hints = get_type_hints(group, include_extras=True)
    kw_only = inspect.Parameter.KEYWORD_ONLY
    members = [
        inspect.Parameter(f.name, kw_only, default=f.default, annotation=hints[f.name])
        for f in fields(group)
    ]

    def add(command: Command) -> Command:
        own = inspect.signature(command, eval_str=True).parameters.values()
        params = [
            q for p in own for q in (members if p.name == name else [p.replace(kind=kw_only)])
        ]

        @functools.wraps(command)
        def with_group(**kw: Any) -> Any:
            kw[name] = group(**{m.name: kw.pop(m.name) for m in members})
            return command(**kw)

        with_group.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return cast(Command, with_group)

    return add
