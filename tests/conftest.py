"""Shared fixtures. Real models load once per test session (dequantising takes seconds)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Test modules live in folders that mirror selfspec/; the helpers they share (tiny.py, lossless.py,
# prompts.py, showkit.py) stay here at the top, importable from every folder.
sys.path.insert(0, str(Path(__file__).parent))

# Keep tests off the user's cache folder only when asked; the default cache makes reruns fast.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs one pytest-xdist worker per core: each worker's PyTorch (and the CLI processes it
# starts) on one thread, or two workers' thread pools would fight over the cores. Tests of
# multi-threaded kernels ask for their threads themselves (tiny.threads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _load(alias: str, dtype: str = "fp32"):
    from selfspec.models.loading import load_model
    from selfspec.models.registry import REGISTRY

    entry = REGISTRY[alias]
    if not entry.installed:
        pytest.skip(f"{alias} is not installed ({entry.install_hint}); `make test` installs it")
    return load_model(alias, dtype=dtype, ctx_size=1024)


@pytest.fixture(scope="session")
def smollm():
    return _load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm_in(smollm):
    """`smollm_in(dtype)`: SmolLM2 loaded in `dtype` (fp32, bf16, int8 or int4) with `load_model`,
    once per session (fp32 is the `smollm` fixture)."""
    loaded = {"fp32": smollm}

    def get(dtype: str):
        if dtype not in loaded:
            loaded[dtype] = _load("smollm2-135m", dtype)
        return loaded[dtype]

    return get


@pytest.fixture(scope="session")
def gemma():
    return _load("gemma3-270m")
