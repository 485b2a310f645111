"""A draft LM head over part of the vocabulary.

Every draft step pays the full LM head: 113 MB of fp32 weights for SmolLM2's 49k tokens, 671 MB
for Gemma-3's 262k, which is most of Gemma-3-270M's step. A draft may propose from any subset
of tokens without breaking losslessness: verification still scores the full vocabulary, and under
sampling q is exactly the distribution the draft was drawn from (zero outside the subset). The
subset: the tokens of the current context plus the most frequent tokens of a calibration text
every machine has, the Python standard library's own source (code, comments and docstrings).
"""
from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import torch

from selfspec.paths import atomic_write_json
from selfspec.paths import cache_dir

CALIBRATION_BYTES = 2_000_000


def calibration_text(limit: int = CALIBRATION_BYTES) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for f in sorted(root.glob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "\n".join(parts)


def frequency_ranking(model) -> list[int]:
    """Token ids seen in the calibration text, most frequent first (cached per model file)."""
    key = hashlib.sha256(f"{Path(model.path).resolve()}|{model.config.vocab_size}".encode()).hexdigest()[:20]
    path = cache_dir() / "vocab" / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    ids = torch.tensor(model.tokenizer(calibration_text(), add_special_tokens=False).input_ids, device="cpu")
    ids = ids[(ids >= 0) & (ids < model.config.vocab_size)]
    counts = torch.bincount(ids, minlength=model.config.vocab_size)
    order = torch.argsort(counts, descending=True, stable=True)
    ranking = order[: int((counts > 0).sum())].tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, ranking, indent=None)
    return ranking


class SubsetHead:
    """Draft LM head over `ids` (sorted token ids); `logits` maps its output back to the full
    vocabulary with -inf elsewhere, so sampling transforms and verification see ordinary rows."""

    def __init__(self, transformer, ids: torch.Tensor) -> None:
        from selfspec.models.quant import Int8Linear, dense_weight
        from selfspec.models.transformer import make_linear

        self.ids = ids.to(transformer.device)  # [n]
        self.vocab = transformer.config.vocab_size
        full = transformer.lm_head
        # GGUF-native blocks: the same blocks through a row map (dequantising the whole head to
        # pick rows cost seconds and ~1 GB per sequence on the Qwen 1.5B's 152k-row head, and the
        # fp32 subset read as many bytes per token as the full 6-bit head)
        select = getattr(full, "select_rows", None)
        self.linear = select(self.ids) if select is not None else None
        if self.linear is None:
            weight = dense_weight(full)[self.ids].contiguous()  # [n, hidden]
            bias = None if full.bias is None else full.bias[self.ids]
            self.linear = Int8Linear(weight, bias) if isinstance(full, Int8Linear) else make_linear(weight, bias)

    def to_full(self, sub_logits: torch.Tensor) -> torch.Tensor:
        out = torch.full((sub_logits.shape[0], self.vocab), float("-inf"), device=sub_logits.device)
        return out.index_copy_(1, self.ids, sub_logits)


def subset_ids(model, context: list[int], size: int) -> torch.Tensor:
    """Sorted ids: the context's tokens plus the most frequent calibration tokens, `size` in all
    (or fewer when the calibration text has fewer distinct tokens)."""
    chosen = set(int(t) for t in context)
    for t in frequency_ranking(model):
        if len(chosen) >= size:
            break
        chosen.add(t)
    return torch.tensor(sorted(chosen), dtype=torch.long, device="cpu")
