"""The GPU image can load CUDA: the CUDA major the Dockerfile's base image provides is the one
the pinned onnxruntime-gpu needs, read from two places a GPU is not needed for (the wheel's
`cuda` extra and the DT_NEEDED entries of its CUDA provider)."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_cuda() -> tuple[int, bool]:
    """(CUDA major, has cuDNN) of the Dockerfile's default CUDA_IMAGE."""
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+(?:\.\d+)?-(\S+)$", text, re.M)
    assert m, "the Dockerfile names no nvidia/cuda base in ARG CUDA_IMAGE"
    return int(m.group(1)), "cudnn" in m.group(2)


def extra_cuda_majors(requires: list[str]) -> dict[str, int]:
    """The majors onnxruntime-gpu's `cuda`/`cudnn` extras ask for: the CUDA runtime's
    (`nvidia-cuda-runtime~=13.0`, or `nvidia-cuda-runtime-cu12`) and cuDNN's."""
    out: dict[str, int] = {}
    for line in requires:
        req = Requirement(line)
        if req.marker is None or "extra" not in str(req.marker):
            continue
        name = req.name.lower()
        if name.startswith("nvidia-cuda-runtime"):
            suffix = re.search(r"-cu(\d+)$", name)
            versions = [s.version for s in req.specifier]
            out["cuda"] = int(suffix.group(1) if suffix else versions[0].split(".")[0])
        elif name.startswith("nvidia-cudnn"):
            spec = next(iter(req.specifier), None)
            if spec is not None:
                out["cudnn"] = int(spec.version.split(".")[0])
            out["cudnn_cuda"] = int(name.rsplit("-cu", 1)[1])
    return out


def needed_cuda_major(lib: Path) -> int:
    """The CUDA runtime major a shared library links: libcudart.so.N in DT_NEEDED."""
    with lib.open("rb") as f:
        for section in ELFFile(f).iter_sections():
            if isinstance(section, DynamicSection):
                for tag in section.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED":
                        m = re.fullmatch(r"libcudart\.so\.(\d+)", str(getattr(tag, "needed", "")))
                        if m:
                            return int(m.group(1))
    raise AssertionError(f"{lib.name} links no libcudart")


def test_the_pin_is_what_is_installed() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in deps if d.startswith("onnxruntime-gpu")]
    installed = md.version("onnxruntime-gpu")
    assert str(pin.specifier).startswith("=="), "pin onnxruntime-gpu exactly, with the CUDA base"
    assert installed in pin.specifier, f"installed {installed}, pinned {pin.specifier}"


def test_dockerfile_cuda_matches_onnxruntime_gpu() -> None:
    major, cudnn = dockerfile_cuda()
    assert cudnn, "onnxruntime-gpu's CUDA provider needs cuDNN: use a -cudnn- base"
    wants = extra_cuda_majors(md.requires("onnxruntime-gpu") or [])
    assert wants.get("cuda") == major, f"onnxruntime-gpu wants CUDA {wants}, the image has {major}"
    assert wants.get("cudnn_cuda") == major and wants.get("cudnn") == 9, wants
    dist = md.distribution("onnxruntime-gpu")
    provider = Path(str(dist.locate_file("onnxruntime/capi/libonnxruntime_providers_cuda.so")))
    assert needed_cuda_major(provider) == major


def test_the_checks_tell_cuda_12_from_13() -> None:
    """The parsers see the difference the pod would crash on (1.26's extra against 1.31's)."""
    cu12 = ['nvidia-cuda-runtime-cu12~=12.0; extra == "cuda"', "numpy>=1.21"]
    cu13 = [
        'nvidia-cuda-runtime~=13.0; extra == "cuda"',
        'nvidia-cudnn-cu13~=9.0; extra == "cudnn"',
    ]
    assert extra_cuda_majors(cu12) == {"cuda": 12}
    assert extra_cuda_majors(cu13) == {"cuda": 13, "cudnn": 9, "cudnn_cuda": 13}
