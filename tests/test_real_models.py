"""Our decoder on the real embedded models against transformers reading the same GGUF."""
from __future__ import annotations

import os

import pytest
import torch

from selfspec.generation import generate


def hf_reference(model):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF files")
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(str(model.path))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def check_parity(model, prompt: str, n_steps: int = 4, n_greedy: int = 32):
    hf = hf_reference(model)
    ids = model.encode(prompt)
    tr = model.transformer
    cache = tr.new_cache(256)
    ours = tr.forward(torch.tensor(ids), 0, cache)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    # Dequantised weights are identical; only summation order differs (oneDNN vs MKL kernels).
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)
    seq = list(ids)
    for _ in range(n_steps):  # incremental decode steps against a full recomputation
        nxt = int(ours[-1].argmax())
        seq.append(nxt)
        ours = tr.forward(torch.tensor([nxt]), len(seq) - 1, cache)
        with torch.inference_mode():
            ref = hf(torch.tensor([seq])).logits[0, -1:]
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)
    result = generate(model, ids, max_new_tokens=n_greedy, ignore_eos=True)
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n_greedy, min_new_tokens=n_greedy, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert result.token_ids == out


def test_smollm_matches_transformers(smollm):
    check_parity(smollm, "What is the capital of France?")


@pytest.mark.slow
def test_gemma_matches_transformers(gemma):
    check_parity(gemma, "The three primary colours are")
