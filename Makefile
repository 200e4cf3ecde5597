# One command each: setup, test, lint, bench. CI (.ci/run) calls the same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup front loadgen test test-unit lint format bench bench-smoke services-up services-down clean

setup:  ## create .venv and install tenx with its dev tools
	@test -x $(BIN)/python || { echo "setup: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "setup: upgrading pip"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "setup: installing tenx and its dev tools into $(VENV) (about a minute the first time; pip shows what it fetches)"
	@bash -o pipefail -c "$(BIN)/python -m pip install -e '.[dev]' 2>&1 | tee $(VENV)/pip-install.log \
	  | { grep --line-buffered -E '^(Collecting|Successfully installed)' || true; }" \
	  || { tail -n 30 $(VENV)/pip-install.log; echo "setup: pip install failed (full log: $(VENV)/pip-install.log)"; exit 1; }
	@$(MAKE) --no-print-directory front loadgen
	@$(BIN)/tenx --version >/dev/null && echo "setup: done; activate it with: . $(VENV)/bin/activate"

front:  ## build tenx-front (Go), the model server's admission front (`tenx serve-models --front`), into .venv/bin
	@if command -v go >/dev/null 2>&1; then \
	  echo "setup: building tenx-front into $(BIN) (Go, no dependencies)"; \
	  cd front && go build -trimpath -o $(abspath $(BIN))/tenx-front . ; \
	else echo "setup: Go is not installed: tenx-front not built (tenx serve-models --front needs it; all else works)"; fi

loadgen:  ## build tenx-loadgen (Go), the native engine of serving/loadgen.py (`bench/overload.py`), into .venv/bin
	@if command -v go >/dev/null 2>&1; then \
	  echo "setup: building tenx-loadgen into $(BIN) (Go, no dependencies)"; \
	  cd loadgen && go build -trimpath -o $(abspath $(BIN))/tenx-loadgen . ; \
	else echo "setup: Go is not installed: tenx-loadgen not built (load runs use the Python engine)"; fi

test:  ## every test; integration tests need `eval "$$(scripts/services up)"` first
	$(BIN)/python -m pytest

test-unit:  ## unit tests only, no services needed
	$(BIN)/python -m pytest tests/unit

lint:  ## ruff (lint + format check), mypy, import-linter layer contract; gofmt and go vet for front/ and loadgen/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	@if command -v go >/dev/null 2>&1; then for module in front loadgen; do \
	  unformatted="$$(gofmt -l $$module)" && \
	  { [ -z "$$unformatted" ] || { echo "gofmt: $$unformatted (run gofmt -w $$module)"; exit 1; }; } && \
	  (cd $$module && go vet .) || exit 1; done; fi

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench:  ## benchmarks: each prints a table and writes JSON under bench/results/
	@set -e; for script in bench/[!_]*.py; do [ -e "$$script" ] || continue; echo "== $$script"; \
	  if [ "$$script" = bench/gpu_kernel.py ] && ! $(BIN)/python -c 'import cupy' 2>/dev/null; then \
	    echo "skipped: needs CuPy and an NVIDIA GPU (scripts/gpu-check)"; continue; fi; \
	  $(BIN)/python $$script; done

bench-smoke:  ## every benchmark at a tiny size (--smoke): checks they run, times nothing; JSON under TENX_BENCH_SMOKE_DIR (default <tmp>/tenx-bench-smoke), never bench/results/; online and stream need scripts/services up
	@set -e; for script in bench/[!_]*.py; do [ -e "$$script" ] || continue; echo "== $$script --smoke"; \
	  $(BIN)/python $$script --smoke; done

services-up:
	scripts/services up

services-down:
	scripts/services down

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
