"""The decode loop (DESIGN.md, "The data path"): prefill, then rounds of propose -> verify all drafts
in one forward pass -> accept -> roll back the cache -> stream. Plain decoding is the same loop
with no drafter (every round proposes nothing).

A round of `decode_tokens` reads as its steps: propose (the drafter), forward (pending token +
drafts, one pass), `target_choice` (logits -> the target's greedy tokens or distributions, the one
place; plain greedy asks the forward for its rows' argmax instead, which a native model finds
without computing every logit exactly: models/greedy_head.py), a pure verdict (`verify_chain` /
`verify_tree`), then one `commit` that owns what the verdict changes in the cache (rollback or
tree compaction) and the hidden state kept for draft heads. Each round yields a `Round` record;
`Generation` turns rounds into text (selfspec/text.py).

`stream(...)` is an iterator of `Chunk`s; when it is exhausted its `.result` holds the whole text,
the token ids and the `SpecStats`. `generate(...)` runs it to the end. The library never prints.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch

from selfspec.drafters.base import EMPTY, Draft, DraftContext, Drafter, declared
from selfspec.errors import ContextOverflowError, InvalidParameterError
from selfspec.models.loading import Model
from selfspec.prefix import PrefixCache
from selfspec.text import TextStream
from selfspec.sampling import (SamplingParams, greedy_tokens, make_generator, presence_mask,
                               probs_from_logits)
from selfspec.verify import TargetChoice, verify_chain
from selfspec.verify_tree import check_tree, tree_presence, verify_tree


@dataclass
class SpecStats:
    """Numbers of one generation; the JSON keys of CONVENTIONS.md."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    load_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    drafter: str = "none"
    dtype: str = "fp32"
    kernel: str = "F.linear"
    isa: str = ""  # the instruction-set family the kernels ran with (selfspec.hardware.isa)
    dtype_reason: str = ""  # why this dtype (what `--dtype auto` chose, or that it was asked for)
    extras: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Decode only: no load, no prefill."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """tau: new tokens per verify round, the bonus/correction token included."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        extras = d.pop("extras")
        d.update(tokens_per_s=self.tokens_per_s, acceptance_rate=self.acceptance_rate,
                 mean_accepted_tokens=self.mean_accepted_tokens)
        d.update(extras)
        return d

    def summary(self) -> str:
        """`40 tokens, 31.2 tok/s (decode), prefill 0.05 s, draft ngram, tau 2.41, accepted 68%`:
        what the CLI prints after a run (each command adds its own parts)."""
        line = (f"{self.new_tokens} tokens, {self.tokens_per_s:.1f} tok/s (decode), prefill {self.prefill_seconds:.2f} s, "
                f"draft {self.drafter}")
        if self.drafter != "none":
            line += f", tau {self.mean_accepted_tokens:.2f}, accepted {100 * self.acceptance_rate:.0f}%"
        return line


@dataclass
class Chunk:
    """Text released by one round and the token ids it produced. `drafted[i]` says whether
    token_ids[i] was a draft token the target accepted (True) or a token the target produced
    itself: the first token, a plain step, the replacement of a rejected draft or the bonus token
    after a fully accepted draft (False). Text can lag the ids (held-back partial characters and
    possible stop strings), so `text` need not be the decoding of `token_ids`."""

    text: str
    token_ids: list[int]
    drafted: list[bool] = field(default_factory=list)
    round: "Round | None" = None  # the verify round that produced token_ids (None: a text-only tail)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string) | "length"
    stats: SpecStats
    prompt_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats.to_dict()}


# ----------------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class Round:
    """What one verify round emitted: `ids` (cut at a stop token or the length limit), of which
    the first `accepted` are draft tokens the target accepted (the rest are the target's own),
    out of `proposed` draft tokens. `finish` is "stop" or "length" on the round that ends the
    generation (its ids may then be empty: a round that produced only the stop token), else None.
    `seconds`: decode time from the first token to the end of this round."""

    ids: list[int]
    accepted: int
    proposed: int
    finish: str | None = None
    seconds: float = 0.0


