"""The tags embedded for images: by the text tower of an image/text encoder pair, in a
caption-like prompt, added to a tag system as its second embedding space."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from tagsys import DEFAULT_IMAGE_TEMPLATE, ImageSpace, TagSystem, check_template


def with_image_space(
    ts: TagSystem,
    image_model: str,
    *,
    model_dir: Path | None = None,
    template: str = DEFAULT_IMAGE_TEMPLATE,
) -> TagSystem:
    """`ts` with its tags embedded by `image_model`'s text tower (fusion rule: max, image
    scores uncalibrated: scale 1, shift 0)."""
    from models_onnx.clip import ClipEncoder, clip_folder

    check_template(template)
    enc = ClipEncoder(clip_folder(image_model, model_dir), device="cpu")
    emb = enc.encode_texts([template.format(name=t.name) for t in ts.tags])
    space = ImageSpace(model=enc.name, embeddings=np.asarray(emb, dtype=np.float32))
    prov = {**ts.provenance, "image_template": template}
    return replace(ts, image=space, provenance=prov)
