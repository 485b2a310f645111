"""selfspec: lossless speculative decoding for local LLMs (self-speculative layer skipping,
draft models, prompt lookup). Heavy modules load on first use so `import selfspec` stays fast."""
from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "selfspec.models.loading",
    "Model": "selfspec.models.loading",
    "generate": "selfspec.generation",
    "stream": "selfspec.generation",
    "GenerationResult": "selfspec.generation",
    "SpecStats": "selfspec.generation",
    "SamplingParams": "selfspec.sampling",
    "PrefixCache": "selfspec.prefix",
    "ChatSession": "selfspec.chat",
    "LayerSkipDrafter": "selfspec.drafters.layerskip",
    "SkipConfig": "selfspec.drafters.layerskip",
    "AdaptiveExit": "selfspec.drafters.layerskip",
    "NgramDrafter": "selfspec.drafters.ngram",
    "DraftModelDrafter": "selfspec.drafters.draft_model",
    "SelfspecError": "selfspec.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'selfspec' has no attribute {name!r}")
