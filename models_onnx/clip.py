"""CLIP-family image/text encoder pairs (CLIP, SigLIP): export a local Hugging Face checkpoint
to two ONNX towers, and run them with onnxruntime, `tokenizers` and Pillow.

`ClipEncoder` needs neither torch nor transformers (the service image has neither);
`export_clip` and `write_tiny_clip` need the `[export]` extra and import it lazily. Pillow is
imported only when images are preprocessed.

The towers return the model's projected embeddings, not normalised: normalisation happens
here in numpy, so the three variants' graphs stay plain exports of the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from models_onnx.encoder import CLIP_POOLING, Device, make_session, pick_variant, wants_cuda
from models_onnx.manifest import Manifest, ModelNotFoundError, sha256_file
from models_onnx.registry import model_path
from tagsys.errors import TagstreamError

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
KIND = "clip"
SUPPORTED = ("clip", "siglip")  # config.json model_type
TOWERS = ("visual", "textual")
VARIANTS = ("fp32", "int8", "fp16")
PREPROCESS = "preprocess.json"
TOKENIZER = "tokenizer.json"
IMAGE_OUT, TEXT_OUT = "image_embeds", "text_embeds"
# int8: the matrix products only. The patch embedding (a Conv on raw pixels) stays fp32:
# onnxruntime's ConvInteger has no fast CPU kernel, and it is a small part of the work.
INT8_OPS = ["MatMul", "Gemm"]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Pillow's resampling filters by the number an HF preprocessor_config.json stores
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# the fp32 graph vs the PyTorch checkpoint, and a quantised variant vs fp32 (min cosine)
MIN_COSINE_TORCH = 0.999
MAX_DIFF_TORCH = 1e-3  # max abs difference of the normalised vectors
MIN_COSINE_VARIANT = 0.98


@dataclass
class ClipManifest(Manifest):
    """The text encoders' manifest with two files per variant (`files[variant]` holds
    `visual`, `visual_sha256`, `textual`, `textual_sha256`), the preprocessing file pinned
    too, and `kind` "clip" so neither kind of folder is loaded as the other."""

    kind: str = ""
    preprocess: dict[str, str] = field(default_factory=dict)

    def towers(self, folder: Path, variant: str) -> dict[str, Path]:
        """Both towers' paths of `variant`, each checked against its sha256."""
        if variant not in self.files:
            raise ModelNotFoundError(
                f"encoder {self.name} has no {variant!r} variant (has {sorted(self.files)})"
            )
        entry = self.files[variant]
        return {
            t: self._pinned(folder, {"path": entry[t], "sha256": entry[f"{t}_sha256"]})
            for t in TOWERS
        }

    def verify(self, folder: Path, variant: str) -> Path:
        """Checks both towers (and the tokenizer and preprocessing); the visual one's path."""
        self._pinned(folder, self.tokenizer)
        self._pinned(folder, self.preprocess)
        return self.towers(folder, variant)["visual"]

    def _pinned(self, folder: Path, entry: dict[str, str]) -> Path:
        # the text manifest's check (its messages, its errors) on a one-file view
        return Manifest.verify(replace(self, files={"file": entry}), folder, "file")


def load_clip_manifest(folder: Path) -> ClipManifest:
    """The manifest of a CLIP export; a text encoder's folder is refused."""
    m = ClipManifest.load(folder)
    if not isinstance(m, ClipManifest) or m.kind != KIND:
        raise TagstreamError(f"{folder} holds no CLIP export (a text encoder? use OnnxEncoder)")
    return m


