# Corral: `make run` serves the starter model on this box; `make test` runs the suite.
# Both create the virtualenv on first use (llama-cpp-python compiles: ~5 minutes once;
# pip caches the built wheel, so a new venv reuses it).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test unit integration bench lint clean registry

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Corral needs Python 3.11 or newer"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/corral serve --config configs/corral.yaml

test: $(STAMP) registry
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The pull tests run Debian's OCI registry (docker-registry); install it if root may.
registry:
	@command -v docker-registry >/dev/null || test "$$(id -u)" != 0 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry)
	@command -v docker-registry >/dev/null || \
		echo "note: docker-registry is missing (apt-get install docker-registry); its pull tests will skip"

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP) registry
	$(BIN)/python -m pytest tests/integration tests/compat $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache bench/results
