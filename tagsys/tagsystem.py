"""The versioned tag-system artifact.

On disk a tag system is a folder with `tagsystem.json` (tags, aliases, categories, gate,
encoder identity, content hash), `embeddings.npy` (one row per tag), `bias.npy` (one score
offset per tag, when adapted to a corpus) and `head.npz` (a distilled linear head). The content hash
covers all of them, so a tag event's `tag_system_version` pins exactly what decided it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tagsys.distill import Head
from tagsys.errors import EncoderMismatchError, TagSystemError
from tagsys.gate import GateConfig
from tagsys.lexicon import Lexicon
from tagsys.shortlist import shortlist, top_k
from tagsys.textfeat import TextFeatures

FORMAT_VERSION = 1
META_FILE = "tagsystem.json"
EMB_FILE = "embeddings.npy"
BIAS_FILE = "bias.npy"
HEAD_FILE = "head.npz"
IMAGE_EMB_FILE = "image_embeddings.npy"
FUSION_RULES = ("max", "weighted")
MAX_PROMPT_ALIASES = 8
# weight of a described tag's own prompt vector against the mean of its descriptions'
DESCRIPTION_NAME_WEIGHT = 0.5

EncodeFn = Callable[[list[str]], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class Tag:
    id: str
    name: str
    aliases: tuple[str, ...] = ()
    category: str | None = None
    description: str | None = None
    # Sampled LLM descriptions (RAM++ style): each is embedded on its own and their mean is
    # mixed into the tag's vector (`embed_tags`); one sample alone is too noisy to use.
    descriptions: tuple[str, ...] = ()
    # Sampled example posts (written by an LLM from the name alone): embedded as content is,
    # on the encoder's query side, so their mean lands where the tag's items are
    # (docs/QUALITY.md: KuaiRec level 1 recall@10 0.649 -> 0.714).
    examples: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "name": self.name, "aliases": list(self.aliases)}
        if self.category is not None:
            d["category"] = self.category
        if self.description is not None:
            d["description"] = self.description
        if self.descriptions:
            d["descriptions"] = list(self.descriptions)
        if self.examples:
            d["examples"] = list(self.examples)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tag:
        try:
            name = str(d["name"])
        except KeyError as e:
            raise TagSystemError(f"tag without a name: {d!r}") from e
        return cls(
            id=str(d.get("id", name)),
            name=name,
            aliases=tuple(str(a) for a in d.get("aliases", ())),
            category=d.get("category"),
            description=d.get("description"),
            descriptions=tuple(str(x) for x in d.get("descriptions", ())),
            examples=tuple(str(x) for x in d.get("examples", ())),
        )


DEFAULT_TEMPLATE = "{name}"
# CLIP was trained on captions: "a photo of a dog." matches images better than "dog"
# (Radford et al. 2021, on prompt engineering); recorded in the tag system's provenance
DEFAULT_IMAGE_TEMPLATE = "a photo of {name}."


def check_template(template: str) -> str:
    """A tag template names the tag once as `{name}`, e.g. `{name} (cooking)`."""
    try:
        probe = template.format(name="\x00")
    except (KeyError, IndexError, ValueError) as e:
        raise TagSystemError(
            f"tag template {template!r} is not valid: use {{name}} for the tag's name "
            f"and nothing else in braces ({e!r})"
        ) from e
    if probe.count("\x00") != 1:
        raise TagSystemError(f"tag template {template!r} must contain {{name}} exactly once")
    return template


def tag_prompt(tag: Tag, template: str = DEFAULT_TEMPLATE) -> str:
    """Text embedded for a tag: its name (in `template`, which may put it in a domain, e.g.
    `{name} (cooking)`: "equipment" alone is vague), then aliases and description."""
    parts = [template.format(name=tag.name)]
    if tag.aliases:
        # TagGPT tags carry up to ~200 aliases; the first few say it, the rest only pad
        parts.append(", ".join(tag.aliases[:MAX_PROMPT_ALIASES]))
    if tag.description:
        parts.append(tag.description)
    return ": ".join(parts[:2]) + (". " + parts[2] if len(parts) > 2 else "")


def embed_tags(
    tags: Sequence[Tag],
    encode: EncodeFn,
    name_weight: float = DESCRIPTION_NAME_WEIGHT,
    template: str = DEFAULT_TEMPLATE,
    encode_content: EncodeFn | None = None,
) -> npt.NDArray[np.float32]:
    """One unit vector per tag: its prompt's, mixed for described tags with the mean of their
    samples' vectors (RAM++): `name_weight` × prompt + (1 − it) × mean. A sample is a
    `name: description` (tag side, `encode`) or an example post (content side,
    `encode_content`: the encoder's query side, as the service embeds items). Keeping the
    name in the mix matters: small LLMs drift off topic in some samples (docs/QUALITY.md)."""
    if not 0.0 <= name_weight <= 1.0:
        raise TagSystemError(f"name_weight must be in [0, 1], got {name_weight}")
    check_template(template)
    base = np.asarray(encode([tag_prompt(t, template) for t in tags]), dtype=np.float32)
    texts = [f"{template.format(name=t.name)}: {d}" for t in tags for d in t.descriptions]
    posts = [x for t in tags for x in t.examples]
    if not texts and not posts:
        return base
    desc = _normalise(np.asarray(encode(texts), dtype=np.float32)) if texts else base[:0]
    exam = base[:0]
    if posts:
        if encode_content is None:
            raise TagSystemError(
                "these tags carry example posts, which are embedded as content is: "
                "embed_tags needs encode_content"
            )
        exam = _normalise(np.asarray(encode_content(posts), dtype=np.float32))
    out = _normalise(base.copy())
    row = ex_row = 0
    for i, t in enumerate(tags):
        n, m = len(t.descriptions), len(t.examples)
        if n or m:
            samples = np.concatenate([desc[row : row + n], exam[ex_row : ex_row + m]])
            mean = _normalise(samples.mean(axis=0, keepdims=True))[0]
            out[i] = name_weight * out[i] + (1.0 - name_weight) * mean
            row += n
            ex_row += m
    return _normalise(out)


def _normalise(m: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    if np.allclose(norms, 1.0, rtol=0, atol=1e-5):
        return m  # already unit rows: re-dividing would flip low bits and the content hash
    norms[norms == 0] = 1.0
    out: npt.NDArray[np.float32] = (m / norms).astype(np.float32)
    return out


@dataclass(frozen=True)
class ImageSpace:
    """The tags embedded a second time, by the text tower of an image/text encoder pair
    (CLIP-style), so an image can be scored against the same tags (Tag2Text / RAM's path).

    An image score is calibrated onto the text scores' scale (`scale` × cosine + `shift`:
    CLIP cosines sit near 0.2–0.35 where the text encoder's spread wider), then fused per
    tag by `rule`: `max` (the default) takes the larger of the two, `weighted` mixes them
    as (1 − `weight`) × text + `weight` × image. All of it is part of the content hash."""

    model: str  # the image encoder's name (its manifest's), checked at load like `encoder`
    embeddings: npt.NDArray[np.float32]
    rule: str = "max"
    scale: float = 1.0
    shift: float = 0.0
    weight: float = 0.5

    def __post_init__(self) -> None:
        if self.rule not in FUSION_RULES:
            raise TagSystemError(f"fusion rule {self.rule!r}: use one of {FUSION_RULES}")
        if not 0.0 <= self.weight <= 1.0:
            raise TagSystemError(f"fusion weight must be in [0, 1], got {self.weight}")
        emb = _normalise(np.ascontiguousarray(self.embeddings, dtype=np.float32))
        object.__setattr__(self, "embeddings", emb)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def meta(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dim": self.dim,
            "rule": self.rule,
            "scale": self.scale,
            "shift": self.shift,
            "weight": self.weight,
        }

    def scores(self, image_emb: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Calibrated image scores, (items, tags)."""
        out: npt.NDArray[np.float32] = (
            image_emb @ self.embeddings.T * np.float32(self.scale) + np.float32(self.shift)
        ).astype(np.float32)
        return out

    def fuse(
        self, text: npt.NDArray[np.float32], image: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """(fused scores, where the image's score decided): per tag, by this space's rule."""
        won = image > text
        if self.rule == "max":
            return np.maximum(text, image), won
        w = np.float32(self.weight)
        fused: npt.NDArray[np.float32] = ((1 - w) * text + w * image).astype(np.float32)
        return fused, won


@dataclass
class TagSystem:
    name: str
    version: str
    encoder: str  # encoder name, e.g. "all-MiniLM-L6-v2"; variants (int8/fp16) are compatible
    tags: list[Tag]
    embeddings: npt.NDArray[np.float32]
    gate: GateConfig = field(default_factory=GateConfig)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    # per-tag score offset (hubness correction, see tagsys/adapt.py); None = no offset
    bias: npt.NDArray[np.float32] | None = None
    # free-form provenance: how the tags, embeddings and gate were made
    provenance: dict[str, Any] = field(default_factory=dict)
    # a distilled linear head (tagsys/distill.py); when set it replaces the cosine
    head: Head | None = None
    # the tags in an image/text encoder's space (import-tags --image-model); None = text only
    image: ImageSpace | None = None

    def __post_init__(self) -> None:
        if len(self.tags) == 0:
            raise TagSystemError("a tag system needs at least one tag")
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.tags):
            raise TagSystemError(
                f"embeddings shape {self.embeddings.shape} does not match {len(self.tags)} tags"
            )
        ids = [t.id for t in self.tags]
        if len(set(ids)) != len(ids):
            raise TagSystemError("tag ids must be unique")
        # Normalised once at load: scoring is then a plain matrix product.
        self.embeddings = _normalise(np.ascontiguousarray(self.embeddings, dtype=np.float32))
        if self.bias is not None:
            self.bias = np.ascontiguousarray(self.bias, dtype=np.float32).reshape(-1)
            if self.bias.shape[0] != len(self.tags):
                raise TagSystemError(f"bias has {self.bias.shape[0]} values for {len(ids)} tags")
        if self.image is not None and self.image.embeddings.shape[0] != len(self.tags):
            raise TagSystemError(
                f"image embeddings have {self.image.embeddings.shape[0]} rows for "
                f"{len(self.tags)} tags"
            )
        if self.head is not None and self.head.weights.shape != self.embeddings.shape:
            raise TagSystemError(
                f"head weights {self.head.weights.shape} do not match {self.embeddings.shape}"
            )
        self._lexicon: Lexicon | None = None
        self.tag_ids = ids
        self.names = [t.name for t in self.tags]
        self._by_name = {t.name: i for i, t in enumerate(self.tags)}
        self.content_hash = self._hash()

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def version_id(self) -> str:
        """What every tag event carries: name, version and the first 12 hex of the hash."""
        return f"{self.name}@{self.version}#{self.content_hash[:12]}"

    def index_of(self, name: str) -> int | None:
        return self._by_name.get(name)

    @property
    def lexicon(self) -> Lexicon:
        if self._lexicon is None:
            self._lexicon = Lexicon(
                [(t.name, *t.aliases) for t in self.tags], stem=self.gate.lexical_stems
            )
        return self._lexicon

    def mentions(self, texts: Sequence[str]) -> list[set[int]] | None:
        """Tags literally named in each text, or None when the lexical boost is off."""
        if not self.gate.lexical_boost:
            return None
        lex = self.lexicon
        return [lex.match(t) for t in texts]

    def shortlist(
        self, emb: npt.NDArray[np.float32], texts: Sequence[str], k: int | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Top-k tags per item with this version's scoring: the distilled head's probability
        when there is one, else cosine - bias; plus the lexical boost."""
        if self.head is not None:
            return top_k(
                self.head.scores(emb, texts),
                k or self.gate.top_k,
                mentions=self.mentions(texts),
                boost=self.gate.lexical_boost,
            )
        return shortlist(
            emb,
            self.embeddings,
            k or self.gate.top_k,
            bias=self.bias,
            mentions=self.mentions(texts),
            boost=self.gate.lexical_boost,
        )

    def text_scores(
        self, emb: npt.NDArray[np.float32], texts: Sequence[str]
    ) -> npt.NDArray[np.float32]:
        """(items, tags) scores before the lexical boost: the head's, else cosine − bias."""
        if self.head is not None:
            return self.head.scores(emb, texts)
        out: npt.NDArray[np.float32] = (emb @ self.embeddings.T).astype(np.float32)
        if self.bias is not None:
            out -= self.bias[None, :]
        return out

    def shortlist_fused(
        self,
        emb: npt.NDArray[np.float32],
        texts: Sequence[str],
        image_emb: npt.NDArray[np.float32],
        has_image: npt.NDArray[np.bool_],
        k: int | None = None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """`shortlist` with the image's scores fused in for the items that have an image:
        (indices, scores, whether each shortlisted tag's score came from the image)."""
        if self.image is None:
            raise TagSystemError(f"tag system {self.version_id} has no image embeddings")
        text = self.text_scores(emb, texts)
        fused, won = self.image.fuse(text, self.image.scores(image_emb))
        rows = has_image.reshape(-1, 1)
        fused = np.where(rows, fused, text).astype(np.float32)
        won = won & rows
        # the lexical boost counts as text: a tag the text names is the text's
        mentions = self.mentions(texts)
        if mentions is not None:
            for i, hits in enumerate(mentions):
                if hits:
                    won[i, list(hits)] = False
        idx, scores = top_k(
            fused, k or self.gate.top_k, mentions=mentions, boost=self.gate.lexical_boost
        )
        return idx, scores, np.take_along_axis(won, idx, axis=1)

    def check_image_model(self, model: str, dim: int) -> None:
        """Like `check_encoder`, for the image encoder: a tag system embedded by one CLIP
        never scores another's image vectors."""
        if self.image is None:
            raise EncoderMismatchError(
                f"tag system {self.version_id} has no image embeddings: import its tags with "
                f"--image-model {model}, or run without an image model"
            )
        if model != self.image.model:
            raise EncoderMismatchError(
                f"tag system {self.version_id} embedded its tags for images with "
                f"{self.image.model!r}, but the service runs {model!r}; re-import the tags "
                f"with --image-model {model} or run with --image-model {self.image.model}"
            )
        if dim != self.image.dim:
            raise EncoderMismatchError(
                f"image tag embeddings have dimension {self.image.dim}, the image encoder "
                f"gives {dim}"
            )

    @property
    def gate_fitted(self) -> bool:
        """Whether the gate's thresholds were fitted on labels or LLM decisions (`calibrate`,
        `distill`) and reached the precision they were fitted for: only then is its
        confidence measured rather than assumed. A fit that fell short keeps its most precise
        setting (for reports), but its "sure" is below the operator's target, so it is not
        trusted either. Versions written before `reached` was recorded count as reached."""
        cal = self.provenance.get("calibrated")
        return isinstance(cal, dict) and cal.get("reached", True) is not False

    def check_encoder(self, encoder_name: str, dim: int) -> None:
        if encoder_name != self.encoder:
            raise EncoderMismatchError(
                f"tag system {self.version_id} was embedded with encoder {self.encoder!r}, "
                f"but the service runs {encoder_name!r}; rebuild the tag system with that "
                f"encoder or run with --model {self.encoder}"
            )
        if dim != self.dim:
            raise EncoderMismatchError(
                f"tag embeddings have dimension {self.dim}, the encoder gives {dim}"
            )

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "encoder": self.encoder,
            "dim": self.dim,
            "created_at": self.created_at,
            "gate": self.gate.to_dict(),
            "provenance": self.provenance,
            "tags": [t.to_dict() for t in self.tags],
            # only when present: text-only artifacts keep their content hash
            **({"image": self.image.meta()} if self.image is not None else {}),
        }

    def _hash(self) -> str:
        meta = self._meta()
        meta.pop("created_at")
        if not meta["provenance"]:
            meta.pop("provenance")  # artifacts written before provenance existed keep their hash
        h = hashlib.sha256(json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
        h.update(self.embeddings.tobytes())
        if self.bias is not None:
            h.update(b"bias")
            h.update(self.bias.tobytes())
        if self.head is not None:
            h.update(b"head" + self.head.kind.encode())
            h.update(self.head.weights.tobytes())
            h.update(self.head.bias.tobytes())
            if self.head.text_weights is not None and self.head.text is not None:
                h.update(b"text" + self.head.text.to_array().tobytes())
                h.update(self.head.text_weights.tobytes())
        if self.image is not None:
            h.update(b"image" + self.image.embeddings.tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / EMB_FILE, self.embeddings)
        if self.bias is not None:
            np.save(out / BIAS_FILE, self.bias)
        elif (out / BIAS_FILE).exists():
            (out / BIAS_FILE).unlink()
        if self.head is not None:
            text: dict[str, Any] = {}
            if self.head.text_weights is not None and self.head.text is not None:
                text = {
                    "text_weights": self.head.text_weights,
                    "text_features": self.head.text.to_array(),
                }
            np.savez(
                out / HEAD_FILE,
                weights=self.head.weights,
                bias=self.head.bias,
                kind=np.array(self.head.kind),
                **text,
            )
        elif (out / HEAD_FILE).exists():
            (out / HEAD_FILE).unlink()
        if self.image is not None:
            np.save(out / IMAGE_EMB_FILE, self.image.embeddings)
        elif (out / IMAGE_EMB_FILE).exists():
            (out / IMAGE_EMB_FILE).unlink()
        meta = self._meta() | {"content_hash": self.content_hash}
        (out / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> TagSystem:
        folder = Path(path)
        meta_path, emb_path = folder / META_FILE, folder / EMB_FILE
        if not meta_path.is_file() or not emb_path.is_file():
            raise TagSystemError(f"{folder} is not a tag system (needs {META_FILE}, {EMB_FILE})")
        try:
            meta = json.loads(meta_path.read_text())
            emb = np.load(emb_path, allow_pickle=False)
            bias_path = folder / BIAS_FILE
            bias = np.load(bias_path, allow_pickle=False) if bias_path.is_file() else None
            head = None
            if (folder / HEAD_FILE).is_file():
                with np.load(folder / HEAD_FILE, allow_pickle=False) as z:
                    has_text = "text_weights" in z.files
                    head = Head(
                        z["weights"].astype(np.float32),
                        z["bias"].astype(np.float32),
                        str(z["kind"]),
                        text_weights=z["text_weights"].astype(np.float32) if has_text else None,
                        text=TextFeatures.from_array(z["text_features"]) if has_text else None,
                    )
            image = None
            if "image" in meta:
                im = meta["image"]
                image = ImageSpace(
                    model=str(im["model"]),
                    embeddings=np.load(folder / IMAGE_EMB_FILE, allow_pickle=False),
                    rule=str(im.get("rule", "max")),
                    scale=float(im.get("scale", 1.0)),
                    shift=float(im.get("shift", 0.0)),
                    weight=float(im.get("weight", 0.5)),
                )
        except (OSError, ValueError, KeyError) as e:
            raise TagSystemError(f"cannot read tag system {folder}: {e}") from e
        if meta.get("format") != FORMAT_VERSION:
            raise TagSystemError(f"{folder}: unsupported tag-system format {meta.get('format')}")
        try:
            ts = cls(
                name=meta["name"],
                version=str(meta["version"]),
                encoder=meta["encoder"],
                tags=[Tag.from_dict(t) for t in meta["tags"]],
                embeddings=emb,
                gate=GateConfig.from_dict(meta.get("gate", {})),
                created_at=meta.get("created_at", ""),
                bias=bias,
                provenance=meta.get("provenance") or {},
                head=head,
                image=image,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TagSystemError(f"{folder}: malformed tag system: {e}") from e
        expected = meta.get("content_hash")
        if expected and expected != ts.content_hash:
            raise TagSystemError(
                f"{folder}: content hash mismatch (file says {expected[:12]}, "
                f"contents give {ts.content_hash[:12]}); the artifact was altered"
            )
        return ts


def build_tag_system(
    name: str,
    version: str,
    tags: Sequence[Tag],
    encode: EncodeFn,
    encoder: str,
    gate: GateConfig | None = None,
    template: str = DEFAULT_TEMPLATE,
    encode_content: EncodeFn | None = None,
) -> TagSystem:
    """Embed every tag (`embed_tags`) and wrap the result as a versioned artifact."""
    emb = embed_tags(tags, encode, template=template, encode_content=encode_content)
    return TagSystem(
        name=name,
        version=version,
        encoder=encoder,
        tags=list(tags),
        embeddings=np.asarray(emb, dtype=np.float32),
        gate=gate or GateConfig(),
        provenance=template_provenance(template),
    )


def template_provenance(template: str) -> dict[str, Any]:
    """Recorded only when not the default, so older artifacts keep their hashes."""
    return {} if template == DEFAULT_TEMPLATE else {"tag_template": template}


def load_sample_tags() -> tuple[list[Tag], GateConfig, str]:
    """The small built-in vocabulary of the demo: (tags, gate, version)."""
    raw = importlib.resources.files("tagsys").joinpath("sample", "tags.json").read_text("utf-8")
    data = json.loads(raw)
    return (
        [Tag.from_dict(t) for t in data["tags"]],
        GateConfig.from_dict(data.get("gate", {})),
        str(data["version"]),
    )
