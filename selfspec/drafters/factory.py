"""Names of decoding methods and how to build their drafters, shared by `generate`, `bench`,
`search` and `serve`, so a method means the same in every command.

A method spec is `kind[:key=value[,key=value...]]`, e.g. `layer-skip:skip=my.json`,
`model:draft=qwen2.5-coder-0.5b`, `none:dtype=bf16`. Kinds are the `--draft` values plus other
engines that only `bench` runs: `hf`, `hf-lookup`, `llama-cpp`, `llama-cpp-lookup`, `openvino`,
`openvino-lookup`, `openvino-spec` (OpenVINO GenAI) and `openai` (any OpenAI-compatible server).
Options are key=value pairs only, split at the first `:` and at each `=`, so a value may hold
colons: `openai:url=http://127.0.0.1:8080/v1,model=NAME,key_env=VAR`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from selfspec.errors import InvalidParameterError, SelfspecError

DRAFTS = ("none", "auto", "layer-skip", "ngram", "model", "quantized", "retrieval", "early-exit", "lite", "medusa",
          "hydra")
TRAINED = ("early-exit", "lite", "medusa", "hydra")  # need --drafter-weights DIR from `selfspec train-drafter`
ENGINES = ("hf", "hf-lookup", "llama-cpp", "llama-cpp-lookup", "openvino", "openvino-lookup", "openvino-spec",
           "openai")
# Each peer's speculative methods and the plain run of the same engine they are checked against
# (`same_as_own_plain` in results.json); our own drafters' own plain run is `none`.
OWN_PLAIN = {"hf-lookup": "hf", "llama-cpp-lookup": "llama-cpp", "openvino-lookup": "openvino",
             "openvino-spec": "openvino"}
NGRAM_MODES = ("lookup", "adaptive")  # prompt lookup (ngram.py) | online n-gram model (anpd.py)
BENCH_DEFAULT = "ar,auto,layer-skip,ngram,hf,hf-lookup,llama-cpp,llama-cpp-lookup,openvino,openvino-lookup"
ALIASES = {"ar": "none", "plain": "none", "draft-model": "model"}
# Options a spec may carry, by the keyword of `build_drafter` (or of loading) they set.
OPTION_KEYS = {"skip": "skip_config", "draft": "draft_model", "dtype": "dtype", "vocab": "draft_vocab",
               "max_draft": "max_draft", "gamma": "gamma", "bits": "draft_bits", "tree": "tree",
               "reduce": "tree_reduce", "mode": "ngram_mode", "store": "datastore", "weights": "drafter_weights"}
# Options of the other engines, by kind: key -> the name MethodSpec.options holds it under.
OV_PRECISIONS = ("f32", "bf16", "f16")
ENGINE_OPTIONS = {
    "hf": {"dtype": "dtype"}, "hf-lookup": {"dtype": "dtype"},
    "openvino": {"precision": "precision"}, "openvino-lookup": {"precision": "precision"},
    "openvino-spec": {"precision": "precision", "draft": "draft_model"},
    "openai": {"url": "url", "model": "model", "key_env": "key_env"},
}
ALL_OPTION_KEYS = set(OPTION_KEYS) | {k for opts in ENGINE_OPTIONS.values() for k in opts}


@dataclass(frozen=True)
class MethodSpec:
    text: str  # as the user wrote it; the run's label
    kind: str  # canonical: a DRAFTS or ENGINES value
    options: dict = field(default_factory=dict)  # keyword -> value, keys from OPTION_KEYS values


def parse_method(text: str) -> MethodSpec:
    """`layer-skip:skip=F,vocab=0` -> MethodSpec; a clear error for anything unknown."""
    text = text.strip()
    kind, _, rest = text.partition(":")
    kind = ALIASES.get(kind, kind)
    if kind not in DRAFTS + ENGINES:
        known = ", ".join(DRAFTS + ENGINES + tuple(ALIASES))
        raise InvalidParameterError(f"unknown method {text!r}; known: {known}")
    keys = ENGINE_OPTIONS.get(kind, {}) if kind in ENGINES else OPTION_KEYS
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in keys:
            raise InvalidParameterError(
                f"bad option {item!r} in method {text!r}; options are key=value with key in "
                f"{', '.join(keys) or '(none: this method takes no options)'}")
        name = keys[key]
        if name in ("draft_vocab", "max_draft", "draft_bits", "tree"):
            value = _number(text, key, value, int)
        elif name == "gamma":
            value = _number(text, key, value, float)
        elif name == "tree_reduce":
            if value not in ("0", "1"):
                raise InvalidParameterError(f"option reduce of method {text!r} must be 0 or 1, got {value!r}")
            value = value == "1"
        elif name == "ngram_mode" and value not in NGRAM_MODES:
            raise InvalidParameterError(f"option mode of method {text!r} must be one of {', '.join(NGRAM_MODES)}")
        elif name == "precision" and value not in OV_PRECISIONS:
            raise InvalidParameterError(f"option precision of method {text!r} must be one of {', '.join(OV_PRECISIONS)}")
        options[name] = value
    if kind == "openai" and "url" not in options:
        raise InvalidParameterError(f"method {text!r} needs url=: openai:url=http://HOST:PORT/v1[,model=NAME,key_env=VAR]")
    if kind == "openvino-spec" and "draft_model" not in options:
        raise InvalidParameterError(f"method {text!r} needs draft=ALIAS_OR_GGUF (a smaller model with the same tokenizer)")
    return MethodSpec(text=text, kind=kind, options=options)


def parse_methods(text: str) -> list[MethodSpec]:
    """`ar,layer-skip:skip=F,vocab=0,ngram`: a comma starts a new method unless what follows is
    `key=value` (another option of the method before)."""
    specs, current = [], ""
    for piece in text.split(","):
        if current and "=" in piece and piece.split("=", 1)[0].strip() in ALL_OPTION_KEYS:
            current += "," + piece
        else:
            if current.strip():
                specs.append(parse_method(current))
            current = piece
    if current.strip():
        specs.append(parse_method(current))
    if not specs:
        raise InvalidParameterError("no methods given")
    return specs


def _number(text: str, key: str, value: str, kind):
    try:
        return kind(value)
    except ValueError:
        raise InvalidParameterError(f"option {key} of method {text!r} must be a number, got {value!r}") from None


def check_options(draft: str, *, skip_config=None, max_draft=None, gamma=None, alpha=0.9, epsilon=0.01,
                  beta1=0.5, beta2=0.9, ngram_max=None, ngram_min=None, draft_bits=None, ngram_mode="lookup",
                  datastore=None, tree=None, tree_reduce=None, draft_vocab=None, drafter_weights=None, **_) -> None:
    """Every drafter option that can be checked without the model (and without torch): the
    command line calls it before loading anything, build_drafter again for library callers."""
    from pathlib import Path

    from selfspec.drafters.adaptive_exit import AdaptiveExit

    if ngram_mode not in NGRAM_MODES:
        raise InvalidParameterError(f"--ngram-mode must be one of {', '.join(NGRAM_MODES)}, got {ngram_mode!r}")
    if draft_bits is not None:
        if draft not in ("quantized", "auto"):
            raise InvalidParameterError(f"--draft-bits is for --draft quantized (or auto), not {draft!r}")
        if draft_bits not in (8, 4):
            raise InvalidParameterError(f"--draft-bits must be 8 or 4, got {draft_bits}")
    if tree is not None:
        if tree < 1:
            raise InvalidParameterError(f"--tree must be >= 1 (1 = one chain), got {tree}")
        if tree != 1 and draft not in ("ngram", "retrieval"):
            raise InvalidParameterError(f"--tree (token-tree drafts) is for --draft ngram or retrieval, not {draft!r}")
    if tree_reduce is not None and (tree is None or tree == 1):
        raise InvalidParameterError("--tree-reduce/--no-tree-reduce (hypothesis reduction) is for token-tree drafts: "
                                    "give --tree N with N >= 2")
    for flag, value, low in (("--max-draft", max_draft, 1), ("--ngram-max", ngram_max, 1),
                             ("--ngram-min", ngram_min, 1), ("--draft-vocab", draft_vocab, 0)):
        if value is not None and value < low:
            raise InvalidParameterError(f"{flag} must be >= {low}, got {value}")
    if ngram_min is not None and ngram_max is not None and ngram_min > ngram_max:
        raise InvalidParameterError(f"--ngram-min ({ngram_min}) must not exceed --ngram-max ({ngram_max})")
    AdaptiveExit(**({} if gamma is None else {"gamma": gamma}), alpha=alpha, epsilon=epsilon, beta1=beta1,
                 beta2=beta2)  # checks their ranges
    online = isinstance(skip_config, str) and skip_config.split(":", 1)[0] == "online"
    if online and draft != "layer-skip":
        raise InvalidParameterError(f"--skip-config online is for --draft layer-skip, not {draft!r}")
    if isinstance(skip_config, (str, Path)) and not online:
        path = Path(skip_config).expanduser()
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise SelfspecError(f"--skip-config {skip_config} is not a readable JSON file: {e}") from None
        elif path.suffix == ".json" or "/" in str(skip_config) or path.is_dir():  # else: a shipped variant's name
            raise SelfspecError(f"--skip-config {skip_config}: no such file (a skip-config JSON, e.g. from "
                                f"`selfspec search --out`, or `online`)")
    for flag, folder, how in (("--datastore", datastore, "`selfspec datastore build`"),
                              ("--drafter-weights", drafter_weights, "`selfspec train-drafter --out`")):
        if isinstance(folder, (str, Path)) and not Path(folder).expanduser().is_dir():
            raise SelfspecError(f"{flag} {folder}: no such folder (one that {how} wrote)")


def build_drafter(draft: str, model, *, skip_config=None, max_draft=None, gamma=None, alpha=0.9,
                  epsilon=0.01, beta1=0.5, beta2=0.9, adaptive=True, ngram_max=None, ngram_min=None,
                  draft_model=None, draft_vocab=None, dtype="auto", threads=None, draft_bits=None,
                  ngram_mode="lookup", datastore=None, tree=None, tree_reduce=None, drafter_weights=None):
    """The drafter that `--draft` names, or None for plain decoding. `skip_config` is the skip set
    of layer-skip, and of quantized (which skips nothing without one). `ngram_mode` picks prompt
    lookup or the adaptive n-gram model for ngram; `datastore` is the store of retrieval (and an
    extra arm of auto). `tree_reduce` (default on) prunes token trees to the nodes that pay, by
    the model's measured costs (drafters/reduction.py)."""
    draft = ALIASES.get(draft, draft)
    if draft == "none":
        return None
    check_options(draft, skip_config=skip_config, max_draft=max_draft, gamma=gamma, alpha=alpha, epsilon=epsilon,
                  beta1=beta1, beta2=beta2, ngram_max=ngram_max, ngram_min=ngram_min, draft_bits=draft_bits,
                  ngram_mode=ngram_mode, datastore=datastore, tree=tree, tree_reduce=tree_reduce,
                  draft_vocab=draft_vocab, drafter_weights=drafter_weights)
    sized = {} if max_draft is None else {"max_draft": max_draft}
    from selfspec.drafters.swift import is_online
    if draft in TRAINED:
        return _trained_drafter(draft, model, drafter_weights, sized, gamma, alpha, epsilon, beta1, beta2, adaptive)
    if draft in ("auto", "layer-skip", "quantized"):
        from selfspec.drafters.layerskip import AdaptiveExit, LayerSkipDrafter

        from selfspec.drafters.quantized import DEFAULT_GAMMA, QuantizedSelfDrafter

        def exit_(default_gamma: float | None = None) -> AdaptiveExit:
            g = gamma if gamma is not None else default_gamma
            return AdaptiveExit(**({} if g is None else {"gamma": g}), alpha=alpha, epsilon=epsilon,
                                beta1=beta1, beta2=beta2, adaptive=adaptive)

        kwargs = dict(draft_vocab=draft_vocab, **sized)
        if draft == "auto":
            from selfspec.drafters.auto import AutoDrafter

            small = None
            if draft_model:
                small = build_drafter("model", model, draft_model=draft_model, dtype=dtype, threads=threads)
            return AutoDrafter.for_model(model, skip_config, draft_model=small, draft_bits=draft_bits, exit=exit_(),
                                         quantized_exit=exit_(DEFAULT_GAMMA), datastore=datastore, **kwargs)
        if draft == "quantized":
            return QuantizedSelfDrafter.for_model(model, skip_config, bits=draft_bits, exit=exit_(DEFAULT_GAMMA),
                                                  **kwargs)
        if is_online(skip_config):  # searched while generating (SWIFT): selfspec/drafters/swift.py
            from selfspec.drafters.swift import OnlineSkipDrafter

            return OnlineSkipDrafter.for_model(model, skip_config, exit=exit_(), **kwargs)
        return LayerSkipDrafter.for_model(model, skip_config, exit=exit_(), **kwargs)
    if draft == "ngram":
        from selfspec.drafters.anpd import AdaptiveNgramDrafter
        from selfspec.drafters.ngram import NgramDrafter

        cls = AdaptiveNgramDrafter if ngram_mode == "adaptive" else NgramDrafter
        lengths = {k: v for k, v in (("ngram_max", ngram_max), ("ngram_min", ngram_min)) if v is not None}
        if tree is not None:
            if cls is not NgramDrafter:
                raise InvalidParameterError("--tree is for --ngram-mode lookup")
            lengths["tree"] = tree
        return cls(**lengths, **sized, **_reduction(model, tree, tree_reduce))
    if draft == "retrieval":
        from selfspec.drafters.retrieval import RetrievalDrafter

        if not datastore:
            raise SelfspecError("--draft retrieval needs --datastore DIR (build one with `selfspec datastore build`)")
        trie = {} if tree is None or tree == 1 else {"tree": True, "tree_nodes": tree}
        return RetrievalDrafter.for_model(model, datastore, **sized, **trie, **_reduction(model, tree, tree_reduce))
    if draft == "model":
        from selfspec.drafters.draft_model import DraftModelDrafter
        from selfspec.models.loading import load_model

        draft_model = draft_model or default_draft_model(model.name)
        if not draft_model:
            raise SelfspecError("--draft model needs --draft-model ALIAS_OR_PATH (a model with the same tokenizer)")
        small = load_model(draft_model, dtype=dtype, ctx_size=model.ctx_size, threads=threads, device=str(model.device))
        return DraftModelDrafter(small, target=model, **sized)
    raise SelfspecError(f"--draft must be one of {', '.join(DRAFTS)}, got {draft!r}")


