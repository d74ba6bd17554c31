"""The tags embedded for images: by the text tower of an image/text encoder pair, in a
caption-like prompt, added to a tag system as its second embedding space."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from models_onnx.registry import default_model_dir
from tagsys import DEFAULT_IMAGE_TEMPLATE, ImageSpace, TagSystem, check_template


def image_model_folder(name_or_path: str, model_dir: Path | None = None) -> Path:
    """A folder as given, else the exported model of that name under the model folder."""
    p = Path(name_or_path)
    return p if p.is_dir() else (model_dir or default_model_dir()) / name_or_path


def with_image_space(
    ts: TagSystem,
    image_model: str,
    *,
    model_dir: Path | None = None,
    template: str = DEFAULT_IMAGE_TEMPLATE,
) -> TagSystem:
    """`ts` with its tags embedded by `image_model`'s text tower (fusion rule: max, image
    scores uncalibrated: scale 1, shift 0)."""
    from models_onnx.clip import ClipEncoder

    check_template(template)
    enc = ClipEncoder(image_model_folder(image_model, model_dir), device="cpu")
    emb = enc.encode_texts([template.format(name=t.name) for t in ts.tags])
    space = ImageSpace(model=enc.name, embeddings=np.asarray(emb, dtype=np.float32))
    prov = {**ts.provenance, "image_template": template}
    return replace(ts, image=space, provenance=prov)
