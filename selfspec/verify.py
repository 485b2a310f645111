"""Accepting or rejecting a speculative draft.

The drafter proposes k tokens; the target scores all k+1 positions in one forward pass. We keep
the longest acceptable prefix of the draft and add one token of the target's own, so every round
emits between 1 and k+1 tokens.

Sampled verification is the speculative sampling rule of Leviathan et al. 2023 ("Fast Inference
from Transformers via Speculative Decoding") and Chen et al. 2023 ("Accelerating Large Language
Model Decoding with Speculative Sampling"): accept draft token d with probability
min(1, p(d) / q(d)), and on rejection draw from norm(max(0, p - q)). The emitted tokens are then
distributed exactly as if they had been drawn from the target alone, whatever the drafter does,
as long as q is the distribution the draft token was really drawn from. Convention: p is the
target, q the draft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfspec.sampling import sample

__all__ = ["TargetChoice", "Verdict", "verify_chain", "verify_greedy", "verify_sampled"]


@dataclass(frozen=True, eq=False)
class TargetChoice:
    """What the target chose at each row of a verify forward: its greedy tokens `[rows]` (greedy
    decoding), or its distributions p `[rows, vocab]` (sampling). Exactly one is set."""

    tokens: torch.Tensor | None = None
    p: torch.Tensor | None = None


# eq=False: the generated __eq__ would compare tensors and fail on `bool(tensor)`; identity is the
# only equality that makes sense here.
@dataclass(frozen=True, eq=False)
class Verdict:
    """Outcome of verifying one draft.

    accepted: how many draft tokens were kept (0..k).
    tokens: [accepted + 1] the kept drafts followed by the target's correction (after a
        rejection) or bonus token (when every draft was kept).
    """

    accepted: int
    tokens: torch.LongTensor

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or self.tokens.numel() != self.accepted + 1:
            raise ValueError(
                f"tokens must be 1-D with accepted + 1 = {self.accepted + 1} entries, got shape "
                f"{tuple(self.tokens.shape)}."
            )


def _check_draft(draft_tokens: torch.Tensor) -> int:
    if draft_tokens.dim() != 1:
        raise ValueError(f"draft_tokens must be 1-D, got shape {tuple(draft_tokens.shape)}.")
    return draft_tokens.numel()


def verify_greedy(draft_tokens: torch.LongTensor, target_tokens: torch.LongTensor) -> Verdict:
    """Keep drafts while they equal the target's greedy choice.

    draft_tokens [k]; target_tokens [k+1], the target's argmax at each position (the last one
    follows the full draft). The new token is target_tokens[accepted].
    """
    k = _check_draft(draft_tokens)
    if target_tokens.shape != (k + 1,):
        raise ValueError(
            f"target_tokens must have shape ({k + 1},) for {k} drafts, got "
            f"{tuple(target_tokens.shape)}."
        )
    target_tokens = target_tokens.long()
    matches = draft_tokens.to(target_tokens.device).long() == target_tokens[:k]
    accepted = int(torch.cumprod(matches.to(torch.int32), dim=0).sum())
    # The accepted drafts equal the target's tokens, so the whole answer is a prefix of them.
    return Verdict(accepted=accepted, tokens=target_tokens[: accepted + 1].clone())


def verify_sampled(
    draft_tokens: torch.LongTensor,
    q_draft: torch.Tensor | None,
    p_target: torch.Tensor,
    generator: torch.Generator,
) -> Verdict:
    """Speculative sampling: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)).

    draft_tokens [k] were drawn from q_draft [k, vocab], the drafter's distributions after the
    same sampling transform the target uses; None means a deterministic drafter (q is one-hot on
    the draft). p_target [k+1, vocab] are the target's distributions; row k gives the bonus token.
    Rows need not be normalised exactly. All randomness comes from `generator`.
    """
    k = _check_draft(draft_tokens)
    if p_target.dim() != 2 or p_target.shape[0] != k + 1:
        raise ValueError(
            f"p_target must be [{k + 1}, vocab] for {k} drafts, got shape "
            f"{tuple(p_target.shape)}."
        )
    vocab = p_target.shape[1]
    if q_draft is not None and q_draft.shape != (k, vocab):
        raise ValueError(
            f"q_draft must be [{k}, {vocab}] like p_target, got shape {tuple(q_draft.shape)}."
        )
    device = p_target.device
    drafts = draft_tokens.to(device=device, dtype=torch.long)

    # All k uniforms in one generator call, even though a rejection leaves the rest unused.
    uniforms = torch.rand(k, generator=generator, device=generator.device).tolist()
    column = drafts.unsqueeze(1)  # [k, 1]
    p_of_draft = p_target[:k].gather(1, column).squeeze(1).tolist()
    if q_draft is None:
        q_of_draft = [1.0] * k
    else:
        q_of_draft = q_draft.to(device).gather(1, column).squeeze(1).tolist()
    # k <= 16: a Python loop over k numbers costs less than a chain of tiny tensor ops.
    accepted = 0
    for u, p, q in zip(uniforms, p_of_draft, q_of_draft):
        # u < p/q written without the division; q == 0 means the draft could not have come from
        # q, so it is rejected rather than accepted on a 0/0 or x/0.
        if not (q > 0 and u * q < p):
            break
        accepted += 1

    if accepted == k:
        new_token = sample(p_target[k : k + 1].float(), generator)  # [1]
    else:
        p_row = p_target[accepted].float()  # [vocab]
        if q_draft is None:
            residual = p_row.clone()
            residual[drafts[accepted]] = 0.0  # max(0, p - onehot(d)) is p without d
        else:
            residual = (p_row - q_draft[accepted].to(device).float()).clamp_min(0.0)
        # A zero residual means p == q on this row (reachable only through q(d) == 0 or rounding);
        # p itself is then the right distribution. torch.where avoids a device sync.
        has_mass = residual.sum() > 0
        residual = torch.where(has_mass, residual, p_row)
        new_token = sample(residual.unsqueeze(0), generator)  # [1]

    tokens = torch.cat([drafts[:accepted], new_token.to(device)])
    return Verdict(accepted=accepted, tokens=tokens.to(draft_tokens.device))


def verify_chain(draft_tokens: torch.LongTensor, q_draft: torch.Tensor | None, choice: TargetChoice,
                 generator: torch.Generator) -> Verdict:
    """The verdict on a chain of k drafts (k may be 0) from the target's choice at its k+1 rows."""
    if choice.tokens is not None:
        return verify_greedy(draft_tokens, choice.tokens)
    return verify_sampled(draft_tokens, q_draft, choice.p, generator)
