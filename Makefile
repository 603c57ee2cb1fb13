# Corral: `make run` serves the starter model on this box; `make test` runs the suite.
# Both create the virtualenv on first use (llama-cpp-python compiles: ~5 minutes once;
# pip caches the built wheel, so a new venv reuses it).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test unit integration bench lint clean system-tools

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Corral needs Python 3.11 or newer"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/corral serve --config configs/corral.yaml

test: $(STAMP) system-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The pull tests run Debian's OCI registry (docker-registry) and the Ansible test checks the
# firewall's rules with nft (nftables); install what is missing if root may.
system-tools:
	@missing=""; \
	command -v docker-registry >/dev/null || missing="docker-registry"; \
	test -x /usr/sbin/nft || command -v nft >/dev/null || missing="$$missing nftables"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	elif [ -n "$$missing" ]; then \
		echo "note: missing$$missing (apt-get install$$missing); the tests that need them skip"; \
	fi

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP) system-tools
	$(BIN)/python -m pytest tests/integration tests/compat $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache bench/results
