"""Classic speculative decoding with a separate, smaller draft model that shares the target's
tokenizer. The draft model has its own KV cache, kept in step with the target's sequence: before
each proposal it rolls back to the longest prefix it has already seen and feeds the rest."""
from __future__ import annotations

import torch

from selfspec.drafters.base import Draft, DraftContext, Drafter, stack_draft
from selfspec.errors import DrafterError, InvalidParameterError


def check_same_vocab(target, draft) -> None:
    """Token ids must mean the same text in both models, or verification compares nonsense."""
    t_vocab, d_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if t_vocab != d_vocab:
        only_t = len(set(t_vocab.items()) - set(d_vocab.items()))
        raise DrafterError(
            f"draft model {draft.name!r} has a different tokenizer than {target.name!r} "
            f"({len(d_vocab)} vs {len(t_vocab)} tokens, {only_t} entries differ); "
            f"a draft model must share the target's vocabulary"
        )
    if draft.config.vocab_size != target.config.vocab_size:
        raise DrafterError(
            f"draft model {draft.name!r} outputs {draft.config.vocab_size} logits, the target "
            f"{target.config.vocab_size}; they must match"
        )


class DraftModelDrafter(Drafter):
    name = "model"

    def __init__(self, draft_model, max_draft: int = 5, target=None) -> None:
        if max_draft < 1:
            raise InvalidParameterError(f"--max-draft must be >= 1, got {max_draft}")
        if target is not None:
            check_same_vocab(target, draft_model)
        self.model = draft_model
        self.max_draft = max_draft
        self.cache = draft_model.transformer.new_cache(draft_model.ctx_size)
        self.seen: list[int] = []  # tokens whose KV is in self.cache, in order

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        tr = self.model.transformer
        seq = ctx.tokens
        if len(seq) + max_tokens > self.cache.max_len:
            max_tokens = self.cache.max_len - len(seq)
        limit = min(self.max_draft, max_tokens)
        if limit <= 0:
            return stack_draft([], [])
        keep = _common_prefix(self.seen, seq, len(seq) - 1)
        self.cache.rollback(keep)
        self.seen = self.seen[:keep]  # still true if the forward below is interrupted
        feed = torch.tensor(seq[keep:], dtype=torch.long, device=tr.device)
        greedy = ctx.sampling.plain_greedy  # the forward returns the argmax itself (no logits needed)
        out = tr.forward(feed, keep, self.cache, last_only=True, argmax=greedy)
        self.seen = list(seq)
        tokens: list[int] = []
        q_rows: list[torch.Tensor | None] = []
        for i in range(limit):
            tok, q = (int(out[-1]), None) if greedy else ctx.choose(out, tokens)
            tokens.append(tok)
            q_rows.append(q)
            if i + 1 < limit:
                out = tr.forward(torch.tensor([tok], device=tr.device), len(self.seen), self.cache, argmax=greedy)
                self.seen.append(tok)
        return stack_draft(tokens, q_rows)

    def update(self, accepted: int, proposed: int) -> None:
        pass

    def reset(self) -> None:
        # The draft KV stays: the next sequence re-syncs to its longest common prefix with what
        # is cached, so a conversation's next turn (or a request sharing a prompt prefix) does not
        # make the draft model read the whole context again.
        pass

    def extra_stats(self) -> dict:
        return {"draft_model": self.model.name}


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
