"""Self-distillation data: the model's own continuations of prompts (no dataset download).

Each prompt is continued by the full model with our own lossless speculative `generate`: the
first pass over the prompts greedily (what greedy decoding will ask the drafter to predict), further
passes sampled at temperature 0.8 for variety when more sequences than prompts are asked for.
Training labels are not these tokens but the target's argmax at every position
(selfspec/drafters/trained/kinds.py), so sampled sequences still teach the greedy choice. The token
sequences are cached under the cache folder, keyed by the model's hash, the prompts and settings.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import model_validator

from selfspec.errors import InvalidParameterError
from selfspec.jsonl import Row, read_rows
from selfspec.paths import atomic_write_json
from selfspec.paths import cache_dir
from selfspec.progress import Bar

SAMPLED_TEMPERATURE = 0.8


def read_data_file(path: str | Path) -> tuple[list[str], list[str]]:
    """A JSONL file of {"prompt": str} rows (continued by the model) and/or {"text": str} rows
    (used as they are): (prompts, texts)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InvalidParameterError(f"cannot read --data {path}: {e.strerror}") from None
    prompts, texts = [], []
    for row in read_rows(text, f"--data {path}", DataRow):
        (prompts if row.is_prompt else texts).append(row.prompt if row.is_prompt else row.text)
    return prompts, texts


class DataRow(Row):
    """A distillation row: `{"prompt": str}` (continued by the model) or `{"text": str}`."""

    prompt: str | None = None
    text: str | None = None

    @property
    def is_prompt(self) -> bool:
        return bool(self.prompt and self.prompt.strip())

    @model_validator(mode="after")
    def _prompt_or_text(self):
        if not self.is_prompt and not (self.text and self.text.strip()):
            raise ValueError('has neither a "prompt" nor a "text" string')
        return self


def _drafter(model):
    """auto where it can be built (fastest, lossless), else prompt lookup."""
    from selfspec.errors import SelfspecError
    from selfspec.drafters.factory import build_drafter

    try:
        return build_drafter("auto", model)
    except SelfspecError:
        return build_drafter("ngram", model)


def distill(model, prompts: list[list[int]], n: int, max_new_tokens: int, seed: int = 0,
            progress: bool = True) -> tuple[list[list[int]], dict]:
    """`n` sequences (prompt + continuation) over `prompts` (cycled) and what it cost:
    ({"cached": bool, "seconds": float, "new_tokens": int}). Cached per model, prompts and settings."""
    from selfspec.generation import generate
    from selfspec.sampling import SamplingParams
    from selfspec.drafters.trained.store import model_sha256

    if n < 1:
        raise InvalidParameterError(f"--self-distill must be >= 1, got {n}")
    if not prompts:
        raise InvalidParameterError("no prompts to distill from")
    settings = {"n": n, "max_new_tokens": max_new_tokens, "seed": seed, "temperature": SAMPLED_TEMPERATURE}
    key = hashlib.sha256(json.dumps([model_sha256(model), prompts, settings]).encode()).hexdigest()[:24]
    path = cache_dir() / "distill" / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        return cached["sequences"], {"cached": True, "seconds": cached["seconds"], "new_tokens": cached["new_tokens"],
                                     "path": str(path)}
    except (OSError, ValueError, KeyError):
        pass
    drafter = _drafter(model)
    sequences, seconds, new_tokens = [], 0.0, 0
    with Bar("self-distilling", n, enabled=progress, fields="{tps:.1f} tok/s", tps=0.0) as bar:
        for i in range(n):
            prompt = prompts[i % len(prompts)]
            greedy = i < len(prompts)
            sampling = SamplingParams() if greedy else SamplingParams(temperature=SAMPLED_TEMPERATURE, seed=seed * 100003 + i)
            r = generate(model, prompt, drafter=drafter, sampling=sampling,
                         max_new_tokens=min(max_new_tokens, model.ctx_size - len(prompt)))
            sequences.append(list(prompt) + r.token_ids)
            seconds += r.stats.prefill_seconds + r.stats.decode_seconds
            new_tokens += r.stats.new_tokens
            bar.advance(tps=new_tokens / seconds if seconds else 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"sequences": sequences, "seconds": seconds, "new_tokens": new_tokens,
                             "settings": settings}, indent=None)
    return sequences, {"cached": False, "seconds": seconds, "new_tokens": new_tokens, "path": str(path)}
