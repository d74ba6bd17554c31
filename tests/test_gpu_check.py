"""`make gpu-check` without a GPU refuses at once, in one line; its equality check and its
report's arithmetic run on the CPU here, so a GPU machine only adds the device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from consumer.tools import gpu_check
from models_onnx.encoder import cuda_usable

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(cuda_usable(), reason="a GPU is here: `make gpu-check` measures it")
def test_refuses_without_a_gpu_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    for extra in ([], ["--preflight"]):
        proc = subprocess.run(
            [sys.executable, "-m", "consumer.tools.gpu_check", "--out", str(out), *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert proc.returncode == gpu_check.NO_GPU
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpu-check: no GPU to check: "), lines
        assert not out.exists() and proc.stdout == ""


def test_min_cosine_takes_the_worst_row() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=np.float32)
    b = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, -1.0]], dtype=np.float32)
    assert gpu_check.min_cosine(a, b) == pytest.approx(0.0)
    assert gpu_check.min_cosine(a, a * 5) == pytest.approx(1.0)


def test_equality_check_compares_a_variant_with_cpu_fp32(model_dir: Path) -> None:
    """The same code the GPU runs with fp16 on CUDA, here with int8 on the CPU: real texts, the
    worst cosine, and a verdict against 0.999 (int8 is close, but below it)."""
    texts = ["How long do I boil an egg?", "Knife skills for onions", "家常红烧肉的做法"] * 4
    res = gpu_check.equality("all-MiniLM-L6-v2", texts, device="cpu", variant="int8")
    assert res["texts"] == 12 and res["variant"] == "int8 on cpu"
    assert 0.95 < res["min_cosine"] < 1.0
    assert res["ok"] is (res["min_cosine"] >= gpu_check.MIN_COSINE)
    same = gpu_check.equality("all-MiniLM-L6-v2", texts, device="cpu", variant="fp32")
    assert same["min_cosine"] == pytest.approx(1.0, abs=1e-5) and same["ok"] is True
