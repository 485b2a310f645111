"""What each trainable drafter kind needs from training: build its module (fp32, trainable), turn a
token sequence into features with the frozen backbone (once: the backbone never changes), a loss
over a batch of feature windows, and the drafter that uses the trained module.

Loss, for every kind: cross-entropy against the target's own greedy choice at each position (the
argmax of its logits over the distilled sequence). Greedy verification accepts a draft token
exactly when it equals that argmax, so this is the quantity acceptance depends on; a KL to the
full distribution would need the 49k-way distribution of every position stored (GBs) or the
backbone rerun every step, and matters only for sampled decoding.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from selfspec.errors import InvalidParameterError

IGNORE = -100  # label of positions without a target (past the end of the sequence)


class FrozenHead:
    """The target's final norm and LM head as differentiable fp32 functions (nothing trains here)."""

    def __init__(self, model) -> None:
        from selfspec.models.quant import dense_weight

        tr = model.transformer
        self.weight = dense_weight(tr.lm_head).float()  # [vocab, hidden]
        self.norm = tr.final_norm.float()
        self.eps = model.config.rms_eps
        self.softcap = model.config.final_softcap

    def logits(self, hidden: torch.Tensor, norm: bool = False) -> torch.Tensor:
        if norm:
            hidden = F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.eps)
        logits = hidden @ self.weight.T
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def shifted(values: torch.Tensor, k: int, fill: int = IGNORE) -> torch.Tensor:
    """[T] -> [T, k]: row t holds values[t+1 .. t+k] (fill past the end)."""
    T = values.shape[0]
    out = torch.full((T, k), fill, dtype=values.dtype)
    for j in range(k):
        out[: max(0, T - j - 1), j] = values[j + 1:]
    return out


@torch.inference_mode()
def _backbone(model, tokens: torch.Tensor, exit_layer: int | None = None):
    tr = model.transformer
    cache = tr.new_cache(tokens.shape[0])
    if exit_layer is not None:
        return tr.forward(tokens, 0, cache, exit_layer=exit_layer).float()
    logits, hidden = tr.forward(tokens, 0, cache, return_hidden=True)
    return logits.argmax(-1), hidden.float()


