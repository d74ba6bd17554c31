"""`tagstream import-tags`, `describe-tags` and `handbook draft|check`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from pydantic import SecretStr

from consumer.cli import logs
from consumer.cli.options import (
    ConcurrencyOpt,
    DataFormat,
    DataOpt,
    DescribeStyle,
    FormatOpt,
    ImageModelOpt,
    ImageTemplateOpt,
    JsonOpt,
    LevelOpt,
    ModelDirOpt,
    ModelOpt,
    OutOpt,
    TagVectors,
    VocabFormat,
    emit_json,
    env_option,
    err,
    print_table,
    samples_option,
    takes,
    tracked,
)
from tagsys import DEFAULT_IMAGE_TEMPLATE
from tagsys.errors import TagstreamError


def _encode_with_progress(enc: Any, texts: list[str], label: str, kind: str = "passage") -> Any:
    import numpy as np

    out = np.empty((len(texts), enc.dim), dtype=np.float32)
    with tracked(label, label, len(texts)) as progress:
        for s in range(0, len(texts), 512):
            out[s : s + 512] = enc.encode(texts[s : s + 512], kind=kind)
            progress(min(len(texts), s + 512), len(texts))
    return out


@takes("vectors", TagVectors)
def import_tags(
    file: Annotated[Path, typer.Argument(help="The vocabulary file.")],
    out: OutOpt,
    fmt: Annotated[
        VocabFormat,
        typer.Option(
            "--format",
            help="json ({name, version, gate?, tags: [{id?, name, aliases?, category?, "
            "description?, descriptions?, examples?}]}), taggpt (`tag||['alias', ...]`, no "
            "header), list (one tag per line) or hierarchy (CSV with a header, one top-down "
            "path per row; a KuaiRec data file is read by its category-name columns).",
        ),
    ] = VocabFormat.json,
    columns: Annotated[
        str | None,
        typer.Option(
            help="With --format hierarchy: the path's columns, top level first, comma "
            "separated (default: every column).",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Tag-system name (default: from the file).")] = (
        None
    ),
    version: Annotated[str | None, typer.Option(help="Version (default: from the file or 1).")] = (
        None
    ),
    lexical_boost: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="Score added when a tag is named in the text (default 0.1)."
        ),
    ] = None,
    model: ModelOpt = "all-MiniLM-L6-v2",
    model_dir: ModelDirOpt = None,
    vectors: TagVectors = TagVectors(),
    image_model: ImageModelOpt = None,
    image_template: ImageTemplateOpt = DEFAULT_IMAGE_TEMPLATE,
) -> None:
    """Embed a vocabulary with an encoder and write a versioned tag-system folder (with
    --image-model, the tags embedded for images too)."""
    from dataclasses import replace

    from consumer.tagging.events import unmark_hashtags
    from consumer.tools.evaluate import expand, template_for
    from consumer.tools.image_tags import with_image_space
    from models_onnx import OnnxEncoder
    from tagsys import TagSystem, embed_tags, template_provenance
    from tagsys.gate import GateConfig
    from tagsys.vocab import read_vocabulary

    logs.configure("warning")
    template = template_for(None, vectors.tag_template)
    cols = tuple(c.strip() for c in columns.split(",") if c.strip()) if columns else None
    vocab = read_vocabulary(file, fmt.value, columns=cols)
    for p in vocab.problems[:10]:
        err.print(f"[yellow]warning:[/] {p}")
    if len(vocab.problems) > 10:
        err.print(f"[yellow]warning:[/] … and {len(vocab.problems) - 10} more")
    gate = vocab.gate or GateConfig(lexical_boost=0.1)
    if lexical_boost is not None:
        gate = replace(gate, lexical_boost=lexical_boost)
    enc = OnnxEncoder(model, model_dir=model_dir)
    unreadable = enc.unreadable([t.name for t in vocab.tags])
    if unreadable:
        err.print(
            f"[yellow]warning:[/] {enc.name} cannot read {len(unreadable)} of the "
            f"{len(vocab.tags)} tag names (mostly unknown tokens, e.g. "
            f"{vocab.tags[unreadable[0]].name!r}): such tags get near-identical vectors; use an "
            "encoder for their language, e.g. --model multilingual-e5-small"
        )
    tag_enc = enc.tag_encoder()
    emb = embed_tags(
        vocab.tags,
        lambda texts: _encode_with_progress(tag_enc, texts, "embedding"),
        template=template,
        # example posts are content: the service's text treatment, the encoder's query side
        encode_content=lambda texts: _encode_with_progress(
            tag_enc, [unmark_hashtags(t) for t in texts], "embedding examples", kind="query"
        ),
    )
    ts = TagSystem(
        name=name or vocab.name,
        version=version or vocab.version,
        encoder=enc.name,
        tags=vocab.tags,
        embeddings=emb,
        gate=gate,
        provenance={
            "imported_from": file.name,
            "format": fmt.value,
            **template_provenance(template),
        },
    )
    ts = expand(ts, **vectors.mix())
    if image_model is not None:
        ts = with_image_space(ts, image_model, model_dir=model_dir, template=image_template)
    ts.save(out)
    n_alias = sum(len(t.aliases) for t in ts.tags)
    err.print(
        f"[green]ok[/] {ts.version_id}: {len(ts.tags)} tags ({n_alias} aliases) embedded with "
        f"{enc.id}{f' and {ts.image.model}' if ts.image else ''} → {out}"
    )


def describe_tags_cmd(
    out: Annotated[
        Path,
        typer.Option(
            help="Vocabulary JSON to write: the tags with `descriptions` (or `examples`); "
            "embed it with `import-tags OUT --format json`."
        ),
    ],
    vocab: Annotated[Path | None, typer.Option(help="Vocabulary file to describe.")] = None,
    vocab_format: Annotated[
        VocabFormat, typer.Option(help="Format of --vocab.")
    ] = VocabFormat.json,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Or labelled data: its distinct gold labels, by name only (as zero-shot eval)."
        ),
    ] = None,
    fmt: Annotated[DataFormat | None, typer.Option("--format", help="Format of --data.")] = None,
    level: LevelOpt = 1,
    llm: Annotated[
        str,
        env_option(
            "describe_llm",
            "local (the bundled Gemma 3 270M base model) or an OpenAI-compatible URL "
            "with a /completions endpoint.",
        ),
    ] = "local",
    llm_model: Annotated[str, env_option("describe_llm_model")] = "gemma3-270m",
    samples: Annotated[int, samples_option("Texts sampled per tag (fewer: noisier).")] = 20,
    style: Annotated[
        DescribeStyle,
        typer.Option(
            help="examples: a post or video caption that would carry the tag, embedded as "
            "content is (bundled model: KuaiRec level 1 / 2 recall@10 0.649 / 0.377 → 0.714 / "
            "0.478, but cooking 0.727 → 0.682; docs/QUALITY.md); descriptions: what the "
            "tag's items are about, embedded as tags are (level 1 / 2: 0.681 / 0.352)."
        ),
    ] = DescribeStyle.examples,
    concurrency: ConcurrencyOpt = 1,
    tag_template: Annotated[
        str | None,
        typer.Option(
            help="How the prompt names a tag, with {name} for it: put the tags in their "
            "domain, e.g. '{name} (cooking)'. Only the prompt: the tag keeps its name. "
            "Default: the name alone.",
        ),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Sample example posts (or short descriptions) of every tag from a base LLM, by name
    alone; `import-tags` then mixes their mean into each tag's vector."""
    import contextlib
    import json as jsonlib
    import os

    from consumer.tagging.config import Settings
    from consumer.tagging.llm_server import GEMMA, LocalLLM
    from consumer.tools.describe import PROMPT_VERSIONS, Describer
    from tagsys import DEFAULT_TEMPLATE, Tag, check_template
    from tagsys.datasets import load
    from tagsys.vocab import read_vocabulary

    logs.configure("warning")
    template = check_template(tag_template) if tag_template else DEFAULT_TEMPLATE
    if (vocab is None) == (data is None):
        raise TagstreamError("give either --vocab FILE or --data FILE --format F")
    if data is not None:
        if fmt is None:
            raise TagstreamError("--data needs --format (kuairec, stackexchange or jsonl)")
        labels = load(data, fmt.value, level=level).labels
        if not labels:
            raise TagstreamError(f"{data}: no gold labels found")
        tags = [Tag(id=label, name=label) for label in labels]
        name, version, source = f"{data.stem}-labels", "1", data.name
    else:
        assert vocab is not None
        v = read_vocabulary(vocab, vocab_format.value)
        tags, name, version, source = v.tags, v.name, v.version, vocab.name
    with contextlib.ExitStack() as stack:
        if llm.strip().lower() == "local":
            # no broker or consumer to leave a core to here: llama.cpp gets them all
            local = stack.enter_context(
                LocalLLM(model=GEMMA, parallel=concurrency, threads=os.cpu_count() or 2)
            )
            url, model, key = local.base_url, local.model, SecretStr("")
        else:
            url, model, key = llm, llm_model, Settings().llm_api_key
        describer = Describer(
            url,
            model,
            key,
            samples=samples,
            concurrency=concurrency,
            style=style.value,
            template=template,
        )
        with tracked("describing", "describe", len(tags) * samples) as progress:
            described, rep = describer.describe(tags, progress)
    doc = {
        "name": name,
        "version": version,
        "provenance": {
            "described_by": model,
            "prompt": PROMPT_VERSIONS[style.value],
            "style": style.value,
            "samples": samples,
            **({"prompt_template": template} if template != DEFAULT_TEMPLATE else {}),
            "source": source,
        },
        "tags": [t.to_dict() for t in described],
    }
    out.write_text(jsonlib.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    res = {
        "out": str(out),
        "tags": rep.tags,
        "described": rep.described,
        "requests": rep.requests,
        "failed": rep.failed,
    }
    print_table(res, 10)
    if rep.failed:
        err.print(
            f"[yellow]warning:[/] {rep.failed} requests gave no text, e.g. "
            f"{rep.errors[0] if rep.errors else 'an empty answer'}"
        )
    if json:
        emit_json(res)


def handbook_draft_cmd(
    data: DataOpt,
    fmt: FormatOpt,
    out: Annotated[Path, typer.Option(help="Handbook file to write (JSON).")],
    level: LevelOpt = 1,
    tag_system: Annotated[
        Path | None,
        typer.Option(help="Tag system whose tags' categories group the handbook (else labels)."),
    ] = None,
    llm: Annotated[
        str, env_option("llm", "'local' (bundled SmolLM2) or an OpenAI-compatible base URL.")
    ] = "local",
    llm_model: Annotated[str, env_option("llm_model")] = "smollm2",
    name: Annotated[str, typer.Option(help="Handbook name.")] = "drafted",
    version: Annotated[str, typer.Option(help="Handbook version.")] = "1",
    examples: Annotated[int, typer.Option(min=1, max=10, help="Items shown per category.")] = 5,
    max_categories: Annotated[
        int, typer.Option(min=1, help="Draft the categories with the most items, up to this.")
    ] = 40,
    json: JsonOpt = False,
) -> None:
    """Draft an interest handbook from your own data with the LLM, for review: per category,
    what its users care about, which facets a tag should name, good and too-vague tags."""
    import contextlib

    from consumer.tagging.config import Settings
    from consumer.tagging.llm import SelectiveTagger
    from consumer.tagging.llm_server import LocalLLM
    from consumer.tools.handbook_draft import draft
    from tagsys import TagSystem

    logs.configure("warning")
    ts = TagSystem.load(tag_system) if tag_system else None
    with contextlib.ExitStack() as stack:
        if llm.strip().lower() == "local":
            local = stack.enter_context(LocalLLM())
            url, model, key = local.base_url, local.model, SecretStr("")
        else:
            url, model, key = llm, llm_model, Settings().llm_api_key
        tagger = SelectiveTagger(url, model, key, timeout_s=120.0)
        stack.callback(tagger.close)
        with tracked("drafting", "categories") as progress:
            doc, report = draft(
                tagger,
                data,
                fmt.value,
                level=level,
                tag_system=ts,
                name=name,
                version=version,
                examples=examples,
                max_categories=max_categories,
                progress=progress,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    report["out"] = str(out)
    print_table(report, 20)
    err.print(
        f"review it (`tagstream handbook check {out}`), then use it: "
        "`tagstream run --llm-handbook FILE`"
    )
    if json:
        emit_json(report)


def handbook_check_cmd(
    path: Annotated[str, typer.Argument(help="Handbook file, or 'sample'.")],
    category: Annotated[
        str | None, typer.Option(help="Print this category's section as the LLM gets it.")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Check a handbook as `run --llm-handbook` loads it (exit 3 and the reason if it is not
    one) and print its version, categories and, with --category, the section the LLM gets."""
    from consumer.tagging.handbook import Handbook

    hb = Handbook.load(path)
    section = hb.section(category) if category is not None else None
    if category is not None and section is None:
        raise typer.BadParameter(
            f"no category {category!r} (it has: {', '.join(sorted(hb.categories))})",
            param_hint="--category",
        )
    res: dict[str, Any] = {
        "handbook_version": hb.version_id,
        "categories": sorted(c.name for c in hb.categories.values()),
    }
    print_table({k: (", ".join(v) if isinstance(v, list) else v) for k, v in res.items()}, 18)
    if section is not None:
        typer.echo(section)
        res["section"] = section
    if json:
        emit_json(res)
