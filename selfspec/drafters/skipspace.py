"""The skip space of self-speculative drafting: one on/off per attention and MLP sub-layer of the
layers that may be skipped, the known-reasonable starting sets, and the model identity a found set
is recorded under. Shared by the offline search (selfspec/search/) and the online one
(drafters/swift.py), so a drafter never imports the search application or Optuna."""
from __future__ import annotations

from dataclasses import dataclass

from selfspec.drafters.layerskip import shipped_config
from selfspec.models.transformer import SkipSet


@dataclass(frozen=True)
class SkipSpace:
    """One 0/1 parameter per attention and MLP sub-layer of the layers that may be skipped."""

    n_layers: int
    keep_first: int
    keep_last: int

    @property
    def layers(self) -> range:
        return range(self.keep_first, self.n_layers - self.keep_last)

    @staticmethod
    def name(kind: str, layer: int) -> str:
        return f"{kind}.{layer:02d}"

    def suggest(self, trial) -> SkipSet:
        attn = [i for i in self.layers if trial.suggest_int(self.name("attn", i), 0, 1)]
        mlp = [i for i in self.layers if trial.suggest_int(self.name("mlp", i), 0, 1)]
        return SkipSet.of(attn, mlp)

    def params(self, skip: SkipSet) -> dict[str, int]:
        return {**{self.name("attn", i): int(i in skip.attention) for i in self.layers},
                **{self.name("mlp", i): int(i in skip.mlp) for i in self.layers}}

    def decode(self, params: dict) -> SkipSet:
        return SkipSet.of([i for i in self.layers if params.get(self.name("attn", i))],
                          [i for i in self.layers if params.get(self.name("mlp", i))])

    def allows(self, skip: SkipSet) -> bool:
        return all(i in self.layers for i in skip.attention | skip.mlp)


def _evenly(items: list, n: int) -> list:
    """`n` of `items`, spread evenly from the first to the last (all of them when n >= len)."""
    if n >= len(items):
        return list(items)
    if n == 1:
        return [items[len(items) // 2]]
    return [items[round(j * (len(items) - 1) / (n - 1))] for j in range(max(n, 0))]


def seed_sets(space: SkipSpace, size: int, model_name: str | None = None) -> list[SkipSet]:
    """Starting points that give the sampler something to learn from: the shipped config (when it
    fits), every other layer, a middle block and attention only, of `size` sub-layers each, and
    attention only of half that size."""
    layers = list(space.layers)
    seeds = []
    shipped = shipped_config(model_name) if model_name else None
    if shipped is not None and shipped.n_layers == space.n_layers and space.allows(shipped.skip):
        seeds.append(shipped.skip)
    every_other = _evenly(layers[1::2], (size + 1) // 2)
    seeds.append(_as_set([(k, i) for i in every_other for k in ("attn", "mlp")][:size]))
    mid = len(layers) // 2
    half = (size + 1) // 2
    block = layers[max(0, mid - half // 2): max(0, mid - half // 2) + half]
    seeds.append(_as_set([(k, i) for i in block for k in ("attn", "mlp")][:size]))
    seeds.append(_as_set([("attn", i) for i in _evenly(layers, size)]))
    seeds.append(_as_set([("attn", i) for i in _evenly(layers, size // 2)]))
    unique = []
    for s in seeds:
        if len(s) and s not in unique:
            unique.append(s)
    return unique


def _as_set(pairs) -> SkipSet:
    return SkipSet.of([i for k, i in pairs if k == "attn"], [i for k, i in pairs if k == "mlp"])


def model_identity(model) -> tuple[str, str]:
    """(name, sha256) of a loaded model: the registry's pinned hash, else
    `registry.model_identity` of its file or folder."""
    from selfspec.models.registry import REGISTRY
    from selfspec.models.registry import model_identity as identity

    if model.name in REGISTRY:
        return model.name, REGISTRY[model.name].sha256
    return model.name, identity(model.path)
