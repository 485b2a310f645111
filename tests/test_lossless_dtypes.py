"""Greedy speculative output equals plain greedy output, token for token (`==`, no near-tie
exception: DESIGN.md, "Losslessness, precisely"), on the real SmolLM2 in every dtype the engine
offers (fp32, bf16, int8, int4, native — the CPU default for a GGUF file — and native-q8), for
the drafters users run: auto, ngram, layer-skip, quantized. `make test` runs bf16, int8, int4
and native (fp32: test_lossless_real.py) on 2 prompts x 64 new tokens; `make test-full` (slow)
adds fp32, native-q8 and every drafter version on >= 8 prompts x 128 new tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lossless import assert_lossless, truncated_copy
from prompts import PROMPTS
from selfspec.drafters.anpd import AdaptiveNgramDrafter
from selfspec.drafters.auto import AutoDrafter
from selfspec.drafters.draft_model import DraftModelDrafter
from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig
from selfspec.drafters.ngram import NgramDrafter
from selfspec.drafters.quantized import QuantizedSelfDrafter
from selfspec.drafters.retrieval import RetrievalDrafter
from selfspec.errors import InvalidParameterError
from selfspec.generation import generate
from selfspec.drafters.factory import build_drafter
from tiny import DTYPES

SMOLLM_DTYPES = (*DTYPES, "native", "native-q8")  # the GGUF-native paths need the real file
SLOW_DTYPES = ("fp32", "native-q8")  # fp32: test_lossless_real.py; native-q8: test_native.py
FAST_PROMPTS = (PROMPTS[1], PROMPTS[2])  # code; a grounded summary (n-gram drafts get accepted)
N_NEW = 64
SLOW_PROMPTS = PROMPTS[:8]
SLOW_N_NEW = 128

_stores: dict = {}
_plain: dict = {}


def stdlib_store(model):
    """A retrieval datastore over a corpus every machine has (the standard library's json
    package), built once per model."""
    from selfspec.drafters.datastore import build_store, corpus_files

    if model.name not in _stores:
        _stores[model.name] = build_store(model.tokenizer, model.name, corpus_files([Path(json.__file__).parent]))
    return _stores[model.name]


def quantized(bits: int, skip_half: bool = False):
    """The precision self-draft with `bits`-bit weights (optionally one attention sub-layer
    skipped too). It refuses a model loaded with as few bits or fewer (the draft would be no
    cheaper): that combination skips, saying so."""
    def make(model):
        n = model.config.n_layers
        skip = SkipConfig(model=model.name, n_layers=n, attention=(n // 2,)) if skip_half else None
        try:
            return QuantizedSelfDrafter.for_model(model, skip, bits=bits, max_draft=6)
        except InvalidParameterError as e:
            pytest.skip(f"QuantizedSelfDrafter refuses bits={bits} on a {model.dtype} model: {e}")
    return make


def custom_skip(model):
    n = model.config.n_layers
    config = SkipConfig(model=model.name, n_layers=n, attention=tuple(range(2, n - 1, 2)), mlp=tuple(range(3, n - 1, 3)))
    return LayerSkipDrafter(config, max_draft=4)


# Every drafter version that runs without trained weights or a second model file.
DRAFTERS = {
    "auto": lambda m: AutoDrafter.for_model(m),  # calibrated on this machine (cached)
    "ngram": lambda m: NgramDrafter(),
    "ngram-adaptive": lambda m: AdaptiveNgramDrafter(),
    "ngram-tree": lambda m: build_drafter("ngram", m, tree=8),
    "retrieval": lambda m: RetrievalDrafter(stdlib_store(m)),
    "retrieval-tree": lambda m: RetrievalDrafter(stdlib_store(m), tree=True, tree_nodes=12),
    "layer-skip": lambda m: LayerSkipDrafter.for_model(m),  # the shipped config
    "layer-skip-custom": custom_skip,
    "layer-skip-online": lambda m: build_drafter("layer-skip", m, skip_config="online"),
    "draft-model": lambda m: DraftModelDrafter(truncated_copy(m, m.config.n_layers // 2), max_draft=3, target=m),
    "quantized-8": quantized(8),
    "quantized-4": quantized(4),
    "quantized-4-skip": quantized(4, skip_half=True),
}
FAST = ("auto", "ngram", "layer-skip", "quantized-4")


def plain_ids(model, prompt: str, n_new: int) -> list[int]:
    key = (model.dtype, prompt, n_new)
    if key not in _plain:
        _plain[key] = generate(model, prompt, max_new_tokens=n_new, ignore_eos=True).token_ids
    return _plain[key]


def check(model, drafter, prompts, n_new: int, label: str) -> int:
    """Every prompt's speculative ids == its plain ids; returns the tokens drafted in all."""
    drafted = 0
    for prompt in prompts:
        spec = generate(model, prompt, max_new_tokens=n_new, drafter=drafter, ignore_eos=True)
        assert_lossless(plain_ids(model, prompt, n_new), spec.token_ids,
                        f"smollm2 {model.dtype} {label} on {prompt[:30]!r}")
        assert spec.stats.new_tokens == n_new and spec.stats.accepted <= spec.stats.drafted
        drafted += spec.stats.drafted
    return drafted


# fp32 with these drafters (and more) is test_lossless_real.py's every-drafter test on 10 prompts;
# `make test-full` runs fp32 here too.
@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype", [pytest.param(d, marks=pytest.mark.slow) if d in SLOW_DTYPES else d
                                   for d in SMOLLM_DTYPES])
def test_smollm_greedy_lossless_in_every_dtype(smollm_in, dtype, name):
    model = smollm_in(dtype)
    drafted = check(model, DRAFTERS[name](model), FAST_PROMPTS, N_NEW, name)
    assert drafted > 0, f"{name} never drafted on {dtype}: the comparison would prove nothing"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DRAFTERS))
@pytest.mark.parametrize("dtype", SMOLLM_DTYPES)
def test_smollm_every_drafter_version_lossless_in_every_dtype(smollm_in, dtype, name):
    model = smollm_in(dtype)
    check(model, DRAFTERS[name](model), SLOW_PROMPTS, SLOW_N_NEW, name)
