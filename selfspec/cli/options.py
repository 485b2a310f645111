"""The options several commands share, each declared once (CONVENTIONS.md: same flags everywhere),
and `command`, which gives a command function its shared options and its error handling.

A command names a group where its options go, e.g. `sampling=SAMPLING`: `--help` lists the
group's options there, and the function receives their values as one namespace (`vars()` of it
is a dict of them). A group may be narrowed to some of its options or given other defaults:
`MODEL("model", "dtype", dtype="fp32")`. Importing this module must not import torch (`--help`
and argument errors stay fast).
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Callable, Optional

import typer

from selfspec.drafters.factory import DEFAULT_DRAFT, DRAFTS, TRAINED, check_options
from selfspec.errors import SelfspecError

DEFAULT_MODEL = "smollm2-135m"


def _opt(default, type_, *decls: str, **info) -> tuple:
    """(the parameter's annotation for typer, its default)"""
    return Annotated[type_, typer.Option(*decls, **info)], default


DRAFT_HELP = (f"{'|'.join(DRAFTS)} ({', '.join(TRAINED)}: trained, need --drafter-weights). auto (the default) "
              "picks the drafter and draft length per round from costs measured on this machine (serve: and keeps "
              "learning them and each drafter's acceptance across requests), and decodes plainly when no drafter pays.")

OPTIONS: dict[str, tuple] = {  # parameter name -> (annotation, default)
    # the model and how it runs
    "model": _opt(DEFAULT_MODEL, str, "--model", "-m", help="Registry alias (see `selfspec models`), .gguf file or HF folder."),
    "dtype": _opt("auto", str, help="auto|fp32|bf16|int8|int4|native|native-q8 (auto: on the CPU native for a GGUF file whose weight formats the kernel has, else fp32: the model as shipped, the same answer on every machine; native computes on the GGUF file's own quantised blocks, memory-mapped, with fp32 activations (docs/kernels.md); native-q8 also rounds those linears' activations per row to int8 blocks (of 32; of 256 for Q4_K/Q6_K) for integer dot products (faster, a slightly different model); bf16 and int8/int4 weight-only re-quantised linears change the output and are opt-in)."),
    "threads": _opt(None, Optional[int], help="CPU threads (default: PyTorch's choice)."),
    "ctx_size": _opt(None, Optional[int], "--ctx-size", help="KV cache length (default min(model context, 4096))."),
    "device": _opt("auto", str, help="auto|cpu|cuda (auto: CUDA when PyTorch sees a GPU, else the CPU; on CUDA --dtype auto is bf16 and int8/int4 are not available). See docs/gpu.md."),
    # sampling
    "temperature": _opt(0.0, float, help="0 = greedy."),
    "top_k": _opt(0, int, help="Keep the k most likely tokens; 0 = off."),
    "top_p": _opt(1.0, float, help="Nucleus sampling, 0 < p <= 1."),
    "min_p": _opt(0.0, float, help="Drop tokens below min_p x the top probability; 0 = off."),
    "repetition_penalty": _opt(1.0, float, "--repetition-penalty", help="> 0; 1 = off."),
    "seed": _opt(None, Optional[int], help="Makes a run reproducible for a given drafter. Under sampling, different drafters may give different (equally distributed) text for the same seed."),
    # the drafter
    "draft": _opt(None, Optional[str], help=DRAFT_HELP),
    "skip_config": _opt(None, Optional[str], "--skip-config", "--draft-skip-config", help="Skip-config JSON for --draft layer-skip (default: the shipped one) or quantized (default: skip nothing); `online` searches the skip set while generating (SWIFT; options as online:ratio=0.45:window=50, see docs/online-skip.md)."),
    "draft_bits": _opt(None, Optional[int], help="--draft quantized (and auto's precision draft): 8 (int8 copy, +25% of fp32 weights) or 4 (int4, +12.5%; less memory, slightly lower agreement). Default 8."),
    "max_draft": _opt(None, Optional[int], help="Most draft tokens per round."),
    "gamma": _opt(None, Optional[float], help="Initial draft-exit threshold (layer-skip)."),
    "alpha": _opt(0.9, float, help="Target acceptance rate of the adaptive exit."),
    "epsilon": _opt(0.01, float, help="Step of the adaptive exit."),
    "beta1": _opt(0.5, float, help="Smoothing of the acceptance rate."),
    "beta2": _opt(0.9, float, help="Smoothing of gamma."),
    "adaptive": _opt(True, bool, "--adaptive/--no-adaptive", help="Adapt gamma to the acceptance rate."),
    "ngram_max": _opt(None, Optional[int], help="Longest n-gram looked up (ngram; default 3 for lookup, 4 for adaptive)."),
    "ngram_min": _opt(None, Optional[int], help="Shortest n-gram looked up (ngram; default 2)."),
    "ngram_mode": _opt("lookup", str, help="ngram: lookup (prompt lookup: copy what followed the latest match) | adaptive (an n-gram model of prompt + output built online, confident matches only; docs/drafters-training-free.md)."),
    "tree": _opt(None, Optional[int], help="Token-tree drafts (docs/tree-verification.md). ngram lookup: the continuations of the N most recent distinct matches; retrieval: the N most frequent continuation prefixes (trie nodes). 1 (default) = one chain."),
    "tree_reduce": _opt(None, Optional[bool], "--tree-reduce/--no-tree-reduce", help="With --tree N >= 2: verify only the tree nodes expected to pay for their rows, by acceptance learnt while generating and this machine's measured forward costs (hypothesis reduction, docs/tree-verification.md). Default: on."),
    "datastore": _opt(None, Optional[str], help="Token datastore (`selfspec datastore build`) for --draft retrieval; with auto, an extra drafter."),
    "draft_model": _opt(None, Optional[str], help="Draft model for --draft model or auto (same tokenizer)."),
    "draft_vocab": _opt(None, Optional[int], help="layer-skip: draft only from the context's tokens plus N frequent ones (cheaper draft LM head); 0 = all; default 32768 for vocabularies over 65536 tokens, else all."),
    "drafter_weights": _opt(None, Optional[Path], help=f"--draft {'|'.join(TRAINED)}: the folder `selfspec train-drafter --out` wrote."),
    # the prompts: which (a suite), how they are wrapped, how long the answers are
    "suite": _opt("quick", Optional[str], help="A bench suite: quick | full | code | a JSONL file of {id, category, prompt|turns} (search: its prompts calibrate)."),
    "max_new_tokens": _opt(256, int, "--max-new-tokens", "-n", help="Most new tokens (chat: per answer, bench: per turn, search: per calibration prompt and trial)."),
    "chat": _opt(None, Optional[bool], "--chat/--no-chat", help="Apply the model's chat template to the prompts (default: when it has one; a model without one reads raw text)."),
    "system": _opt(None, Optional[str], help="System message (none unless given)."),
}
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object (last line of stdout).")]


class Group:
    """Names of OPTIONS that a command takes together, with the defaults it gives them."""

    def __init__(self, *names: str, **defaults) -> None:
        self.names, self.defaults = names, defaults

    def __call__(self, *names: str, **defaults) -> Group:
        return Group(*(names or self.names), **{**self.defaults, **defaults})


MODEL = Group("model", "dtype", "threads", "ctx_size", "device")
SAMPLING = Group("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
DRAFTER = Group("draft", "skip_config", "draft_bits", "max_draft", "gamma", "alpha", "epsilon", "beta1", "beta2",
                "adaptive", "ngram_max", "ngram_min", "ngram_mode", "tree", "tree_reduce", "datastore", "draft_model",
                "draft_vocab", "drafter_weights")
PROMPTS = Group("suite", "max_new_tokens", "chat", "system")


def command(interrupted: str | Callable[[dict], str] | None = None):
    """Decorator: expand the function's Group parameters into their options (for typer) and pack
    their values back; a SelfspecError prints one `error: ...` line and exits 2; Ctrl-C prints
    `interrupted` (a text, or a function of the arguments) and exits 130 (without it, Ctrl-C is
    left to the caller)."""
    def decorate(func):
        own = inspect.signature(func, eval_str=True).parameters.values()
        params, groups = [], {}
        for p in own:
            if isinstance(p.default, Group):
                groups[p.name] = p.default.names
                params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=OPTIONS[n][0],
                                             default=p.default.defaults.get(n, OPTIONS[n][1]))
                           for n in p.default.names]
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        names = [p.name for p in params]
        assert len(set(names)) == len(names), f"{func.__name__}: an option twice in {names}"

        def wrapper(**kw):
            args = {n: kw.pop(n) for n in list(kw) if not any(n in g for g in groups.values())}
            args.update({g: SimpleNamespace(**{n: kw[n] for n in ns}) for g, ns in groups.items()})
            try:
                for values in args.values():  # each group's own checks, before the command body
                    if isinstance(values, SimpleNamespace):
                        _check_group(values)
                return func(**args)
            except SelfspecError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2)
            except KeyboardInterrupt:
                if interrupted is None:
                    raise
                typer.echo("\n" + (interrupted(args) if callable(interrupted) else interrupted), err=True)
                raise typer.Exit(130)

        wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = func.__name__, func.__qualname__, func.__doc__
        wrapper.__module__ = func.__module__
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper
    return decorate


