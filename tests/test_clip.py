"""CLIP-family image/text pairs (models_onnx.clip): a tiny random CLIP (and SigLIP) written
here, exported by the real code, loaded per variant; the preprocessing against
transformers' image processors; integrity; the `export-onnx --clip` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("PIL")

from PIL import Image

from models_onnx import ModelIntegrityError, OnnxEncoder
from models_onnx.clip import (
    CLIP_MEAN,
    CLIP_STD,
    ClipEncoder,
    Preprocess,
    export_clip,
    load_clip_manifest,
    write_tiny_clip,
)
from models_onnx.manifest import sha256_file
from tagsys.errors import TagstreamError
from tests.conftest import cli_exit

TEXTS = ["a photo of a cat", "a red car on a street", "今天做了红烧肉", ""]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    sizes = [(48, 32), (32, 70), (32, 32), (100, 41)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint folder, export folder) of the tiny CLIP, exported once."""
    root = tmp_path_factory.mktemp("clip")
    src = write_tiny_clip(root / "tiny-clip")
    out = root / "export"
    export_clip(src, out, say=lambda _s: None)
    return src, out


def test_export_writes_both_towers_per_variant(tiny: tuple[Path, Path]) -> None:
    _, out = tiny
    m = load_clip_manifest(out)
    assert m.kind == "clip" and m.name == "tiny-clip" and m.dim == 16 and m.max_length == 77
    assert set(m.files) == {"fp32", "int8", "fp16"}
    for variant, entry in m.files.items():
        for tower in ("visual", "textual"):
            assert sha256_file(out / entry[tower]) == entry[f"{tower}_sha256"], variant
    assert m.files["int8"]["visual"] == "visual.int8.onnx"
    prep = json.loads((out / "preprocess.json").read_text())
    assert {k: prep[k] for k in ("size", "crop", "resample")} == {
        "size": 32,
        "crop": 32,
        "resample": "bicubic",
    }
    np.testing.assert_allclose(prep["mean"], CLIP_MEAN)
    np.testing.assert_allclose(prep["std"], CLIP_STD)
    # the int8 graphs do integer matrix products; the fp16 ones hold fp16 weights
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "visual.int8.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    inits = onnx.load(str(out / "textual.fp16.onnx")).graph.initializer
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in inits)


def test_a_text_encoder_refuses_the_folder(tiny: tuple[Path, Path]) -> None:
    _, out = tiny
    with pytest.raises(TagstreamError, match="ClipEncoder"):
        OnnxEncoder(out.name, model_dir=out.parent, device="cpu")


@pytest.mark.parametrize("variant", ["fp32", "int8", "fp16"])
def test_each_variant_gives_unit_vectors_deterministically(
    tiny: tuple[Path, Path], variant: str
) -> None:
    enc = ClipEncoder(tiny[1], device="cpu", variant=variant)
    assert (enc.name, enc.dim, enc.variant, enc.id) == (
        "tiny-clip",
        16,
        variant,
        f"tiny-clip/{variant}",
    )
    images = _images()
    v = enc.encode_images(images)
    t = enc.encode_texts(TEXTS)
    for x, n in ((v, len(images)), (t, len(TEXTS))):
        assert x.shape == (n, 16) and x.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(enc.encode_images(images), v)
    np.testing.assert_array_equal(enc.encode_texts(TEXTS), t)
    # the batching (and so the padding) does not change the vectors; int8 only a little: its
    # activations are quantised with one scale per batch
    tol = 1e-5 if variant != "int8" else 0.02
    np.testing.assert_allclose(enc.encode_images(images, batch_size=1), v, atol=tol)
    np.testing.assert_allclose(enc.encode_texts(TEXTS, batch_size=1), t, atol=tol)
    assert enc.encode_images([]).shape == (0, 16) and enc.encode_texts([]).shape == (0, 16)
    # different inputs, different vectors
    assert abs(float(v[0] @ v[1])) < 0.999 and abs(float(t[0] @ t[1])) < 0.999


