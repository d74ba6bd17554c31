"""`tagstream build-tags`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import SecretStr

from consumer.cli import logs
from consumer.cli.options import (
    ConcurrencyOpt,
    DataOpt,
    DescribeStyle,
    FormatOpt,
    ImageModelOpt,
    ImageTemplateOpt,
    JsonOpt,
    ModelDirOpt,
    OutOpt,
    PromptStyle,
    TagTemplateOpt,
    emit_json,
    env_option,
    err,
    print_table,
    progress_bar,
    samples_option,
)
from tagsys import DEFAULT_IMAGE_TEMPLATE


def build_tags_cmd(
    data: DataOpt,
    fmt: FormatOpt,
    out: OutOpt,
    llm: Annotated[
        str,
        env_option("llm", "local (a bundled model, see --llm-model) or an OpenAI-compatible URL."),
    ] = "local",
    llm_model: Annotated[
        str | None,
        env_option(
            "llm_model",
            "Model at the endpoint (needed with a URL). With --llm local: gemma3-270m "
            "(Gemma 3 270M base, the default: far better proposals, docs/QUALITY.md) or "
            "smollm2 (SmolLM2-135M-Instruct, chat).",
        ),
    ] = None,
    prompt: Annotated[
        PromptStyle,
        typer.Option(
            help=(
                "How proposals are asked: chat (JSON schema, /chat/completions), fewshot "
                "(a base model continues examples, /completions), or auto: fewshot for "
                "the bundled base model, chat otherwise."
            ),
        ),
    ] = PromptStyle.auto,
    work: Annotated[
        Path | None,
        typer.Option(help="Folder for the resumable proposal log (default: <out>.work)."),
    ] = None,
    samples: Annotated[int, typer.Option(min=1, max=10, help="LLM samples per item.")] = 3,
    max_tags: Annotated[int, typer.Option(min=1, max=20, help="Tags asked per sample.")] = 5,
    concurrency: ConcurrencyOpt = 4,
    limit: Annotated[int | None, typer.Option(help="Use the first N items.")] = None,
    level: Annotated[
        int,
        typer.Option(
            min=1,
            max=3,
            help="KuaiRec category level the report's gold check reads (the LLM never sees it).",
        ),
    ] = 1,
    min_items: Annotated[
        int, typer.Option(min=1, help="Keep tags proposed for at least this many items.")
    ] = 2,
    merge_threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help=(
                "Cosine above which tags merge (aliases); default: the encoder's — 0.9 for "
                "MiniLM, 0.97 for e5, whose cosines run high."
            ),
        ),
    ] = None,
    hierarchy: Annotated[
        Path | None,
        typer.Option(help="Category hierarchy CSV: each tag gets its nearest category."),
    ] = None,
    llm_categories: Annotated[
        bool,
        typer.Option(
            help="Ask the LLM for each tag's category (one of --hierarchy's nodes when given)."
        ),
    ] = False,
    describe: Annotated[
        bool,
        typer.Option(
            help=(
                "Describe every tag: one line from a chat model, or --describe-samples "
                "sampled example posts or descriptions from a base model (fewshot), as "
                "describe-tags does."
            )
        ),
    ] = False,
    describe_samples: Annotated[
        int, samples_option("Texts sampled per tag with --prompt fewshot.")
    ] = 5,
    describe_style: Annotated[
        DescribeStyle,
        typer.Option(
            help="With --describe and --prompt fewshot: example posts (embedded as content) "
            "or descriptions, as describe-tags --style."
        ),
    ] = DescribeStyle.examples,
    llm_handbook: Annotated[
        str | None,
        typer.Option(
            help=(
                "Interest handbook guiding the proposals (chat prompts only), as `run "
                "--llm-handbook`: each item gets the section of its `content_type`, else of "
                "--handbook-category."
            )
        ),
    ] = None,
    handbook_category: Annotated[
        str | None,
        typer.Option(help="The handbook section for items without a content_type of its own."),
    ] = None,
    image_model: ImageModelOpt = None,
    image_template: ImageTemplateOpt = DEFAULT_IMAGE_TEMPLATE,
    name: Annotated[str, typer.Option(help="Tag-system name.")] = "built",
    version: Annotated[str, typer.Option(help="Tag-system version.")] = "1",
    model: Annotated[
        str | None,
        env_option(
            "model",
            "Encoder for merging and the tag vectors (default: multilingual-e5-small for "
            "kuairec, all-MiniLM-L6-v2 otherwise).",
        ),
    ] = None,
    model_dir: ModelDirOpt = None,
    tag_template: TagTemplateOpt = None,
    json: JsonOpt = False,
) -> None:
    """Build a tag system from a corpus: LLM proposals (several samples per item, resumable),
    normalise, count, frequency floor, merge synonyms, categories, descriptions, embed."""
    import contextlib
    import os

    from consumer.tagging.config import Settings
    from consumer.tagging.handbook import Handbook
    from consumer.tagging.llm_server import BASE_MODELS, GEMMA, MODELS, LocalLLM
    from consumer.tagging.metrics import Metrics
    from consumer.tagging.parts import make_tagger
    from consumer.tools.build_tags import GuidedProposer, Proposer, build_tags
    from consumer.tools.describe import Describer
    from consumer.tools.evaluate import DEFAULT_MODEL, template_for
    from consumer.tools.propose import FewShotProposer
    from models_onnx import OnnxEncoder

    logs.configure("warning")
    template = template_for(None, tag_template)  # checked before the LLM's hours
    local_llm = llm.strip().lower() == "local"
    if llm_model is None:
        if not local_llm:
            raise typer.BadParameter(
                "name the endpoint's model (--llm-model or TAGSTREAM_LLM_MODEL)",
                param_hint="--llm-model",
            )
        llm_model = GEMMA
    if local_llm and llm_model not in MODELS:
        raise typer.BadParameter(
            f"{llm_model!r} is no bundled model; with --llm local use one of {', '.join(MODELS)}",
            param_hint="--llm-model",
        )
    style = prompt
    if style is PromptStyle.auto:
        style = PromptStyle.fewshot if llm_model in BASE_MODELS else PromptStyle.chat
    if style is PromptStyle.fewshot and llm_categories:
        raise typer.BadParameter(
            "--llm-categories needs a chat model (a base model cannot answer with one of a "
            "list); use --hierarchy alone, or --prompt chat with an instruction-tuned model",
            param_hint="--llm-categories",
        )
    if handbook_category is not None and llm_handbook is None:
        raise typer.BadParameter("needs --llm-handbook", param_hint="--handbook-category")
    handbook = None
    if llm_handbook is not None:
        if style is PromptStyle.fewshot:
            raise typer.BadParameter(
                "a handbook guides chat prompts only (a base model continues examples and "
                "has no instructions to guide); use --prompt chat with an instruction-tuned "
                "model",
                param_hint="--llm-handbook",
            )
        handbook = Handbook.load(llm_handbook)
        if handbook_category is not None and handbook.section(handbook_category) is None:
            raise typer.BadParameter(
                f"no category {handbook_category!r} in {handbook.version_id} (it has: "
                f"{', '.join(sorted(handbook.categories))})",
                param_hint="--handbook-category",
            )
    if image_model is not None:  # a missing image model fails now, not after the LLM's hours
        from models_onnx.clip import clip_folder
        from models_onnx.manifest import Manifest

        Manifest.load(clip_folder(image_model, model_dir))
    settings = Settings()
    metrics = Metrics()
    encoder = OnnxEncoder(model or DEFAULT_MODEL[fmt.value], model_dir=model_dir)
    with contextlib.ExitStack() as stack:
        if local_llm:
            local = stack.enter_context(
                LocalLLM(model=llm_model, parallel=concurrency, threads=os.cpu_count() or 2)
            )
            url, key = local.base_url, SecretStr("")
        else:
            url, key = llm, settings.llm_api_key
        tagger = make_tagger(settings, url, llm_model, key, metrics)
        proposer: Proposer = tagger
        if handbook is not None:
            proposer = GuidedProposer(tagger, handbook, handbook_category)
        describer = None
        if style is PromptStyle.fewshot:
            proposer = FewShotProposer(url, llm_model, key)
            if describe:
                describer = Describer(
                    url,
                    llm_model,
                    key,
                    samples=describe_samples,
                    concurrency=concurrency,
                    style=describe_style.value,
                    template=template,  # the prompt names the tag as its vector does
                )
        with progress_bar("building") as bar:
            task = bar.add_task("build", total=None)

            def step(label: str, done: int, total: int) -> None:
                bar.update(task, description=label, completed=done, total=total)

            ts, rep = build_tags(
                data,
                fmt.value,
                out,
                tagger,
                encoder,
                work=work or out.with_name(out.name + ".work"),
                samples=samples,
                max_tags=max_tags,
                concurrency=concurrency,
                limit=limit,
                min_items=min_items,
                merge_threshold=merge_threshold,
                hierarchy=hierarchy,
                llm_categories=llm_categories,
                describe=describe,
                name=name,
                version=version,
                tag_template=template,
                progress=step,
                proposer=proposer,
                describer=describer,
                level=level,
            )
    if image_model is not None:  # the built tags embedded for images too, same folder
        from consumer.tools.image_tags import with_image_space

        ts = with_image_space(ts, image_model, model_dir=model_dir, template=image_template)
        ts.save(out)
    res = {"tag_system": ts.version_id, "out": str(out), **rep.to_dict()}
    print_table(res, 14)
    if rep.unreadable:
        err.print(
            f"[yellow]warning:[/] {encoder.name} cannot read {rep.unreadable} of the "
            f"{rep.kept} kept tags (mostly unknown tokens: their vectors say nothing, so they "
            "were not merged); use an encoder for their language, e.g. --model "
            "multilingual-e5-small"
        )
    if rep.failed:
        err.print(
            f"[yellow]warning:[/] {len(rep.failed)} items got no answer (e.g. "
            f"{next(iter(rep.failed.items()))}); rerun with the same --work to ask again"
        )
    if json:
        emit_json(res)