def _check_group(v: SimpleNamespace) -> None:
    """The checks that need no model (and no torch) of a group's options."""
    names = vars(v)
    if "threads" in names or "ctx_size" in names:
        check_model_options(v)
    if "temperature" in names:
        sampling_params(v)
    if "max_new_tokens" in names and v.max_new_tokens < 1:
        raise SelfspecError(f"--max-new-tokens (-n) must be >= 1, got {v.max_new_tokens}")


def sampling_params(v: SimpleNamespace):
    """The SamplingParams of the SAMPLING options (checked there)."""
    from selfspec.sampling_params import SamplingParams

    return SamplingParams(temperature=v.temperature, top_k=v.top_k, top_p=v.top_p, min_p=v.min_p,
                          repetition_penalty=v.repetition_penalty, seed=v.seed)


def split_drafter(v: SimpleNamespace, model: str, *, datastore_check: bool = True) -> tuple[str, dict]:
    """(the --draft value, defaulted and checked; the other DRAFTER options as build_drafter keywords)."""
    options = dict(vars(v))
    draft = options.pop("draft") or DEFAULT_DRAFT
    if draft not in DRAFTS:
        raise SelfspecError(f"--draft must be one of {', '.join(DRAFTS)}, got {draft!r}")
    if datastore_check and options.get("datastore") is not None and draft not in ("retrieval", "auto"):
        raise SelfspecError(f"--datastore is for --draft retrieval (or auto), not {draft!r}")
    if draft != "none":
        check_options(draft, **options)  # before torch and the model
    return draft, options


