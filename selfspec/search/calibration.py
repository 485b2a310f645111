"""Calibration for the skip search: the prompts a search measures on, and the two measurements a
trial makes on one loaded model (never reloaded between trials): decode tokens/s of
self-speculative generation, and SWIFT's match rate (Xia et al., ICLR 2025)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from selfspec.drafters.layerskip import AdaptiveExit, LayerSkipDrafter, SkipConfig
from selfspec.models.quant import draft_view
from selfspec.errors import InvalidParameterError
from selfspec.generation import generate
from selfspec.jsonl import NonBlank, Row, read_rows
from selfspec.models.transformer import SkipSet
from selfspec.sampling import SamplingParams


def calibration_prompts(prompts: str | Path | None = None, suite: str | None = None) -> tuple[list[str], str]:
    """(prompt texts, where they came from): `prompts` (a JSONL file), a bench suite by name, or
    the calibration set shipped in the package (distinct from the benchmark prompts)."""
    if prompts is not None and suite is not None:
        raise InvalidParameterError("give either --prompts or --suite, not both")
    if suite is not None:
        res = resources.files("selfspec").joinpath("data", "suites", f"{suite}.jsonl")
        if not res.is_file():
            raise InvalidParameterError(f"no bench suite named {suite!r} (selfspec/data/suites/{suite}.jsonl)")
        text, source = res.read_text(), f"suite:{suite}"
    elif prompts is not None:
        try:
            text, source = Path(prompts).read_text(), str(prompts)
        except OSError as e:
            raise InvalidParameterError(f"cannot read --prompts {prompts}: {e.strerror}") from None
    else:
        text, source = resources.files("selfspec").joinpath("data", "calibration.jsonl").read_text(), "calibration"
    return [row.prompt for row in read_rows(text, source, PromptRow)], source


class PromptRow(Row):
    """A calibration prompt: `{"prompt": str}` (other keys, e.g. id and category, ignored)."""

    prompt: NonBlank


class Calibration:
    """The measurements a trial makes, on one loaded model (never reloaded between trials)."""

    def __init__(self, model, prompt_ids: list[list[int]], sampling: SamplingParams, settings):
        self.model = model
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.settings = settings
        self.plain_ids: list[list[int]] = []
        self._match: list[tuple] | None = None
        self.bits = getattr(settings, "draft_bits", None)
        if self.bits is not None:
            from selfspec.hardware import check_cpu_only

            check_cpu_only("search --draft quantized", model.device)
        # A precision self-draft's low-bit copy, built once for all trials.
        self.draft_tr = model.transformer if self.bits is None else draft_view(model.transformer, self.bits)

    def _run(self, drafter) -> dict:
        new = seconds = rounds = drafted = accepted = differs = 0
        if drafter is None:
            self.plain_ids = []
        from selfspec.progress import Bar

        what = "plain decoding" if drafter is None else "self-speculative decoding"
        with Bar(f"{what} on the calibration prompts", len(self.prompt_ids), delay=2.0) as bar:
            for k, ids in enumerate(self.prompt_ids):
                r = generate(self.model, ids, drafter=drafter, sampling=self.sampling,
                             max_new_tokens=self.settings.max_new_tokens, ignore_eos=True)
                s = r.stats
                new, seconds, rounds = new + s.new_tokens, seconds + s.decode_seconds, rounds + s.rounds
                drafted, accepted = drafted + s.drafted, accepted + s.accepted
                if drafter is None:
                    self.plain_ids.append(r.token_ids)
                elif self.sampling.greedy and r.token_ids != self.plain_ids[k]:
                    differs += 1
                bar.advance()
        return {"tokens_per_s": new / seconds if seconds else 0.0, "tau": new / rounds if rounds else 0.0,
                "acceptance_rate": accepted / drafted if drafted else 0.0, "differs_from_plain": differs}

    def baseline(self) -> float:
        """Plain decoding tokens/s, after one warm-up generation (first calls pay kernel set-up)."""
        generate(self.model, self.prompt_ids[0], sampling=self.sampling, max_new_tokens=4, ignore_eos=True)
        return self._run(None)["tokens_per_s"]

    def drafter(self, skip: SkipSet) -> LayerSkipDrafter:
        config = SkipConfig(model=self.model.name, n_layers=self.model.config.n_layers,
                            attention=tuple(sorted(skip.attention)), mlp=tuple(sorted(skip.mlp)),
                            draft_bits=self.bits)
        return LayerSkipDrafter(config, max_draft=self.settings.max_draft, exit=AdaptiveExit(),
                                draft_vocab=self.settings.draft_vocab,
                                low_bit_view=None if self.bits is None else (self.model.transformer, self.draft_tr))

    def tokens_per_s(self, skip: SkipSet) -> tuple[float, dict]:
        stats = self._run(self.drafter(skip))
        return stats["tokens_per_s"], stats

    def match_rate(self, skip: SkipSet) -> tuple[float, dict]:
        """SWIFT's matchness: the draft runs once over the generated tokens (attending to the full
        model's KV of the prompt, as it does when drafting) and its top-1 is compared with the
        full model's top-1 at every position."""
        if self._match is None:
            self._match = [self._teacher(ids, out) for ids, out in zip(self.prompt_ids, self.plain_ids)]
        hits = total = 0
        for start, inputs, cache, full_top in self._match:
            cache.rollback(start)
            draft_top = self.draft_tr.forward(inputs, start, cache, skip=skip).argmax(-1)  # [W]
            hits += int((draft_top == full_top).sum())
            total += full_top.numel()
        return hits / total, {"positions": total}

    def _teacher(self, prompt: list[int], generated: list[int]):
        """Full-model KV of the prompt and the full model's top-1 over the generated window."""
        tr = self.model.transformer
        context = list(prompt) + list(generated)
        start = len(prompt) - 1  # the input at `start` predicts the first generated token
        cache = tr.new_cache(len(context))
        if start:
            tr.forward(torch.tensor(context[:start], device=tr.device), 0, cache, last_only=True)
        inputs = torch.tensor(context[start:-1], device=tr.device)  # [W]
        full_top = tr.forward(inputs, start, cache).argmax(-1)
        return start, inputs, cache, full_top