def test_the_encoder_runs_without_torch(tiny: tuple[Path, Path]) -> None:
    """The service image has neither torch nor transformers."""
    code = (
        "import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
        "from PIL import Image\n"
        "from models_onnx import ClipEncoder\n"
        f"e = ClipEncoder({str(tiny[1])!r}, device='cpu')\n"
        "assert e.encode_images([Image.new('RGB', (40, 30))]).shape == (1, 16)\n"
        "assert e.encode_texts(['a cat']).shape == (1, 16)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cpu_picks_int8_and_long_texts_are_truncated(tiny: tuple[Path, Path]) -> None:
    enc = ClipEncoder(tiny[1], device="cpu")
    assert enc.variant == "int8"
    long = " ".join(["football"] * 300)  # far past CLIP's 77 positions
    assert enc.encode_texts([long]).shape == (1, 16)


def test_fp32_matches_the_checkpoint_and_int8_stays_close(tiny: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoTokenizer, CLIPModel

    src, out = tiny
    fp32 = ClipEncoder(out, device="cpu", variant="fp32")
    images = _images()
    pixels = fp32.preprocess(images)
    model = CLIPModel.from_pretrained(str(src)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(src))  # the checkpoint's own tokenizer
    batch = hf_tok(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
        ref_txt = model.get_text_features(**batch).numpy()
    img, txt = fp32.encode_images(images), fp32.encode_texts(TEXTS)
    assert _cos(img, ref_img) > 0.999 and _cos(txt, ref_txt) > 0.999
    for variant, floor in (("int8", 0.98), ("fp16", 0.999)):
        enc = ClipEncoder(out, device="cpu", variant=variant)
        assert _cos(enc.encode_images(images), img) > floor, variant
        assert _cos(enc.encode_texts(TEXTS), txt) > floor, variant


def test_preprocess_matches_the_checkpoints_image_processor(tiny: tuple[Path, Path]) -> None:
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    src, out = tiny
    ours = ClipEncoder(out, device="cpu", variant="fp32").preprocess(_images())
    hf = CLIPImageProcessor.from_pretrained(str(src))(images=_images(), return_tensors="np")
    assert ours.shape == (4, 3, 32, 32) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, hf["pixel_values"], atol=1e-5)
    # SigLIP's resize: both sides to the size, no crop
    square = Preprocess(size=32, crop=32, mean=[0.5] * 3, std=[0.5] * 3, resize="square")
    siglip = SiglipImageProcessor(size={"height": 32, "width": 32})
    ref = siglip(images=_images(), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(square(_images()), ref, atol=1e-5)


def _unnormalise(x: np.ndarray) -> np.ndarray:
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    return np.asarray(x * std + mean)


def test_preprocess_crops_the_centre_and_normalises() -> None:
    prep = Preprocess(size=32, crop=32, mean=CLIP_MEAN, std=CLIP_STD)
    red, blue = (255, 0, 0), (0, 0, 255)
    # wide, no resize needed (32 high): the crop must be columns 32-63, the red ones
    wide = Image.new("RGB", (96, 32), blue)
    wide.paste(Image.new("RGB", (32, 32), red), (32, 0))
    # tall and twice the size: resized to 32 x 96, then rows 32-63 of it
    tall = Image.new("RGB", (64, 192), blue)
    tall.paste(Image.new("RGB", (64, 64), red), (0, 64))
    x = prep([wide, tall])
    assert x.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(_unnormalise(x[0]).mean(axis=(1, 2)), [1, 0, 0], atol=1e-5)
    means = _unnormalise(x[1]).mean(axis=(1, 2))  # bicubic blurs the red/blue edge a little
    assert means[0] > 0.95 and means[2] < 0.05
    # a non-square image comes out crop x crop
    assert prep([Image.new("RGB", (50, 35), red)]).shape == (1, 3, 32, 32)
    # (x / 255 - mean) / std per channel
    grey = prep([Image.new("RGB", (40, 40), (128, 128, 128))])[0]
    want = (128 / 255 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(grey.mean(axis=(1, 2)), want, atol=1e-5)
    np.testing.assert_allclose(grey.std(axis=(1, 2)), 0, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "variant"),
    [("visual.onnx", "fp32"), ("textual.int8.onnx", "int8"), ("preprocess.json", "fp32")],
)
def test_a_tampered_file_is_refused(
    tiny: tuple[Path, Path], tmp_path: Path, name: str, variant: str
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny[1], copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        ClipEncoder(copy, device="cpu", variant=variant)


def test_a_non_clip_checkpoint_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TagstreamError, match="bert") as e:
        export_clip(src, tmp_path / "out")
    assert "clip" in str(e.value) and "siglip" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_siglip_exports_unmasked_fixed_length_text(tmp_path: Path) -> None:
    src = write_tiny_clip(tmp_path / "tiny-siglip", model_type="siglip")
    export_clip(src, tmp_path / "out", variants=("fp32", "int8"), say=lambda _s: None)
    enc = ClipEncoder(tmp_path / "out", device="cpu", variant="fp32")
    assert enc.dim == 32 and enc.prep.resize == "square"
    assert [i.name for i in enc.textual.get_inputs()] == ["input_ids"]
    assert {len(e.ids) for e in enc.tokenizer.encode_batch(TEXTS)} == {16}  # padded to 16
    t = enc.encode_texts(TEXTS)
    np.testing.assert_allclose(enc.encode_texts(TEXTS[:1]), t[:1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(enc.encode_images(_images()), axis=1), 1, atol=1e-5)


def test_tiny_checkpoint_is_deterministic_per_seed(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    src = tiny[0]
    again = write_tiny_clip(tmp_path / "again")
    other = write_tiny_clip(tmp_path / "other", seed=1)
    for f in ("model.safetensors", "tokenizer.json"):
        assert sha256_file(again / f) == sha256_file(src / f), f
    assert sha256_file(other / "model.safetensors") != sha256_file(src / "model.safetensors")


def test_cli_exports_a_clip_folder(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tiny[0]
    out = tmp_path / "out"
    assert cli_exit(["export-onnx", "--clip", str(src), "--out", str(out), "--no-fp16"]) in (
        0,
        None,
    )
    enc = ClipEncoder(out, device="cpu")
    assert enc.name == "tiny-clip" and set(enc.manifest.files) == {"fp32", "int8"}
    # the default folder: the model dir, under the name
    monkeypatch.setenv("TAGSTREAM_MODEL_DIR", str(tmp_path / "models"))
    assert cli_exit(["export-onnx", "--clip", str(src), "--name", "my-clip"]) in (0, None)
    assert ClipEncoder(tmp_path / "models" / "my-clip", device="cpu").name == "my-clip"


def test_cli_clip_and_model_are_exclusive(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = str(tiny[0]), str(tmp_path / "out")
    argv = ["export-onnx", "--clip", src, "--model", "all-MiniLM-L6-v2", "--out", out]
    assert cli_exit(argv) == 2
    assert cli_exit(["export-onnx", "--out", out]) == 2  # --out only goes with --clip
    assert not Path(out).exists()
