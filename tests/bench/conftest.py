"""Fixtures of the bench tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary, saved with SmolLM2's tokenizer."""
    from selfspec.models.loading import load_gguf_tokenizer
    from selfspec.models.registry import REGISTRY

    tmp = tmp_path_factory.mktemp("tinychat")
    _, folder = build_tiny("llama", tmp, vocab_size=49152, max_position_embeddings=512)
    load_gguf_tokenizer(REGISTRY["smollm2-135m"].path()).save_pretrained(str(folder))
    return folder