class TrainKind(Protocol):
    name: str  # the --kind of train-drafter
    drafter_name: str  # the --draft value that uses it
    options: dict

    def build(self, model) -> nn.Module: ...
    def features(self, model, tokens: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def loss(self, module: nn.Module, model, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def drafter(self, module: nn.Module, model, **kwargs): ...
    def finish(self, module: nn.Module, model, feats: list[dict]) -> dict: ...


class _Kind:
    _frozen: FrozenHead | None = None
    # `train-drafter`'s default schedule (--steps, --batch) for this kind
    STEPS, BATCH = 300, 8

    def head(self, model) -> FrozenHead:
        """Built on first use and kept: the dense head weight is a copy under prepacked kernels."""
        if self._frozen is None:
            self._frozen = FrozenHead(model)
        return self._frozen

    def finish(self, module, model, feats) -> dict:
        """After the last step, before the drafter is saved: what the kind decides from the trained
        module (it may set options) and reports (merged into drafter.json). Nothing by default."""
        return {}


def _check_exit_layer(model, exit_layer: int, flag: str = "--exit-layer") -> int:
    n = model.config.n_layers
    if not 1 <= exit_layer < n:
        raise InvalidParameterError(f"{flag} must be in 1..{n - 1} for {model.name!r}, got {exit_layer}")
    return exit_layer


class EarlyExitKind(_Kind):
    name, drafter_name = "early-exit", "early-exit"  # the --kind and the --draft name are one

    def __init__(self, model, exit_layer: int | None = None, adapter_mlp: int | None = None, **_) -> None:
        from selfspec.drafters.early_exit import default_exit_layer

        n = model.config.n_layers
        exit_layer = _check_exit_layer(model, default_exit_layer(n) if exit_layer is None else exit_layer)
        mlp = model.config.hidden if adapter_mlp is None else adapter_mlp
        self.options = {"exit_layer": exit_layer, "adapter_mlp": mlp}

    def build(self, model) -> nn.Module:
        from selfspec.drafters.early_exit import build_adapter

        return build_adapter(model.config, self.options["adapter_mlp"], model.transformer.rope_max)

    def features(self, model, tokens):
        target, _ = _backbone(model, tokens)
        h = _backbone(model, tokens, self.options["exit_layer"])
        # label[t]: the target's choice for x_{t+1}, which the adapter's state at t must predict
        return {"h": h.clone(), "label": target.clone()}

    def loss(self, module, model, batch):
        return _ce(self.head(model).logits(module(batch["h"]), norm=True), batch["label"])

    def drafter(self, module, model, **kwargs):
        from selfspec.drafters.early_exit import EarlyExitDrafter

        return EarlyExitDrafter(module, self.options["exit_layer"], **kwargs)


class LiteKind(_Kind):
    """LITE (selfspec/drafters/lite.py): tuned exits at several layers, trained jointly on the
    frozen backbone's states at those layers; the drafter uses one of them (`exit_layer`: given,
    or chosen by `finish`)."""

    name = drafter_name = "lite"
    AGREEMENT_TOKENS = 2048  # positions of the training data that rank the exits in `finish`
    # A step runs the LM head once per exit (4 by default): 120 tokens/s of training on SmolLM2
    # against the adapter's 316, so 300 x 8 would take ~21 minutes; 200 x 4 keeps the whole run
    # (distillation included) within 15 minutes on one thread (docs/trained-drafters.md).
    STEPS, BATCH = 200, 4

    def __init__(self, model, exit_layers: list[int] | None = None, exit_layer: int | None = None,
                 rank: int | None = None, **_) -> None:
        from selfspec.drafters.lite import DEFAULT_RANK, default_exit_layers

        layers = default_exit_layers(model.config.n_layers) if exit_layers is None else sorted(set(exit_layers))
        for layer in layers:
            _check_exit_layer(model, layer, "--exit-layers")
        if not layers:
            raise InvalidParameterError("--exit-layers must name at least one layer")
        if exit_layer is not None and exit_layer not in layers:
            raise InvalidParameterError(f"--exit-layer {exit_layer} is not one of the tuned --exit-layers "
                                        f"{','.join(map(str, layers))}")
        rank = DEFAULT_RANK if rank is None else rank
        if not 1 <= rank <= model.config.hidden:
            raise InvalidParameterError(f"the exits' rank must be in 1..{model.config.hidden}, got {rank}")
        self.options = {"exit_layers": layers, "exit_layer": exit_layer, "rank": rank}

    def build(self, model) -> nn.Module:
        from selfspec.drafters.lite import LiteExits

        tr = model.transformer
        return LiteExits(tr.final_norm, len(self.options["exit_layers"]), self.options["rank"], model.config.rms_eps)

    def features(self, model, tokens):
        target, _ = _backbone(model, tokens)
        # One forward per exit depth: for the default exits their layers add up to about one full forward.
        h = torch.stack([_backbone(model, tokens, layer) for layer in self.options["exit_layers"]], dim=1)
        return {"h": h, "label": target.clone()}  # h [T, exits, hidden]; label[t]: the target's x_{t+1}

    def _exit_logits(self, module, model, h: torch.Tensor, e: int) -> torch.Tensor:
        return self.head(model).logits(module(h[..., e, :], e))

    def loss(self, module, model, batch):
        exits = range(len(self.options["exit_layers"]))
        return torch.stack([_ce(self._exit_logits(module, model, batch["h"], e), batch["label"]) for e in exits]).mean()

    @torch.no_grad()
    def finish(self, module, model, feats) -> dict:
        """Each exit's greedy agreement with the target on (the start of) the training data; without
        a given exit_layer the drafter's exit is the one with the best `chain_value` of it."""
        from selfspec.drafters.lite import chain_value

        layers = self.options["exit_layers"]
        hits, total = torch.zeros(len(layers)), 0
        for f in feats:
            if total >= self.AGREEMENT_TOKENS:
                break
            h, label = f["h"][:-1], f["label"][:-1]  # the last position has no next token to predict
            for e in range(len(layers)):
                hits[e] += int((self._exit_logits(module, model, h, e).argmax(-1) == label).sum())
            total += label.shape[0]
        agreement = {layer: float(hits[e]) / max(1, total) for e, layer in enumerate(layers)}
        value = {layer: chain_value(a, layer, model.config) for layer, a in agreement.items()}
        if self.options["exit_layer"] is None:  # a new dict: the checkpoint keeps the options it was made with
            self.options = {**self.options, "exit_layer": max(value, key=value.get)}
        return {"exit_agreement": agreement, "exit_value": {k: round(v, 4) for k, v in value.items()}}

    def drafter(self, module, model, exit_layer: int | None = None, **kwargs):
        """`exit_layer`: another of the tuned exits than the chosen one."""
        from selfspec.drafters.lite import LiteDrafter

        layers = self.options["exit_layers"]
        layer = exit_layer or self.options["exit_layer"] or layers[0]
        if layer not in layers:
            raise InvalidParameterError(f"exit layer {layer} was not tuned; tuned: {','.join(map(str, layers))}")
        return LiteDrafter(module, layers.index(layer), layer, **kwargs)


class HeadsKind(_Kind):
    """Medusa and Hydra: K heads on the final hidden state h_t; head i predicts the target's choice
    at position t+i+1 (i.e. x_{t+i+2})."""

    def __init__(self, model, heads: int | None = None, **_) -> None:
        heads = 4 if heads is None else heads
        if not 1 <= heads <= 16:
            raise InvalidParameterError(f"--heads must be in 1..16, got {heads}")
        self.options = {"heads": heads}

    def features(self, model, tokens):
        target, hidden = _backbone(model, tokens)
        k = self.options["heads"]
        # labels[t, i] = target[t+i+1]; next_tokens[t, j] = x_{t+1+j} (Hydra's inputs)
        return {"h": hidden.clone(), "labels": shifted(target, k), "next_tokens": shifted(tokens, k, fill=0)}

    def drafter(self, module, model, **kwargs):
        from selfspec.drafters.heads import HeadsDrafter

        return HeadsDrafter(module, **kwargs)


class MedusaKind(HeadsKind):
    name = drafter_name = "medusa"

    def build(self, model) -> nn.Module:
        from selfspec.drafters.heads import MedusaHeads

        return MedusaHeads(model.config.hidden, self.options["heads"])

    def loss(self, module, model, batch):
        return _ce(self.head(model).logits(module(batch["h"])), batch["labels"])


class HydraKind(HeadsKind):
    name = drafter_name = "hydra"

    def build(self, model) -> nn.Module:
        from selfspec.drafters.heads import HydraHeads

        return HydraHeads(model.config.hidden, self.options["heads"], model.config.rms_eps)

    def loss(self, module, model, batch):
        from selfspec.drafters.heads import embed

        emb = embed(model.transformer, batch["next_tokens"])  # [B, T, K, hidden]
        return _ce(self.head(model).logits(module(batch["h"], emb)), batch["labels"])


KINDS = {k.name: k for k in (EarlyExitKind, LiteKind, MedusaKind, HydraKind)}
BY_DRAFTER = {k.drafter_name: k for k in KINDS.values()}
RENAMED = {"early-exit-adapter": "early-exit"}  # old kind names: still accepted, and found in stored drafters


def canonical_kind(name: str) -> str:
    return RENAMED.get(name, name)


def default_schedule(name: str) -> tuple[int, int]:
    """(--steps, --batch) when not given: the kind's own (lite's steps cost more), else 300 x 8."""
    kind = KINDS.get(canonical_kind(name), _Kind)
    return kind.STEPS, kind.BATCH


def make_kind(name: str, model, **options) -> TrainKind:
    name = canonical_kind(name)
    if name not in KINDS:
        raise InvalidParameterError(f"unknown drafter kind {name!r}; kinds: {', '.join(KINDS)}")
    return KINDS[name](model, **options)
