"""`make gpu-check`: everything the CUDA path must show, in one run on a GPU machine.

1. Equality: each encoder's fp16 model on CUDA with IOBinding against its fp32 model on the
   CPU, on real texts: the minimum cosine must be at least 0.999.
2. Speed: `tagstream bench --json --device cuda` per encoder (bare encoder with a batch-token
   sweep, end to end through the embedded broker, latency).
3. One JSON object with the device, driver and CUDA versions and every figure, printed and
   written to a file, for docs/PERFORMANCE.md.

Without a usable NVIDIA GPU it stops at once with a one-line reason (exit 3): a CPU run
would measure nothing the issue asks for."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tagsys.errors import TagstreamError

MODELS = ("all-MiniLM-L6-v2", "multilingual-e5-small")
MIN_COSINE = 0.999
SWEEP = "1024,4096,16384,65536"
NO_GPU = 3


def gpu_absent_reason() -> str | None:
    """None when CUDA can run here; else why not, in a few words."""
    from models_onnx.encoder import cuda_usable

    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi on PATH (no NVIDIA driver installed)"
    if not cuda_usable():
        return "onnxruntime's CUDA provider cannot load (driver or CUDA libraries missing)"
    return None


def device_facts() -> dict[str, Any]:
    """GPU name, driver and CUDA versions (nvidia-smi), and onnxruntime's own CUDA build."""
    import onnxruntime as ort

    q = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    name, driver, memory = (s.strip() for s in subprocess.check_output(q, text=True).split(","))
    header = subprocess.check_output(["nvidia-smi"], text=True)
    cuda = header.split("CUDA Version:", 1)[1].split()[0] if "CUDA Version:" in header else ""
    try:
        from onnxruntime.capi import build_and_package_info as info

        ort_cuda = str(getattr(info, "cuda_version", ""))
    except ImportError:
        ort_cuda = ""
    return {
        "device": name,
        "memory": memory,
        "driver": driver,
        "driver_cuda": cuda,
        "onnxruntime": ort.__version__,
        "onnxruntime_cuda": ort_cuda,
    }


def min_cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    """The worst row's cosine between two embeddings of the same texts."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return float((num / np.maximum(den, 1e-12)).min())


def equality(
    model: str,
    texts: Sequence[str],
    *,
    device: str = "cuda",
    variant: str = "fp16",
    model_dir: Path | None = None,
) -> dict[str, Any]:
    """`variant` on `device` (IOBinding on CUDA) against fp32 on the CPU."""
    from models_onnx.encoder import OnnxEncoder

    ref = OnnxEncoder(model, model_dir=model_dir, device="cpu", variant="fp32")
    dut = OnnxEncoder(model, model_dir=model_dir, device=device, variant=variant)  # type: ignore[arg-type]
    got = dut.encode(list(texts))
    want = ref.encode(list(texts))
    worst = min_cosine(got, want)
    return {
        "variant": f"{variant} on {dut.device}" + (" + IOBinding" if dut.io_binding else ""),
        "texts": len(texts),
        "min_cosine": round(worst, 6),
        "ok": worst >= MIN_COSINE,
    }


def bench(model: str, model_dir: Path | None) -> dict[str, Any]:
    """`tagstream bench --json` on CUDA; its last stdout line is the JSON object."""
    cmd = [sys.executable, "-m", "consumer.cli", "bench", "--json", "--device", "cuda"]
    cmd += ["--model", model, "--sweep-batch-tokens", SWEEP, "--rounds", "2", "--no-torch"]
    cmd += ["--items", "20000", "--latency-items", "4000"]
    if model_dir is not None:
        cmd += ["--model-dir", str(model_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=210)
    if out.returncode != 0:
        raise TagstreamError(f"bench {model} failed: {out.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(out: Path, model_dir: Path | None = None) -> int:
    """The checks and the report; `main` has made sure a GPU is there."""
    import orjson

    from consumer.tagging.events import decode, event_text
    from consumer.tools.bench import load_items

    t0 = time.monotonic()
    items, source = load_items(2000)
    texts = [event_text(decode(orjson.dumps(i))) for i in items]
    report: dict[str, Any] = {**device_facts(), "texts_from": source, "models": {}}
    for model in MODELS:
        report["models"][model] = {"equality": equality(model, texts, model_dir=model_dir)}
        report["models"][model]["bench"] = bench(model, model_dir)
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["ok"] = all(m["equality"]["ok"] for m in report["models"].values())
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="JSON report file")
    p.add_argument("--model-dir", type=Path, default=None, help="Exported models folder")
    p.add_argument("--preflight", action="store_true", help="Only say whether a GPU is usable")
    a = p.parse_args(argv)
    reason = gpu_absent_reason()
    if reason is not None:
        print(f"gpu-check: no GPU to check: {reason}", file=sys.stderr)
        return NO_GPU
    if a.preflight:
        return 0
    try:
        return run(a.out, a.model_dir)
    except TagstreamError as e:  # a driver but no working CUDA path: say so in one line
        print(f"gpu-check: the CUDA path failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
