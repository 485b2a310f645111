"""Where one decode step's time goes, and what a step costs per dtype.

    python scripts/profile_step.py --model smollm2-135m --dtype int8            # profiler table
    python scripts/profile_step.py --model smollm2-135m --time fp32,int8,int4   # step costs
    python scripts/profile_step.py --model smollm2-135m --dtype native --phases # by phase
    python scripts/profile_step.py --model qwen2.5-coder-1.5b --time native --native-draft  # its draft

The profile prints torch.profiler's top ops of one forward over `--tokens` tokens (1 = a decode
step, k+1 = verifying k drafts) as a Markdown table, for docs/benchmarks.md. `--time` loads each
dtype once and measures forward passes of 1 and `--verify` tokens interleaved across dtypes
(round-robin, so load from other processes hits all of them alike), reporting medians, minima and
the T=k/T=1 ratio. The context before the step is a `--context`-token prefix.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from selfspec.models.loading import load_model


def _prepared(model, context: int, synthetic: bool = False):
    """The decoder and a cache holding `context` positions: a real prefill, or with `synthetic`
    random keys and values (what a step costs does not depend on them; an 8k-token prefill of the
    1.5B would take minutes)."""
    tr = model.transformer
    cache = model.fresh_cache()
    if synthetic:
        gen = torch.Generator().manual_seed(0)
        for t in (cache.k, cache.v):
            t[:, :, :context].copy_(torch.randn(t[:, :, :context].shape, generator=gen))
        cache.wrote(0, context)
        return tr, cache
    prefix = torch.arange(100, 100 + context) % model.config.vocab_size
    tr.forward(prefix, 0, cache, last_only=True)
    return tr, cache


def _step(tr, cache, start: int, n: int, tokens: torch.Tensor) -> float:
    cache.rollback(start)
    t = time.perf_counter()
    tr.forward(tokens[:n], start, cache)
    return time.perf_counter() - t


def time_dtypes(args) -> None:
    models = {d: load_model(args.model, dtype=d, threads=args.threads, compile=args.compile,
                            ctx_size=args.context + 64) for d in args.time.split(",")}
    prepared = {d: _prepared(m, args.context) for d, m in models.items()}
    kernels = {d: m.kernel for d, m in models.items()}
    if args.native_draft:  # the precision self-draft of the native model, sharing its cache
        from selfspec.models import native_draft

        if "native" not in models:
            sys.exit("--native-draft times the draft of --time native: add native to --time")
        tr, cache = prepared["native"]
        for label, copies in (("draft, int8 act. only", False), ("draft", True)):
            view = native_draft.draft_view(tr, 4, copies=copies)
            prepared[label] = (view, cache)
            kernels[label] = ", ".join(f"{n} {k}" for k, n in sorted(view.draft_plan["copies"].items())) or "no copies"
    tokens = torch.arange(7, 7 + args.verify)
    times = {(d, n): [] for d in prepared for n in (1, args.verify)}
    for rep in range(args.warmup + args.repeats):
        for d, (tr, cache) in prepared.items():
            for n in (1, args.verify):
                dt = _step(tr, cache, args.context, n, tokens)
                if rep >= args.warmup:
                    times[(d, n)].append(dt)
    base = args.time.split(",")[0]
    k = args.verify
    print(f"model {args.model}, threads {torch.get_num_threads()}, context {args.context}, "
          f"{args.repeats} interleaved repeats (ms; median, min)\n")
    print(f"| dtype | kernel | T=1 median | T=1 min | T={k} median | T={k} min | T={k} / T=1 | T=1 vs {base} |")
    print("|---|---|---|---|---|---|---|---|")
    b1 = statistics.median(times[(base, 1)])
    for d in prepared:
        t1, tk = statistics.median(times[(d, 1)]), statistics.median(times[(d, k)])
        print(f"| {d} | {kernels[d]} | {1e3 * t1:.1f} | {1e3 * min(times[(d, 1)]):.1f} | {1e3 * tk:.1f} | "
              f"{1e3 * min(times[(d, k)]):.1f} | {tk / t1:.2f} | {t1 / b1:.2f} |")


def profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    model = load_model(args.model, dtype=args.dtype, threads=args.threads, compile=args.compile,
                       ctx_size=args.context + 64)
    tr, cache = _prepared(model, args.context)
    tokens = torch.arange(7, 7 + args.tokens)
    for _ in range(args.warmup):
        _step(tr, cache, args.context, args.tokens, tokens)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.repeats):
            _step(tr, cache, args.context, args.tokens, tokens)
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"model {args.model}, dtype {model.dtype}, kernel {model.kernel}, {args.tokens} token(s) per step, "
          f"threads {torch.get_num_threads()}, mean of {args.repeats} steps: "
          f"{total / args.repeats / 1e3:.2f} ms of op self time per step\n")
    print("| op | calls/step | self ms/step | share |")
    print("|---|---|---|---|")
    for e in events[: args.top]:
        print(f"| `{e.key}` | {e.count / args.repeats:.0f} | {e.self_cpu_time_total / args.repeats / 1e3:.3f} | "
              f"{100 * e.self_cpu_time_total / total:.1f}% |")


def phases(args) -> None:
    """Where a step's wall time goes by Python-level phase, for kernels torch.profiler does not see
    (the native linears and the attention kernel are ctypes calls): every phase is timed
    exclusively (a phase inside another is subtracted from it) with time.perf_counter, or with
    --cpu-time by the CPU time of 1 thread (what a phase costs a core, robust on a shared machine)."""
    import selfspec.models.transformer as T
    from selfspec import kernels

    clock = time.thread_time if args.cpu_time else time.perf_counter
    model = load_model(args.model, dtype=args.dtype, threads=1 if args.cpu_time else args.threads,
                       ctx_size=args.context + 64)
    tr, cache = _prepared(model, args.context, args.synthetic_cache)
    spent: dict[str, float] = {}
    stack: list[float] = []  # time of the running phases' children

    def timed(name, fn):
        def wrapper(*a, **kw):
            stack.append(0.0)
            t = clock()
            try:
                return fn(*a, **kw)
            finally:
                dt = clock() - t
                child = stack.pop()
                label = name(a) if callable(name) else name
                spent[label] = spent.get(label, 0.0) + dt - child
                if stack:
                    stack[-1] += dt
        return wrapper

    head = tr.lm_head
    T.Linear.__call__ = timed(lambda a: "LM head" if a[0] is head else "linears (q|k|v, o, gate|up, down)",
                              T.Linear.__call__)
    T.kernels.attention = timed("attention kernel (over the cache)", kernels.attention)
    T.apply_rope = timed("RoPE", T.apply_rope)
    T.Transformer._norm = timed("RMS norms", T.Transformer._norm)
    T.Transformer._attention = timed("attention block, rest (reshapes, cache writes)", T.Transformer._attention)
    T.Transformer._mlp = timed("MLP, rest (SiLU, product)", T.Transformer._mlp)
    T.Transformer.embed_tokens = timed("embedding lookup", T.Transformer.embed_tokens)
    from selfspec.models import native

    # native weights: each layer is one C call (kernels/layer.c); SELFSPEC_FUSED=0 for its parts
    native.FusedLayers.__call__ = timed("fused layers (norms, linears, RoPE, attention, MLP in C)",
                                        native.FusedLayers.__call__)
    tokens = torch.arange(7, 7 + args.tokens)
    for _ in range(args.warmup):
        _step(tr, cache, args.context, args.tokens, tokens)
    spent.clear()
    total = 0.0
    for _ in range(args.repeats):
        cache.rollback(args.context)
        t = clock()
        tr.forward(tokens[:args.tokens], args.context, cache)
        total += clock() - t
    print(f"model {args.model}, dtype {model.dtype}, kernel {model.kernel}, {args.tokens} token(s) per step, "
          f"threads {torch.get_num_threads()}, context {args.context}, mean of {args.repeats} steps: "
          f"{1e3 * total / args.repeats:.2f} ms per step ({clock.__name__})\n")
    print("| phase | ms/step | share |")
    print("|---|---|---|")
    spent["rest of the forward (Python, residual adds, final norm's caller)"] = total - sum(spent.values())
    for name, t in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {1e3 * t / args.repeats:.2f} | {100 * t / total:.1f}% |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", help="auto|fp32|bf16|int8|int4|native|native-q8 (profile)")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per profiled forward (profile)")
    ap.add_argument("--time", help="comma-separated dtypes to time against each other, e.g. fp32,int8,int4")
    ap.add_argument("--verify", type=int, default=8, help="tokens of the verify step (--time)")
    ap.add_argument("--native-draft", action="store_true", help="with --time native: also time the precision "
                    "self-draft of the native model (models/native_draft.py), without and with its Q4 copies")
    ap.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--top", type=int, default=15, help="rows of the profile table")
    ap.add_argument("--phases", action="store_true", help="time Python-level phases instead of torch ops "
                    "(linears, attention, norms, ...): the native kernels are ctypes calls the profiler does not see")
    ap.add_argument("--synthetic-cache", action="store_true",
                    help="--phases: fill the cache with random keys/values instead of prefilling --context tokens")
    ap.add_argument("--cpu-time", action="store_true", help="--phases by 1 thread's CPU time")
    args = ap.parse_args(argv)
    if args.phases:
        phases(args)
    elif args.time:
        time_dtypes(args)
    else:
        profile(args)


if __name__ == "__main__":
    sys.exit(main())
