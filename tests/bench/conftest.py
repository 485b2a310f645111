"""Fixtures of the bench tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from tiny import build_tiny_chat


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary, saved with SmolLM2's tokenizer."""
    return build_tiny_chat(tmp_path_factory.mktemp("tinychat"))