def _reduction(model, tree, tree_reduce) -> dict:
    """A tree drafter's reduction keywords: reduced (the default) by the model's measured costs,
    calibrated now so that the measurement never lands in a generation's decode time."""
    if tree is None or tree == 1:
        return {}
    if tree_reduce is False:
        return {"tree_reduce": False}
    from selfspec.drafters.costs import calibrate

    return {"costs": calibrate(model)}


def _trained_drafter(draft, model, weights, sized, gamma, alpha, epsilon, beta1, beta2, adaptive):
    from selfspec.drafters.layerskip import AdaptiveExit
    from selfspec.drafters.trained.kinds import BY_DRAFTER
    from selfspec.drafters.trained.store import load_drafter

    if weights is None:
        raise SelfspecError(f"--draft {draft} needs --drafter-weights DIR; train one with `selfspec "
                            f"train-drafter --model {model.name} --kind {BY_DRAFTER[draft].name} --out DIR`")
    exit = AdaptiveExit(**({} if gamma is None else {"gamma": gamma}), alpha=alpha, epsilon=epsilon,
                        beta1=beta1, beta2=beta2, adaptive=adaptive)
    return load_drafter(model, weights, draft, exit=exit, **sized)


DEFAULT_DRAFT = "auto"  # cost-aware: never meant to be slower than plain decoding; for every model


def default_draft_model(model_spec: str) -> str | None:
    """The registry's same-tokenizer draft partner of a model (e.g. the 0.5B for the 1.5B), if any."""
    from selfspec.models.registry import REGISTRY

    entry = REGISTRY.get(model_spec)
    return getattr(entry, "draft_model", None) if entry is not None else None