@dataclass(frozen=True)
class Preprocess:
    """What the checkpoint's image processor does, as preprocess.json states it: resize
    (the shortest side to `size`, or, `resize` "square", both sides), centre crop to `crop`,
    scale to [0, 1], then (x - mean) / std per channel."""

    size: int
    crop: int
    mean: list[float]
    std: list[float]
    resample: str = "bicubic"
    resize: str = "shortest_edge"

    @classmethod
    def load(cls, path: Path) -> Preprocess:
        d = json.loads(path.read_text())
        return cls(
            size=int(d["size"]),
            crop=int(d["crop"]),
            mean=[float(x) for x in d["mean"]],
            std=[float(x) for x in d["std"]],
            resample=str(d.get("resample", "bicubic")),
            resize=str(d.get("resize", "shortest_edge")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "crop": self.crop,
            "mean": self.mean,
            "std": self.std,
            "resample": self.resample,
            "resize": self.resize,
        }

    def __call__(self, images: list[Image]) -> F32:
        """(n, 3, crop, crop) float32. Pillow resizes (the filter the checkpoint was trained
        with); the crop and the arithmetic are numpy, the same on every machine."""
        from PIL import Image as PILImage

        resample = PILImage.Resampling[self.resample.upper()]
        c = self.crop
        out = np.empty((len(images), 3, c, c), dtype=np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        for i, image in enumerate(images):
            im = image.convert("RGB")
            w, h = im.size
            if self.resize == "square":
                size = (self.size, self.size)
            elif w <= h:  # as transformers rounds: the long side truncated
                size = (self.size, int(self.size * h / w))
            else:
                size = (int(self.size * w / h), self.size)
            if size != (w, h):
                im = im.resize(size, resample=resample)
            a = np.asarray(im, dtype=np.float32)
            top, left = (a.shape[0] - c) // 2, (a.shape[1] - c) // 2
            a = a[top : top + c, left : left + c] / np.float32(255.0)
            out[i] = ((a - mean) / std).transpose(2, 0, 1)
        return out


def _normalise(v: F32) -> F32:
    norms = np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
    return np.ascontiguousarray(v / norms, dtype=np.float32)


def clip_folder(name_or_path: str, model_dir: str | Path | None = None) -> Path:
    """An exported pair: a folder as given, else the one `export-onnx --clip --name` wrote
    under the model folder."""
    p = Path(name_or_path)
    return p if p.is_dir() else model_path(name_or_path, model_dir)


class ClipEncoder:
    """A loaded image/text pair: images and texts into one normalised embedding space.
    Thread-compatible: one caller at a time per instance."""

    def __init__(
        self,
        folder: str | Path,
        *,
        device: Device | str = "auto",
        threads: int | None = None,
        variant: str | None = None,
    ) -> None:
        """Verifies every file against the manifest's sha256, then picks the variant as
        OnnxEncoder does (fp16 on CUDA, int8 on CPU, else fp32)."""
        if device not in ("auto", "cpu", "cuda"):
            raise TagstreamError(f"device must be auto, cpu or cuda, not {device!r}")
        self.folder = Path(folder)
        self.manifest = load_clip_manifest(self.folder)
        self.name = self.manifest.name
        self.dim = self.manifest.dim
        use_cuda = wants_cuda(device)
        self.variant = variant or pick_variant(self.manifest, use_cuda)
        self.device = "cuda" if use_cuda else "cpu"
        paths = self.manifest.towers(self.folder, self.variant)
        tok_path = self.manifest._pinned(self.folder, self.manifest.tokenizer)
        self.prep = Preprocess.load(self.manifest._pinned(self.folder, self.manifest.preprocess))
        self.visual = make_session(paths["visual"], use_cuda=use_cuda, threads=threads)
        self.textual = make_session(paths["textual"], use_cuda=use_cuda, threads=threads)
        self._text_inputs = {i.name for i in self.textual.get_inputs()}
        # padding (to the longest, or SigLIP's fixed length) and truncation are in the file
        self.tokenizer = Tokenizer.from_file(str(tok_path))

    @property
    def id(self) -> str:
        """Name and the variant that ran, as tag events record an encoder."""
        return f"{self.name}/{self.variant}"

    def preprocess(self, images: list[Image]) -> F32:
        """(n, 3, crop, crop) float32, as the checkpoint's image processor makes them."""
        return self.prep(images)

    def encode_pixels(self, pixels: F32) -> F32:
        """Preprocessed pixels -> (n, dim) L2-normalised image embeddings."""
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.visual.run([IMAGE_OUT], {"pixel_values": pixels})[0]
        return _normalise(np.asarray(out, dtype=np.float32))

    def encode_images(self, images: list[Image], batch_size: int = 32) -> F32:
        """(n, dim) float32, L2-normalised; batches of `batch_size` images."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for s in range(0, len(images), batch_size):
            chunk = images[s : s + batch_size]
            out[s : s + len(chunk)] = self.encode_pixels(self.preprocess(chunk))
        return out

    def encode_texts(self, texts: list[str], batch_size: int = 64) -> F32:
        """(n, dim) float32, L2-normalised; truncated to the manifest's max length."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), batch_size):
            chunk = texts[s : s + batch_size]
            feeds = _text_feeds(self.tokenizer, chunk, self._text_inputs)
            v = self.textual.run([TEXT_OUT], feeds)[0]
            out[s : s + len(chunk)] = _normalise(np.asarray(v, dtype=np.float32))
        return out


def _text_feeds(
    tok: Tokenizer, texts: list[str], inputs: set[str]
) -> dict[str, npt.NDArray[np.int64]]:
    encs = tok.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
    }
    return {k: v for k, v in feeds.items() if k in inputs}


# --------------------------------------------------------------------------- export

Say = Callable[[str], None]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise TagstreamError(f"{path} is missing: not a Hugging Face checkpoint folder") from e
    except ValueError as e:
        raise TagstreamError(f"{path} is not valid JSON: {e}") from e
    return data


def _model_type(src: Path) -> str:
    kind = str(_read_json(src / "config.json").get("model_type", ""))
    if kind not in SUPPORTED:
        raise TagstreamError(
            f"{src}: model_type {kind!r} is no CLIP-family checkpoint; supported: "
            f"{', '.join(SUPPORTED)}"
        )
    return kind


def _preprocess_from(src: Path) -> Preprocess:
    """preprocess.json's values from the checkpoint's preprocessor_config.json (CLIP's
    shortest-edge resize and centre crop, or SigLIP's square resize)."""
    cfg = _read_json(src / "preprocessor_config.json")
    size = cfg.get("size", 224)
    if isinstance(size, dict) and "shortest_edge" in size:
        edge, resize = int(size["shortest_edge"]), "shortest_edge"
    elif isinstance(size, dict) and size.get("height") == size.get("width"):
        edge, resize = int(size["height"]), "square"
    elif isinstance(size, int):
        edge, resize = size, "shortest_edge"
    else:
        raise TagstreamError(f"{src}: unsupported preprocessor size {size!r}")
    crop = cfg.get("crop_size", edge) if cfg.get("do_center_crop", True) else edge
    if isinstance(crop, dict):
        if crop.get("height") != crop.get("width"):
            raise TagstreamError(f"{src}: a non-square crop {crop!r} is not supported")
        crop = crop["height"]
    if int(crop) > edge:
        raise TagstreamError(f"{src}: crop {crop} is larger than the resized side {edge}")
    rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 0.0
    if abs(rescale - 1 / 255) > 1e-9:
        raise TagstreamError(f"{src}: rescale factor {rescale} (only 1/255 is supported)")
    normalize = cfg.get("do_normalize", True)
    resample = RESAMPLE.get(int(cfg.get("resample", 3)))
    if resample is None:
        raise TagstreamError(f"{src}: unknown resample filter {cfg.get('resample')!r}")
    return Preprocess(
        size=edge,
        crop=int(crop),
        mean=[float(x) for x in cfg.get("image_mean", CLIP_MEAN)] if normalize else [0.0] * 3,
        std=[float(x) for x in cfg.get("image_std", CLIP_STD)] if normalize else [1.0] * 3,
        resample=resample,
        resize=resize,
    )


def _special(src: Path, key: str) -> str | None:
    """A special token (pad, eos) as the checkpoint's tokenizer files name it."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = src / name
        if path.is_file():
            value = _read_json(path).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def _tokenizer(src: Path, model_type: str, max_length: int) -> Tokenizer:
    """The checkpoint's fast tokenizer (tokenizer.json, or one transformers builds), with
    truncation to `max_length` and padding written into it: to the longest text for CLIP,
    to `max_length` for SigLIP (trained on fixed-length, unmasked text)."""
    path = src / TOKENIZER
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
                str(src), local_files_only=True
            )
        except Exception as e:  # no tokenizer, or a slow one whose library is missing
            raise TagstreamError(
                f"{src}: no {TOKENIZER} and transformers cannot load one: {e}"
            ) from e
        if not getattr(hf, "is_fast", False):
            raise TagstreamError(
                f"{src}: no {TOKENIZER}, and {type(hf).__name__} has no fast version to "
                "write one; export needs a checkpoint folder with a tokenizer.json"
            )
        tok = hf.backend_tokenizer
    pad = _special(src, "pad_token") or _special(src, "eos_token")
    pad_id = tok.token_to_id(pad) if pad else None
    if pad_id is None:
        raise TagstreamError(f"{src}: cannot tell the tokenizer's padding token")
    tok.enable_truncation(max_length)
    fixed = max_length if model_type == "siglip" else None
    tok.enable_padding(pad_id=pad_id, pad_token=str(pad), length=fixed)
    return tok


def _max_length(src: Path, config: Any) -> int:
    """The model's text positions, or the tokenizer's limit when that is shorter."""
    n = int(config.text_config.max_position_embeddings)
    path = src / "tokenizer_config.json"
    if path.is_file():
        limit = _read_json(path).get("model_max_length")
        if isinstance(limit, int) and 0 < limit < n:
            n = limit
    return n


def _export_towers(
    model: Any, model_type: str, tmp: Path, prep: Preprocess, tok: Tokenizer
) -> None:
    """visual.onnx and textual.onnx: `get_image_features` / `get_text_features` traced
    with a dynamic batch (and, for text, sequence) axis."""
    import warnings

    import torch

    from models_onnx.export import OPSET

    def features(out: Any) -> Any:
        # a tensor in transformers 4.x; a model output with the projection in later ones
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    class Visual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> Any:
            return features(self.model.get_image_features(pixel_values=pixel_values))

    class Textual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            return features(
                self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            )

    class TextualUnmasked(torch.nn.Module):
        # SigLIP's text tower was trained without an attention mask (pads are attended)
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> Any:
            return features(self.model.get_text_features(input_ids=input_ids))

    pixels = torch.zeros(2, 3, prep.crop, prep.crop)
    feeds = _text_feeds(tok, ["a photo of a cat", "a dog"], {"input_ids", "attention_mask"})
    ids = torch.from_numpy(feeds["input_ids"])
    mask = torch.from_numpy(feeds["attention_mask"])
    text_axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        torch.onnx.export(
            Visual().eval(),
            (pixels,),
            str(tmp / "visual.onnx"),
            input_names=["pixel_values"],
            output_names=[IMAGE_OUT],
            dynamic_axes={"pixel_values": {0: "batch"}, IMAGE_OUT: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        if model_type == "siglip":
            text_args: tuple[torch.Tensor, ...] = (ids,)
            textual: torch.nn.Module = TextualUnmasked()
            names = ["input_ids"]
        else:
            text_args, textual, names = (ids, mask), Textual(), ["input_ids", "attention_mask"]
        torch.onnx.export(
            textual.eval(),
            text_args,
            str(tmp / "textual.onnx"),
            input_names=names,
            output_names=[TEXT_OUT],
            dynamic_axes={**{n: text_axes for n in names}, TEXT_OUT: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


CHECK_TEXTS = [
    "a photo of a cat",
    "How do I keep a pretzel bun crust soft?",
    "Last-minute goal wins the derby.",
    "a diagram",
    "今天做了红烧肉",
]


def _check(model: Any, tmp: Path, m: ClipManifest, say: Say) -> None:
    """The fp32 towers must reproduce the PyTorch checkpoint (cosine >= 0.999, normalised
    max abs difference <= 1e-3) on random pixels and on a few padded texts, in batches of
    another size than the export traced; each other variant must stay near fp32."""
    import torch

    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 3, *(2 * [Preprocess.load(tmp / PREPROCESS).crop])))
    pixels = pixels.astype(np.float32)
    tok = Tokenizer.from_file(str(tmp / TOKENIZER))
    masked = m.exported_with["model_type"] != "siglip"  # SigLIP's tower takes ids alone
    inputs = {"input_ids", "attention_mask"} if masked else {"input_ids"}
    feeds = _text_feeds(tok, CHECK_TEXTS, inputs)
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=torch.from_numpy(pixels))
        ref_txt = model.get_text_features(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    refs = {"visual": _as_numpy(ref_img), "textual": _as_numpy(ref_txt)}
    got: dict[str, dict[str, F32]] = {}
    for variant in m.files:
        paths = m.towers(tmp, variant)
        vis = make_session(paths["visual"], use_cuda=False, threads=None)
        txt = make_session(paths["textual"], use_cuda=False, threads=None)
        got[variant] = {
            "visual": _normalise(np.asarray(vis.run([IMAGE_OUT], {"pixel_values": pixels})[0])),
            "textual": _normalise(np.asarray(txt.run([TEXT_OUT], feeds)[0])),
        }
    for tower, ref in refs.items():
        ours = got["fp32"][tower]
        cos = float((ours * ref).sum(1).min())
        diff = float(np.abs(ours - ref).max())
        say(f"{m.name}: {tower} fp32 ONNX vs PyTorch min cosine {cos:.6f}, max diff {diff:.2e}")
        if cos < MIN_COSINE_TORCH or diff > MAX_DIFF_TORCH:
            raise TagstreamError(
                f"the {tower} ONNX export drifts from its checkpoint (cosine {cos:.5f}, "
                f"max abs difference {diff:.2e})"
            )
        for variant in m.files:
            if variant == "fp32":
                continue
            cos = float((got[variant][tower] * ours).sum(1).min())
            say(f"{m.name}: {tower} {variant} vs fp32 min cosine {cos:.4f}")
            if cos < MIN_COSINE_VARIANT:
                raise TagstreamError(
                    f"the {tower} {variant} variant drifts from fp32 (cosine {cos:.4f} < "
                    f"{MIN_COSINE_VARIANT})"
                )


def _as_numpy(t: Any) -> F32:
    t = t if hasattr(t, "numpy") else t.pooler_output
    return _normalise(np.asarray(t.float().numpy(), dtype=np.float32))


def export_clip(
    src: Path,
    out: Path,
    *,
    name: str | None = None,
    variants: tuple[str, ...] = VARIANTS,
    say: Say | None = None,
) -> Manifest:
    """Export the CLIP or SigLIP checkpoint folder `src` into `out` (replaced whole, only
    once every check passed): visual and textual towers per variant, tokenizer.json,
    preprocess.json and the manifest. Nothing is downloaded."""
    src, out = Path(src), Path(out)
    say = say or log.info
    model_type = _model_type(src)
    unknown = set(variants) - set(VARIANTS)
    if unknown or "fp32" not in variants:
        raise TagstreamError(
            f"variants must include fp32 and be among {', '.join(VARIANTS)} (got {variants})"
        )
    try:
        import torch
        from transformers import AutoModel
    except ImportError as e:
        raise TagstreamError(
            f"exporting needs the [export] extra (torch, transformers, onnx): {e}; "
            "run `pip install 'tagstream[export]'` or `make install`"
        ) from e
    from models_onnx.export import exported_with, quantize_int8, to_fp16

    name = name or src.resolve().name
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tagstream-clip-", dir=out.parent))
    try:
        say(f"{name}: loading the {model_type} checkpoint {src}")
        model = AutoModel.from_pretrained(
            str(src), local_files_only=True, attn_implementation="eager"
        )
        model = model.float().eval()
        max_length = _max_length(src, model.config)
        prep = _preprocess_from(src)
        (tmp / PREPROCESS).write_text(json.dumps(prep.to_json(), indent=1) + "\n")
        tok = _tokenizer(src, model_type, max_length)
        tok.save(str(tmp / TOKENIZER))
        say(f"{name}: exporting the visual and textual towers to ONNX")
        _export_towers(model, model_type, tmp, prep, tok)
        with torch.no_grad():
            probe = model.get_image_features(pixel_values=torch.zeros(1, 3, prep.crop, prep.crop))
        dim = int(_as_numpy(probe).shape[1])
        stem = {"fp32": "", "int8": ".int8", "fp16": ".fp16"}
        for variant in variants:
            if variant == "int8":
                say(f"{name}: int8 per-channel dynamic quantisation (CPU variant)")
            elif variant == "fp16":
                say(f"{name}: fp16 conversion (GPU variant)")
            for tower in TOWERS if variant != "fp32" else ():
                src_file, dst = tmp / f"{tower}.onnx", tmp / f"{tower}{stem[variant]}.onnx"
                if variant == "int8":
                    quantize_int8(src_file, dst, op_types=INT8_OPS)
                else:
                    to_fp16(src_file, dst)
        files: dict[str, dict[str, str]] = {}
        for variant in variants:
            entry: dict[str, str] = {}
            for tower in TOWERS:
                f = f"{tower}{stem[variant]}.onnx"
                entry |= {tower: f, f"{tower}_sha256": sha256_file(tmp / f)}
            files[variant] = entry
        manifest = ClipManifest(
            name=name,
            source=str(src),
            dim=dim,
            pooling=CLIP_POOLING,
            normalize=True,
            max_length=max_length,
            files=files,
            tokenizer={"path": TOKENIZER, "sha256": sha256_file(tmp / TOKENIZER)},
            exported_with={**exported_with(), "model_type": model_type},
            kind=KIND,
            preprocess={"path": PREPROCESS, "sha256": sha256_file(tmp / PREPROCESS)},
        )
        manifest.save(tmp)
        _check(model, tmp, manifest, say)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"{name}: exported to {out}")
    return manifest


# --------------------------------------------------------------------------- tiny model

_WORDS = (
    "a photo of the cat dog bird car tree house city street beach mountain river sky cloud "
    "sun night food pizza cake bread soup salad coffee tea music guitar piano song dance "
    "football goal match team player game travel train plane boat map museum art painting "
    "drawing diagram chart screenshot text book page cooking kitchen recipe garden flower "
    "red blue green yellow black white small large old new happy sad funny cute dark light"
)
_SYLLABLES = "ka lo mi ne ru sa to vi be da fe go hu ji ke li mo nu pa qu ri se ti zu"


def _tiny_corpus(seed: int) -> list[str]:
    """A few hundred words: common ones and made-up ones from syllables."""
    rng = np.random.default_rng(seed)
    syllables = _SYLLABLES.split()
    made = ["".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) for _ in range(300)]
    return [_WORDS] * 4 + made


def write_tiny_clip(folder: Path, *, seed: int = 0, model_type: str = "clip") -> Path:
    """A tiny CLIP checkpoint with random weights (2 layers, 32 wide, 32 px images in 8 px
    patches, 16-dim embeddings) and a byte-level BPE tokenizer trained here, so tests,
    `bench` and docs exercise the real export and loading code without downloading a
    model. Its embeddings mean nothing. Deterministic for a seed; returns `folder`.
    `model_type` "siglip" writes a tiny SigLIP instead (32-dim embeddings, 16 text
    positions, square resize, mean and std 0.5), for the SigLIP path."""
    import torch
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    if model_type not in SUPPORTED:
        raise TagstreamError(f"model_type must be one of {', '.join(SUPPORTED)}")
    siglip = model_type == "siglip"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[bos, eos],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(seed), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, 0), (eos, 1)]
    )
    tok.save(str(folder / TOKENIZER))
    positions = 16 if siglip else 77
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": eos, "unk_token": eos}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=1) + "\n")
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": positions,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1) + "\n")
    prep: dict[str, Any] = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
    }
    if siglip:
        del prep["do_center_crop"], prep["crop_size"]
        prep |= {
            "image_processor_type": "SiglipImageProcessor",
            "size": {"height": 32, "width": 32},
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
    (folder / "preprocessor_config.json").write_text(json.dumps(prep, indent=1) + "\n")
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text = {
        **layers,
        "num_attention_heads": 2,
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": positions,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    vision = {**layers, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if siglip:
            sig = SiglipConfig(text_config=text, vision_config=vision)  # type: ignore[no-untyped-call]
            model: Any = SiglipModel(sig)
        else:
            config = CLIPConfig(  # type: ignore[no-untyped-call]
                text_config=text, vision_config=vision, projection_dim=16
            )
            model = CLIPModel(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder
