"""Sampling transforms: turn a model's logits into the distribution a token is drawn from.

Everything here is a pure function of its arguments; randomness comes only from an explicit
`torch.Generator`, so a run with a fixed seed is reproducible and the drafter and the target can
share one transform (speculative sampling is only lossless when both sides use the same one).

The transforms are applied in a fixed order:

    repetition penalty -> temperature -> top-k -> top-p -> min-p

Each filter sees the distribution left by the previous ones (renormalised), as in Hugging Face
`generate`. Greedy decoding (temperature 0) applies only the repetition penalty, because the
other transforms cannot change which token has the largest logit.
"""

from __future__ import annotations

import math
import numbers

import torch

from selfspec.errors import InvalidParameterError
from selfspec.sampling_params import SamplingParams, _check_seed, _integer, _real  # noqa: F401 (re-exported)

__all__ = [
    "SamplingParams",
    "greedy_tokens",
    "make_generator",
    "presence_mask",
    "probs_from_logits",
    "process_logits",
    "sample",
]

# fp32 softmax and cumsum over a large vocabulary are off by a few ulps; without this slack a
# distribution whose head sums to exactly top_p (say 0.5 + 0.3 for top_p = 0.8) would keep one
# token more or fewer depending on rounding.
_TOP_P_SLACK = 1e-6

def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` (the model's: sampling there needs no copy to the host) seeded
    with `seed`, or from OS entropy when `seed` is None. CPU and CUDA generators draw different
    streams: a seed reproduces a run on the same device only."""
    checked = _check_seed(seed)
    generator = torch.Generator(device=device)
    if checked is None:
        generator.seed()
    else:
        generator.manual_seed(checked)
    return generator


def presence_mask(
    history: torch.LongTensor, drafts: torch.LongTensor, vocab: int
) -> torch.BoolTensor:
    """Which tokens the repetition penalty applies to at each of the k+1 verified positions.

    Row i is the set of tokens in `history` plus `drafts[:i]`: the target scores position i as if
    drafts 0..i-1 had already been emitted. Returns a [k+1, vocab] bool tensor on the device of
    `history`.
    """
    if isinstance(vocab, bool) or not isinstance(vocab, numbers.Integral) or vocab <= 0:
        raise ValueError(f"vocab must be a positive integer, got {vocab!r}.")
    if history.dim() != 1 or drafts.dim() != 1:
        raise ValueError(
            f"history and drafts must be 1-D, got shapes {tuple(history.shape)} and "
            f"{tuple(drafts.shape)}."
        )
    for name, ids in (("history", history), ("drafts", drafts)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"{name} holds token ids outside [0, {vocab}).")
    device = history.device
    drafts = drafts.to(device=device, dtype=torch.long)
    k = drafts.numel()
    seen = torch.zeros(vocab, dtype=torch.bool, device=device)
    seen[history.long()] = True
    mask = seen.unsqueeze(0).repeat(k + 1, 1)  # [k+1, vocab]
    # (row, j) for every j < row: draft j is already part of the text at position row.
    rows, cols = torch.tril_indices(k + 1, k, offset=-1, device=device)
    mask[rows, drafts[cols]] = True
    return mask


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, vocab], got shape {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}.")


def _penalised(
    logits: torch.Tensor, params: SamplingParams, presence: torch.BoolTensor | None
) -> torch.Tensor:
    """`logits` in fp32 with the repetition penalty applied.

    May return `logits` itself when there is nothing to do; callers must not write to the result
    without checking.
    """
    _check_logits(logits)
    scores = logits.float()  # [T, vocab]
    if presence is None or params.repetition_penalty == 1.0:
        return scores
    scores = scores.clone() if scores is logits else scores
    presence = presence.to(scores.device).expand_as(scores)
    # The history is a few thousand tokens out of a large vocabulary, so touching only those
    # entries is cheaper than a dense torch.where over [T, vocab].
    rows, cols = presence.nonzero(as_tuple=True)
    hit = scores[rows, cols]
    penalty = params.repetition_penalty
    scores[rows, cols] = torch.where(hit > 0, hit / penalty, hit * penalty)
    return scores


def _top_p_keep(sorted_logits: torch.Tensor, log_norm: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep mask for top-p over candidates sorted in descending order along the last dim.

    `log_norm` [T, 1] is the log of the distribution's total mass, which may include tokens that
    are not among the candidates.
    """
    sorted_probs = torch.exp(sorted_logits - log_norm)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep = mass_before < top_p - _TOP_P_SLACK
    # The most likely token survives whatever top_p is; this also keeps rows that are all -inf
    # from becoming empty here.
    keep[..., 0] = True
    return keep


# Sorting a 262144-token row on a CPU takes hundreds of ms while top-k of this size takes ~20 ms;
# the nucleus of a language model's distribution is usually far smaller than this.
_NUCLEUS_GUESS = 1024


def _nucleus_candidates(scores: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens of each row, sorted, enough of them to hold the top-p nucleus."""
    vocab = scores.shape[-1]
    if vocab > 2 * _NUCLEUS_GUESS:
        cand_logits, cand_ids = torch.topk(scores, _NUCLEUS_GUESS, dim=-1)  # [T, guess]
        log_norm = torch.logsumexp(scores, dim=-1, keepdim=True)  # [T, 1]
        head_mass = torch.exp(cand_logits - log_norm).sum(dim=-1)  # [T]
        if bool((head_mass >= top_p).all()):
            return cand_logits, cand_ids
    return torch.sort(scores, dim=-1, descending=True)  # [T, vocab]


def process_logits(
    logits: torch.Tensor, params: SamplingParams, presence: torch.BoolTensor | None
) -> torch.Tensor:
    """Apply penalty -> temperature -> top-k -> top-p -> min-p to `logits` [T, vocab].

    Returns new fp32 logits [T, vocab] where filtered-out tokens are -inf. `presence` ([T, vocab]
    or [vocab], see `presence_mask`) says where the repetition penalty applies; None skips it.
    For greedy params only the penalty is applied.
    """
    scores = _penalised(logits, params, presence)  # [T, vocab]
    vocab = scores.shape[-1]
    use_top_k = 0 < params.top_k < vocab
    use_top_p = params.top_p < 1.0
    use_min_p = params.min_p > 0.0
    if not params.greedy:
        if params.temperature != 1.0:
            scores = scores / params.temperature
        if use_top_k or use_top_p or use_min_p:
            scores = _filter(scores, params, use_top_k, use_top_p, use_min_p)
    return scores.clone() if scores is logits else scores


def _filter(
    scores: torch.Tensor, params: SamplingParams, use_top_k: bool, use_top_p: bool, use_min_p: bool
) -> torch.Tensor:
    # The filters work on a list of candidates per row: the k best after top-k, the nucleus
    # candidates for top-p, or else the whole vocabulary. Only candidates can survive, so the
    # result is -inf outside them.
    cand_ids = None
    if use_top_k:
        cand_logits, cand_ids = torch.topk(scores, params.top_k, dim=-1)  # [T, top_k], sorted
    elif use_top_p:
        cand_logits, cand_ids = _nucleus_candidates(scores, params.top_p)  # [T, m], sorted
    else:
        cand_logits = scores

    if use_top_p:
        # After top-k the distribution is renormalised over the k survivors; without top-k the
        # candidates may be a subset of the vocabulary, so normalise over the full row.
        log_norm = torch.logsumexp(cand_logits if use_top_k else scores, dim=-1, keepdim=True)
        keep = _top_p_keep(cand_logits, log_norm, params.top_p)
        cand_logits = cand_logits.masked_fill(~keep, -math.inf)
    if use_min_p:
        # p_i / p_max == exp(l_i - l_max), so there is no need to normalise.
        best = cand_logits.max(dim=-1, keepdim=True).values  # [T, 1]
        ratio = torch.exp(cand_logits - best)
        cand_logits = cand_logits.masked_fill(ratio < params.min_p, -math.inf)

    if cand_ids is None:
        return cand_logits
    out = torch.full_like(scores, -math.inf)
    return out.scatter_(-1, cand_ids, cand_logits)


def probs_from_logits(
    logits: torch.Tensor, params: SamplingParams, presence: torch.BoolTensor | None = None
) -> torch.Tensor:
    """The [T, vocab] fp32 distribution the next token is drawn from.

    For greedy params this is a one-hot of the (penalised) argmax, so that greedy decoding is the
    zero-temperature limit and speculative verification can treat both modes alike.
    """
    if params.greedy:
        scores = _penalised(logits, params, presence)
        one_hot = torch.zeros_like(scores)
        return one_hot.scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)
    return torch.softmax(process_logits(logits, params, presence), dim=-1)


def greedy_tokens(
    logits: torch.Tensor, params: SamplingParams, presence: torch.BoolTensor | None = None
) -> torch.LongTensor:
    """[T] argmax of each row after the repetition penalty (ties go to the lowest id)."""
    return _penalised(logits, params, presence).argmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.LongTensor:
    """Draw one token per row of `probs` [T, vocab] (rows need not be normalised) -> [T].

    torch.multinomial needs the generator and the tensor on one device; if they differ, the rows
    are drawn on the generator's device (a copy of `probs`) and the tokens moved back.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [T, vocab], got shape {tuple(probs.shape)}.")
    if probs.device == generator.device:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    moved = probs.to(generator.device)
    tokens = torch.multinomial(moved, 1, generator=generator).squeeze(-1)
    return tokens.to(probs.device)