def target_choice(logits: torch.Tensor, sampling: SamplingParams, history: Sequence[int],
                  drafts: torch.Tensor = EMPTY, layout=None) -> TargetChoice:
    """The target's choice at every row of a verify forward (`logits` `[rows, vocab]`): greedy
    tokens, or the distributions to sample from. The repetition penalty at a row sees `history`
    and the drafts on the row's own path: a chain's earlier drafts, or a tree node's ancestors
    (`layout`). Pure: the one place logits become the target's choice."""
    presence = None
    if sampling.repetition_penalty != 1.0:
        vocab = logits.shape[-1]
        hist = torch.tensor(list(history), dtype=torch.long, device="cpu" if layout is not None else logits.device)
        if layout is not None:
            presence = tree_presence(hist, drafts, layout, vocab).to(logits.device)
        else:
            presence = presence_mask(hist, drafts, vocab)
    if sampling.greedy:
        return TargetChoice(tokens=greedy_tokens(logits, sampling, presence))
    return TargetChoice(p=probs_from_logits(logits, sampling, presence))


def decode_tokens(model: Model, prompt_ids: Sequence[int], drafter: Drafter | None,
                  sampling: SamplingParams, max_new_tokens: int, stats: SpecStats,
                  stop_ids: set[int] | None = None, prefix: PrefixCache | None = None) -> Iterator[Round]:
    """Yield a `Round` for each verify round. Ends at a stop token (not yielded) or after
    `max_new_tokens`; the last Round says which (`finish`). The request must have been checked
    (`check_request`: `Generation` does). With `prefix`, the KV of the longest prompt prefix it
    holds is reused and only the rest of the prompt is processed (selfspec/prefix.py);
    stats.extras counts both (`cached_prompt_tokens`, `prefill_tokens`). Fills the stats of the
    forwards (drafted, accepted, timings); the rounds and new tokens are the consumer's to count."""
    stop_ids = model.eos_token_ids if stop_ids is None else stop_ids
    tr = model.transformer
    cache, reused = (model.fresh_cache(), 0) if prefix is None else prefix.begin(prompt_ids)
    if drafter is not None:
        drafter.reset()
    device = tr.device  # every tensor below is made there (a GPU's: no host copy per step)
    generator = make_generator(sampling.seed, device)
    tokens = list(prompt_ids)
    ctx = DraftContext(model=model, cache=cache, tokens=tokens, sampling=sampling, generator=generator)
    # The sequence's ids as a tensor too, written in place: a round's forward input is a slice of
    # it (pending token + drafts), never a freshly built tensor.
    ids = torch.empty(cache.max_len + 1, dtype=torch.long, device=device)
    ids[: len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
    # Plain greedy decoding needs no verdict: the next token is the target's choice at the one row.
    fast_greedy = sampling.plain_greedy
    # Draft heads (drafters/heads.py) read the final hidden state of the row that produced the
    # pending token: each forward then returns the rows' hidden states too, and commit keeps one.
    wants_hidden = drafter is not None and bool(declared(drafter, "wants_hidden"))
    hidden: torch.Tensor | None = None

    def forward(x: torch.Tensor, pos: int, **kw) -> torch.Tensor:
        nonlocal hidden
        if not wants_hidden:
            return tr.forward(x, pos, cache, **kw)
        out, hidden = tr.forward(x, pos, cache, return_hidden=True, **kw)
        return out

    def choose(x: torch.Tensor, pos: int, drafts: torch.Tensor = EMPTY, layout=None, **kw) -> TargetChoice:
        """The target's choice at every row of a forward over x. Plain greedy needs only each
        row's argmax: the forward returns it (Transformer.forward's `argmax`: on a native model
        most logits are never computed exactly, models/greedy_head.py), the same tokens as
        `target_choice` takes from the full logits."""
        if fast_greedy:
            return TargetChoice(tokens=forward(x, pos, argmax=True, **kw))
        return target_choice(forward(x, pos, **kw), sampling, tokens, drafts, layout)

    def commit(start: int, path: Sequence[int]) -> int:
        """The round's verdict takes effect: the cache keeps the pending token (at `start`) and the
        accepted draft nodes `path` (indices into the round's drafts, in order) at start + 1, ...,
        nothing beyond; the kept hidden state is the last accepted row's. Returns the number of
        valid cache positions."""
        cache.compact(start + 1, [start + 1 + i for i in path])
        if wants_hidden:
            ctx.hidden = hidden[path[-1] + 1 if path else 0]
            ctx.hidden_for = start + 2 + len(path)  # len(tokens) once the round's tokens are in
        return start + 1 + len(path)

    stats.extras.update(cached_prompt_tokens=reused, prefill_tokens=len(tokens) - reused, device=str(device))
    greedy_head = getattr(tr, "argmax_head", None) if fast_greedy else None
    head_before = greedy_head.tally() if greedy_head is not None else None
    t0 = time.perf_counter()
    # The prefill is the verify of an empty draft after the prompt's last token (the pending one).
    start = len(tokens) - 1
    verdict = verify_chain(EMPTY, None, choose(ids[reused: len(tokens)], reused, last_only=True), generator)
    # Positions [0, valid) of the cache hold the KV of ids[:valid]: only what a verify accepted
    # counts (drafts and rejected positions lie beyond). It is what `prefix` keeps at the end.
    valid = commit(start, ())
    stats.prefill_seconds = time.perf_counter() - t0
    t_decode = time.perf_counter()
    produced = 0
    new, new_ids, accepted, proposed = verdict.tokens.tolist(), verdict.tokens, 0, 0
    try:
        while True:
            # Emit this round's tokens, cut at a stop token or the length limit.
            out, finish = [], None
            for tok in new:
                if tok in stop_ids:
                    finish = "stop"
                    break
                out.append(tok)
                if produced + len(out) >= max_new_tokens:
                    finish = "length"
                    break
            produced += len(out)
            stats.decode_seconds = time.perf_counter() - t_decode
            if out or finish:
                yield Round(out, min(accepted, len(out)), proposed, finish, stats.decode_seconds)
            if finish:
                return
            if new_ids is None:  # one token: a plain decoding step
                ids[len(tokens)] = new[0]
            else:
                ids[len(tokens): len(tokens) + len(new)] = new_ids
            tokens.extend(new)  # the last one is pending: not in the cache yet
            start = len(tokens) - 1

            room = min(max_new_tokens - produced - 1, cache.max_len - len(tokens))
            draft = Draft(EMPTY)
            if drafter is not None and room > 0:
                t = time.perf_counter()
                draft = drafter.propose(ctx, room)
                stats.draft_seconds += time.perf_counter() - t
                cache.rollback(start)  # a drafter may leave draft KV beyond the pending token
            t = time.perf_counter()
            k = len(draft)
            if k == 0 and fast_greedy:  # a plain step: the choice at the one row is the token
                tok = int(choose(ids[start: start + 1], start).tokens[0])
                valid = commit(start, ())
                stats.verify_seconds += time.perf_counter() - t
                if drafter is not None:
                    drafter.update(0, 0)
                new, new_ids, accepted, proposed = [tok], None, 0, 0
                continue
            ids[start + 1: start + 1 + k] = draft.tokens
            if draft.parents is not None:  # a token tree: k nodes in one forward
                layout = check_tree(draft, model.config.vocab_size)
                choice = choose(ids[start: start + 1 + k], start, draft.tokens, layout, tree=layout)  # k+1 rows
                verdict = verify_tree(layout, draft, choice, generator)
                path = verdict.path
            else:
                choice = choose(ids[start: start + 1 + k], start, draft.tokens)  # k+1 rows
                verdict = verify_chain(draft.tokens, draft.q_draft, choice, generator)
                path = range(verdict.accepted)
            valid = commit(start, path)
            stats.verify_seconds += time.perf_counter() - t
            stats.drafted += k
            stats.accepted += verdict.accepted
            if drafter is not None:
                drafter.update(verdict.accepted, k)
            new, new_ids, accepted, proposed = verdict.tokens.tolist(), verdict.tokens, verdict.accepted, k
    finally:
        stats.decode_seconds = time.perf_counter() - t_decode
        if prefix is not None:
            prefix.finish(ids[:valid].tolist())
        if drafter is not None:
            stats.extras.update(drafter.extra_stats())
        if greedy_head is not None:  # the native LM head's greedy path (models/greedy_head.py)
            stats.extras.update(greedy_head=greedy_head.since(head_before))
        native_fallback = getattr(model, "load_info", {}).get("native_fallback")
        if native_fallback is not None:  # --dtype native: formats dequantised to fp32 (none: all native)
            stats.extras.update(native_fallback=native_fallback)
        if hasattr(tr, "compile_status"):  # --compile: what happened, and what it cost so far
            stats.extras.update(compile=tr.compile_status, compile_seconds=tr.compile_seconds)


def check_request(model: Model, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidParameterError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if len(prompt_ids) == 0:
        raise InvalidParameterError("the prompt is empty; give at least one token of text")
    if len(prompt_ids) + max_new_tokens > model.ctx_size:
        raise ContextOverflowError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{len(prompt_ids) + max_new_tokens} exceeds the context of {model.ctx_size} tokens; "
            f"shorten the prompt, lower --max-new-tokens or raise --ctx-size"
        )
    bad = [t for t in prompt_ids if not 0 <= int(t) < model.config.vocab_size]
    if bad:
        raise InvalidParameterError(f"prompt token ids {bad[:5]} are outside the vocabulary of {model.config.vocab_size}")


class Generation:
    """Iterator over `Chunk`s of one generation; `.result` is set when it is exhausted."""

    def __init__(self, model: Model, prompt_ids: list[int], drafter: Drafter | None,
                 sampling: SamplingParams, max_new_tokens: int, stop: Sequence[str],
                 ignore_eos: bool = False, prefix: PrefixCache | None = None) -> None:
        self.model = model
        self.prefix = prefix
        self.prompt_ids = prompt_ids
        self.stats = SpecStats(prompt_tokens=len(prompt_ids), load_seconds=model.load_seconds,
                               drafter=getattr(drafter, "name", "none") if drafter else "none",
                               dtype=model.dtype, kernel=model.kernel, isa=getattr(model, "isa", ""),
                               dtype_reason=getattr(model, "dtype_reason", ""))
        self.result: GenerationResult | None = None
        check_request(model, prompt_ids, max_new_tokens)
        self._iter = self._run(drafter, sampling, max_new_tokens, stop, set() if ignore_eos else None)

    def __iter__(self) -> Iterator[Chunk]:
        return self._iter

    def __next__(self) -> Chunk:
        return next(self._iter)

    def close(self) -> None:
        """Stop early. The decode loop ends now (its cleanup runs: the stats, what a prefix cache
        keeps), not whenever the garbage collector gets to this object's reference cycle."""
        self._iter.close()

    def _run(self, drafter, sampling, max_new_tokens, stop, stop_ids) -> Iterator[Chunk]:
        text = TextStream(self.model.tokenizer, stop)
        stats = self.stats
        ids: list[int] = []
        finish = "length"
        rounds = decode_tokens(self.model, self.prompt_ids, drafter, sampling, max_new_tokens, stats, stop_ids,
                               self.prefix)
        for r in rounds:
            drafted = [i < r.accepted for i in range(len(r.ids))]
            if r.ids:  # a round that only produced the stop token emitted nothing: not counted
                stats.rounds += 1
            ids.extend(r.ids)
            delta = text.push(r.ids)
            if text.stopped:  # a stop string: nothing after it, its ids included
                finish = "stop"
                ids = text.ids_through_stop()
                stats.new_tokens = len(ids)
                rounds.close()
                if delta:
                    yield Chunk(delta, r.ids, drafted, r)
                break
            stats.new_tokens = len(ids)
            finish = r.finish or finish
            if delta or r.ids:
                yield Chunk(delta, r.ids, drafted, r)
        else:
            tail = text.finish()
            if tail:
                yield Chunk(tail, [])
        self.result = GenerationResult(text=text.text[: text.sent] if text.stopped else text.text,
                                       token_ids=ids, finish_reason=finish, stats=stats,
                                       prompt_ids=self.prompt_ids)


def _prompt_ids(model: Model, prompt, messages, chat, system) -> list[int]:
    if messages is not None:
        return model.encode_messages(messages)
    if isinstance(prompt, str):
        return model.encode(prompt, chat=chat, system=system)
    if prompt is None:
        raise InvalidParameterError("give a prompt (text or token ids) or messages")
    return [int(t) for t in prompt]


def stream(model: Model, prompt: str | Sequence[int] | None = None, *, messages: list[dict] | None = None,
           drafter: Drafter | None = None, sampling: SamplingParams | None = None,
           max_new_tokens: int = 128, stop: Sequence[str] = (), chat: bool | None = None,
           system: str | None = None, ignore_eos: bool = False, prefix: PrefixCache | None = None) -> Generation:
    """Stream a generation. `prompt` is text (chat template applied when the model has one and
    chat is not False) or a list of token ids (used as is). `ignore_eos` decodes past end-of-text
    tokens (benchmarks of a fixed length). `prefix` reuses the KV of earlier generations' common
    prompt prefix (selfspec/prefix.py)."""
    ids = _prompt_ids(model, prompt, messages, chat, system)
    return Generation(model, ids, drafter, sampling or SamplingParams(), max_new_tokens, stop, ignore_eos, prefix)


def generate(model: Model, prompt: str | Sequence[int] | None = None, **kwargs) -> GenerationResult:
    """Generate to the end; same arguments as `stream`."""
    gen = stream(model, prompt, **kwargs)
    for _ in gen:
        pass
    return gen.result
