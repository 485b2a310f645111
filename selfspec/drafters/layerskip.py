"""Self-speculative drafting (Draft & Verify, Zhang et al., ACL 2024): the draft model is the target
itself with a set of attention/MLP sub-layers bypassed, and drafting stops early when the draft
is unsure (adaptive draft-exiting).

Draft KV entries go into the target's own cache; verification recomputes every layer at those
positions and overwrites them, so rejected drafts are dropped by the usual rollback. No second
copy of the weights exists.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from selfspec.drafters.base import Draft, DraftContext, Drafter, stack_draft
from selfspec.paths import atomic_write_text
from selfspec.errors import InvalidParameterError, SkipConfigError
from selfspec.models.transformer import SkipSet


@dataclass(frozen=True)
class SkipConfig:
    """A skip config: which sub-layers the draft skips, for which model; the JSON that
    `selfspec search` writes and `--skip-config` reads."""

    model: str
    n_layers: int
    attention: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()
    model_sha256: str = ""
    draft_bits: int | None = None
    found_by: str = "hand"
    objective: dict = field(default_factory=dict)
    baseline_tokens_per_s: float | None = None
    search: dict = field(default_factory=dict)
    note: str = ""

    @property
    def skip(self) -> SkipSet:
        return SkipSet.of(self.attention, self.mlp)

    @classmethod
    def from_dict(cls, d: dict, source: str = "skip config") -> "SkipConfig":
        if not isinstance(d, dict):
            raise SkipConfigError(f"{source} must be a JSON object")
        for key in ("model", "n_layers", "attention", "mlp"):
            if key not in d:
                raise SkipConfigError(f"{source} lacks the required key {key!r}")
        n = d["n_layers"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SkipConfigError(f"{source}: n_layers must be a positive integer, got {n!r}")
        for key in ("attention", "mlp"):
            ids = d[key]
            if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
                raise SkipConfigError(f"{source}: {key} must be a list of layer ids, got {ids!r}")
            bad = [i for i in ids if not 0 <= i < n]
            if bad:
                raise SkipConfigError(f"{source}: {key} layer ids {bad} are outside 0..{n - 1}")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["attention"] = tuple(sorted(set(d["attention"])))
        kwargs["mlp"] = tuple(sorted(set(d["mlp"])))
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "SkipConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise SkipConfigError(f"cannot read skip config {path}: {e.strerror}") from None
        except ValueError as e:
            raise SkipConfigError(f"skip config {path} is not valid JSON: {e}") from None
        return cls.from_dict(data, source=f"skip config {path}")

    def check_model(self, model) -> None:
        """Refuse a config made for another model: the layer count, then the model's hash when the
        config records one, else its name."""
        if self.n_layers != model.config.n_layers:
            raise SkipConfigError(
                f"this skip config is for {self.model!r} with {self.n_layers} layers, but "
                f"{model.name!r} has {model.config.n_layers}; run `selfspec search --model {model.name}`"
            )
        # A recorded hash decides (two folders may share a name such as "model"); the name only
        # when the config records none.
        same = self._same_sha(model) if self.model_sha256 else self.model in (model.name, model.path.name)
        if not same:
            raise SkipConfigError(
                f"this skip config is for model {self.model!r}, not {model.name!r}; "
                f"run `selfspec search --model {model.name}`"
            )

    def _same_sha(self, model) -> bool:
        from selfspec.models.registry import REGISTRY, identity_matches

        entry = REGISTRY.get(model.name)
        if entry is not None:
            return self.model_sha256 == entry.sha256
        return identity_matches(self.model_sha256, model.path, "skip config")

    def to_json(self) -> str:
        d = asdict(self)
        d["attention"], d["mlp"] = list(self.attention), list(self.mlp)
        return json.dumps(d, indent=2)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")  # never a half-written config




def shipped_config(alias: str, variant: str | None = None) -> SkipConfig | None:
    """The skip config shipped as package data for a registry model (`variant`: e.g. "int8",
    the file skip-ALIAS-VARIANT.json), if any."""
    name = f"skip-{alias}.json" if not variant else f"skip-{alias}-{variant}.json"
    res = resources.files("selfspec").joinpath("data", name)
    if not res.is_file():
        return None
    return SkipConfig.from_dict(json.loads(res.read_text()), source=f"shipped skip config for {alias}")


from selfspec.drafters.adaptive_exit import AdaptiveExit  # noqa: E402,F401 (torch-free; re-exported)


AUTO_DRAFT_VOCAB = 32768
AUTO_DRAFT_VOCAB_ABOVE = 65536


class LayerSkipDrafter(Drafter):
    name = "layer-skip"

    def __init__(self, config: SkipConfig, max_draft: int = 8, exit: AdaptiveExit | None = None,
                 draft_vocab: int | None = None, low_bit_view: tuple | None = None) -> None:
        """`draft_vocab`: draft from the context's tokens plus this many frequent tokens only
        (a cheaper draft LM head, see drafters/vocab.py); 0 = the whole vocabulary; None = auto:
        32768 for vocabularies over 65536 tokens (Gemma-3: the head is most of a step; 1.22x
        instead of 0.88x in docs/benchmarks.md), else the whole vocabulary.
        `low_bit_view`: (target transformer, its draft_bits view) already built, shared by the
        drafters of one search so the low-bit copy is made once; else built on first use."""
        if max_draft < 1:
            raise InvalidParameterError(f"--max-draft must be >= 1, got {max_draft}")
        if draft_vocab is not None and draft_vocab < 0:
            raise InvalidParameterError(f"--draft-vocab must be >= 0, got {draft_vocab}")
        self.draft_vocab = draft_vocab
        self._head = None  # SubsetHead of the current sequence
        if config.draft_bits not in (None, 8, 4):
            raise SkipConfigError(f"draft_bits {config.draft_bits} is not supported; use null (full precision), 8 or 4")
        self.config = config
        self.skip = config.skip
        self.max_draft = max_draft
        self.exit = exit or AdaptiveExit()
        self._hit_max = False
        self._draft = low_bit_view  # (target transformer, its low-bit view) when draft_bits is set

    @classmethod
    def for_model(cls, model, skip_config: str | Path | SkipConfig | None = None, **kwargs) -> "LayerSkipDrafter":
        variant = None
        if isinstance(skip_config, (str, Path)) and not Path(skip_config).exists():
            variant = shipped_config(model.name, str(skip_config))  # a shipped variant by name, e.g. "int8"
        if isinstance(skip_config, SkipConfig):
            config = skip_config
        elif variant is not None:
            config = variant
        elif skip_config is not None:
            config = SkipConfig.load(skip_config)
        else:
            config = shipped_config(model.name)
            if config is None:
                raise SkipConfigError(
                    f"no skip config ships for {model.name!r}; find one with "
                    f"`selfspec search --model {model.name} --out skip.json` and pass --skip-config skip.json"
                )
        config.check_model(model)
        return cls(config, **kwargs)

    def draft_transformer(self, target):
        """The decoder that drafts: the target itself, or its `draft_bits` view (built once per
        target). A target already quantised to draft_bits or fewer (--dtype int8/int4) drafts
        with itself: a copy would be the same weights (or more bytes) at no gain."""
        if self.config.draft_bits is None:
            return target
        if self._draft is None or self._draft[0] is not target:
            from selfspec.hardware import check_cpu_only
            from selfspec.models.quant import draft_view

            check_cpu_only(f"a skip config with draft_bits {self.config.draft_bits}", target.device)
            self._draft = (target, draft_view(target, self.config.draft_bits))
        return self._draft[1]

    def propose(self, ctx: DraftContext, max_tokens: int) -> Draft:
        tr = self.draft_transformer(ctx.model.transformer)
        limit = min(self.max_draft, max_tokens)
        start = len(ctx.tokens) - 1
        last = ctx.tokens[-1]
        tokens: list[int] = []
        q_rows: list[torch.Tensor | None] = []
        stopped_early = False
        size = self.draft_vocab
        if size is None:
            size = AUTO_DRAFT_VOCAB if ctx.model.config.vocab_size > AUTO_DRAFT_VOCAB_ABOVE else 0
        if size and self._head is None:
            from selfspec.drafters.vocab import SubsetHead, subset_ids

            self._head = SubsetHead(tr, subset_ids(ctx.model, ctx.tokens, size))
        for i in range(limit):
            if self._head is not None:
                sub = tr.forward(torch.tensor([last], device=tr.device), start + i, ctx.cache, skip=self.skip,
                                 head=self._head.linear)
                logits = self._head.to_full(sub)  # [1, vocab], -inf outside the subset
            else:
                sub = logits = tr.forward(torch.tensor([last], device=tr.device), start + i, ctx.cache,
                                          skip=self.skip)  # [1, vocab]
            tok, q = ctx.choose(logits, tokens)
            tokens.append(tok)
            q_rows.append(q)
            last = tok
            # Greedy: the draft's own top probability (over the subset it drafts from: the same
            # value as over the full row, without a softmax over 262k entries for Gemma).
            top = float(q.max()) if q is not None else float(torch.softmax(sub[0], -1).max())
            if top < self.exit.gamma:
                stopped_early = True
                break
        self._hit_max = not stopped_early
        return stack_draft(tokens, q_rows)

    def update(self, accepted: int, proposed: int) -> None:
        self.exit.update(accepted, proposed, self._hit_max)

    def reset(self) -> None:
        self._hit_max = False
        self._head = None  # the subset includes the context's tokens: rebuilt per sequence

    def extra_stats(self) -> dict:
        stats = {"gamma": self.exit.gamma, "skipped_attention": len(self.skip.attention),
                 "skipped_mlp": len(self.skip.mlp)}
        if self._head is not None:
            stats["draft_vocab"] = int(self._head.ids.numel())
        if self._draft is not None:
            from selfspec.models.quant import extra_weight_bytes

            stats["draft_bits"] = self.config.draft_bits
            stats["draft_extra_mb"] = round(extra_weight_bytes(self._draft[1], self._draft[0]) / 2**20, 1)
            plan = getattr(self._draft[1], "draft_plan", None)
            if plan is not None:  # a native draft: which blocks it copied to which format
                stats["draft_copies"] = ", ".join(f"{n} {k}" for k, n in sorted(plan["copies"].items())) or "none"
        return stats

