"""The manifest that pins each exported model file by sha256."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tagsys.errors import TagstreamError

MANIFEST = "manifest.json"


class ModelNotFoundError(TagstreamError):
    """No exported model where one was expected."""


class ModelIntegrityError(TagstreamError):
    """A model file does not match the sha256 its manifest pins."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    name: str
    source: str
    dim: int
    pooling: str
    normalize: bool
    max_length: int
    query_prefix: str = ""
    passage_prefix: str = ""
    # variant -> {"path": file name, "sha256": hex}; variants: fp32, int8, fp16
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    tokenizer: dict[str, str] = field(default_factory=dict)
    exported_with: dict[str, str] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise ModelNotFoundError(
                f"no exported encoder in {folder} (missing {MANIFEST}); run "
                f"`tagstream export-onnx` or `make install` first"
            )
        data: dict[str, Any] = json.loads(path.read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def verify(self, folder: Path, variant: str) -> Path:
        """Return the variant's path after checking its sha256 against the manifest."""
        if variant not in self.files:
            raise ModelNotFoundError(
                f"encoder {self.name} has no {variant!r} variant (has {sorted(self.files)})"
            )
        entry = self.files[variant]
        path = folder / entry["path"]
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ModelIntegrityError(
                f"{path}: sha256 {actual[:16]}… does not match the manifest's "
                f"{entry['sha256'][:16]}…; re-export with `tagstream export-onnx --force`"
            )
        return path