def check_model_options(v: SimpleNamespace) -> None:
    """The MODEL options that can be checked before loading (the model spec itself is checked by
    its loader, which knows the registry)."""
    for flag, value in (("--threads", getattr(v, "threads", None)), ("--ctx-size", getattr(v, "ctx_size", None))):
        if value is not None and value < 1:
            raise SelfspecError(f"{flag} must be >= 1, got {value}")


def load(v: SimpleNamespace, **extra):
    """Load the MODEL options' model, saying so on stderr."""
    from selfspec.models.loading import load_model

    print(f"loading {v.model} ...", file=sys.stderr, flush=True)
    return load_model(v.model, dtype=v.dtype, ctx_size=v.ctx_size, threads=v.threads, device=v.device, **extra)


def table(*columns: str, rows, title: str | None = None) -> None:
    """Print a table of `rows` (tuples of strings), never cutting a value: a rich table on a
    terminal (the first column, names, never wrapped; long values folded onto more lines), plain
    space-aligned columns into a pipe or a file (whole lines, however wide)."""
    rows = [tuple(r) for r in rows]
    if not sys.stdout.isatty():
        widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
        if title:
            print(title)
        for r in (columns, *rows):
            print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for i, c in enumerate(columns):
        first = max(len(str(x)) for x in (c, *(r[0] for r in rows))) if i == 0 else None
        t.add_column(c, no_wrap=i == 0, min_width=first, overflow="fold")
    for r in rows:
        t.add_row(*r)
    Console().print(t)
