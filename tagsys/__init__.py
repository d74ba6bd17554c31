"""The tag system: vocabulary, tag embeddings, thresholds, shortlist and decision rules.

Pure Python + numpy (and the pure-Python Snowball stemmer): nothing here knows about Kafka,
ONNX or LLMs, so the same rules run in the service, in `tagstream eval` and in tests.
"""

from tagsys.errors import EncoderMismatchError, TagstreamError, TagSystemError
from tagsys.gate import Decision, GateConfig, GateResult, decide
from tagsys.shortlist import shortlist
from tagsys.tagsystem import (
    DEFAULT_IMAGE_TEMPLATE,
    DEFAULT_TEMPLATE,
    ImageSpace,
    Tag,
    TagSystem,
    build_tag_system,
    check_template,
    embed_tags,
    load_sample_tags,
    tag_prompt,
    template_provenance,
)

__all__ = [
    "DEFAULT_IMAGE_TEMPLATE",
    "DEFAULT_TEMPLATE",
    "Decision",
    "EncoderMismatchError",
    "GateConfig",
    "GateResult",
    "ImageSpace",
    "Tag",
    "TagSystem",
    "TagSystemError",
    "TagstreamError",
    "build_tag_system",
    "check_template",
    "decide",
    "embed_tags",
    "load_sample_tags",
    "shortlist",
    "tag_prompt",
    "template_provenance",
]
