"""Shared fixtures. Real models load once per test session (dequantising takes seconds)."""
from __future__ import annotations

import os

import pytest

# Keep tests off the user's cache folder only when asked; the default cache makes reruns fast.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load(alias: str):
    from selfspec.models.loading import load_model
    from selfspec.models.registry import REGISTRY

    entry = REGISTRY[alias]
    if not entry.installed:
        pytest.skip(f"{alias} is not installed ({entry.install_hint}); `make test` installs it")
    return load_model(alias, dtype="fp32", ctx_size=1024)


@pytest.fixture(scope="session")
def smollm():
    return _load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    return _load("gemma3-270m")
