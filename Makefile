# Corral: `make run` serves the starter model on this box; `make test` runs the suite.
# Both create the virtualenv on first use (llama-cpp-python compiles: ~6 minutes once per
# set of build flags; the wheel is kept in ~/.cache/corral/wheels, so a new venv reuses it).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

# -- llama-cpp-python, compiled on this box ------------------------------------------------
# GCC older than 13 miscompiles ggml's AMX kernels: on a CPU with AMX (-march=native turns
# them on) the first batch of two or more tokens segfaults (issue 15). Built by such a GCC,
# the AMX code is left out; the AVX-512 and repack kernels stay. clang 16 builds AMX right
# (2.4x the decode speed), but then a greedy answer depends on how its tokens were batched
# (the same request answers otherwise once its prompt is cached): LLAMA_AMX=clang opts in.
# nodes/cpu_kernels.py still probes whatever gets installed. CMAKE_ARGS from the
# environment (e.g. -DGGML_CUDA=on) are kept; LLAMA_CMAKE_ARGS=... replaces the lot.
LLAMA_VERSION := $(shell sed -n 's/^ *"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
$(if $(LLAMA_VERSION),,$(error no "llama-cpp-python==VERSION" in pyproject.toml))
# The compilers CMake will use: $CC and $CXX if set, else cc and c++.
LLAMA_CC := $(if $(filter default undefined,$(origin CC)),cc,$(CC))
LLAMA_CXX := $(if $(filter default undefined,$(origin CXX)),c++,$(CXX))
# GCC's major version ("" for clang, which defines __clang__, or no compiler).
gcc_major = $(shell printf '__clang__ __GNUC__\n' | $(1) -E -P -x c - 2>/dev/null \
	| awk '$$1 == "__clang__" { print $$2 }')
LLAMA_GCC := $(call gcc_major,$(LLAMA_CC)) $(call gcc_major,$(LLAMA_CXX))
LLAMA_OLD_GCC := $(shell for v in $(LLAMA_GCC); do [ "$$v" -lt 13 ] && echo yes && break; done)
CPU_AMX := $(shell grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && echo yes)
# The newest clang 16+ installed (LLAMA_AMX=clang builds AMX with it).
CLANG_FOR_AMX := $(firstword $(foreach v,21 20 19 18 17 16,$(shell command -v clang-$(v))))
# auto: no AMX code where GCC < 13 builds; off: never; on: wherever -march=native has AMX;
# clang: AMX built by clang 16+ where GCC < 13 would build it broken.
LLAMA_AMX ?= auto
LLAMA_USE_CLANG := $(and $(filter clang,$(LLAMA_AMX)),$(LLAMA_OLD_GCC),$(CPU_AMX),$(CLANG_FOR_AMX))
$(if $(and $(filter clang,$(LLAMA_AMX)),$(LLAMA_OLD_GCC),$(CPU_AMX),$(if $(CLANG_FOR_AMX),,no)),\
	$(error LLAMA_AMX=clang needs clang 16 or newer (apt-get install clang-16)))
ifneq ($(LLAMA_USE_CLANG),)
LLAMA_CC := $(CLANG_FOR_AMX)
LLAMA_CXX := $(subst clang-,clang++-,$(CLANG_FOR_AMX))
LLAMA_OLD_GCC :=
endif
LLAMA_NO_AMX := $(or $(filter off,$(LLAMA_AMX)),$(and $(filter auto clang,$(LLAMA_AMX)),$(LLAMA_OLD_GCC)))
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_AMX_ARGS := $(if $(LLAMA_NO_AMX),-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)')
# llamafile's tinyBLAS multiplies a batch of two or more rows in another order than one row
# alone: a request's greedy answer would change with how many others decode beside it.
# Without it, answers do not depend on load (ggml's own kernels take the batch).
# GGML_RPC builds llama.cpp's RPC backend (libggml-rpc): a box lends its memory to a model
# split over several boxes (nodes/rpc.py).
LLAMA_BASE_ARGS := -DGGML_LLAMAFILE=OFF -DGGML_RPC=ON
LLAMA_CMAKE_ARGS ?= $(strip $(LLAMA_BASE_ARGS) $(CMAKE_ARGS) $(LLAMA_AMX_ARGS))
# pip caches a wheel it built keyed by the sdist alone, not by CMAKE_ARGS: a changed flag
# would silently reuse the old build. So the wheel is built without pip's cache into a
# folder named after the version and the flags (ansible/ names it the same way), and the
# venv records which one it holds.
LLAMA_KEY := $(shell printf '%s' "$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)$(if $(LLAMA_USE_CLANG), CC=$(notdir $(LLAMA_CC)))" \
	| sha256sum | cut -c1-12)
LLAMA_WHEELS := $(HOME)/.cache/corral/wheels/$(LLAMA_KEY)
LLAMA_MARK := $(VENV)/.llama-$(LLAMA_KEY)

.PHONY: run test unit integration bench lint clean system-tools llama-flags

$(STAMP): pyproject.toml $(LLAMA_MARK)
	$(BIN)/python -m pip install --progress-bar off --find-links $(LLAMA_WHEELS) -e '.[test]'
	touch $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Corral needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(LLAMA_WHEELS)/.complete: | $(BIN)/python
	@echo "Building llama-cpp-python $(LLAMA_VERSION) with CMAKE_ARGS=\"$(LLAMA_CMAKE_ARGS)\"$(if $(LLAMA_USE_CLANG), and $(LLAMA_CC) for AMX) (once)"
	@if [ -n "$(and $(filter auto,$(LLAMA_AMX)),$(LLAMA_OLD_GCC),$(CPU_AMX))" ]; then \
		echo "note: this CPU has AMX, which GCC < 13 builds broken, so llama.cpp is built" \
			"without it; LLAMA_AMX=clang builds it with clang 16+ (2.4x the decode speed;" \
			"greedy answers then depend on batching): see the README"; fi
	mkdir -p $(LLAMA_WHEELS)
	$(if $(LLAMA_USE_CLANG),CC=$(LLAMA_CC) CXX=$(LLAMA_CXX)) \
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --no-cache-dir --no-deps \
		--no-binary llama-cpp-python --progress-bar off -w $(LLAMA_WHEELS) \
		llama-cpp-python==$(LLAMA_VERSION)
	printf '%s\n' "$(LLAMA_CMAKE_ARGS)" > $(LLAMA_WHEELS)/CMAKE_ARGS
	touch $@

# The venv may hold the same version built with other flags: replace it.
$(LLAMA_MARK): $(LLAMA_WHEELS)/.complete | $(BIN)/python
	$(BIN)/python -m pip install --progress-bar off --no-deps --force-reinstall \
		$(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	rm -f $(VENV)/.llama-*
	touch $@

llama-flags:
	@echo "compilers: $(LLAMA_CC) and $(LLAMA_CXX)$(if $(LLAMA_USE_CLANG), (clang for AMX)); GCC versions of cc and c++: $(or $(strip $(LLAMA_GCC)),none)"
	@echo "CMAKE_ARGS: $(LLAMA_CMAKE_ARGS)"
	@echo "wheel: $(LLAMA_WHEELS)"

run: $(STAMP)
	$(BIN)/corral serve --config configs/corral.yaml

test: $(STAMP) system-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The pull tests run Debian's OCI registry (docker-registry), the Ansible test checks the
# firewall's rules with nft (nftables) and the dashboard's tests drive Debian's chromium
# (Playwright cannot download a browser here); install what is missing if root may.
system-tools:
	@missing=""; \
	command -v docker-registry >/dev/null || missing="docker-registry"; \
	test -x /usr/sbin/nft || command -v nft >/dev/null || missing="$$missing nftables"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	elif [ -n "$$missing" ]; then \
		echo "note: missing$$missing (apt-get install$$missing); the tests that need them skip"; \
	fi

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP) system-tools
	$(BIN)/python -m pytest tests/browser tests/integration tests/compat $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --find-links $(LLAMA_WHEELS) -e '.[test,bench]'
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache bench/results
