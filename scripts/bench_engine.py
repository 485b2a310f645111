"""Speed of our engine before `selfspec bench` exists (CONVENTIONS.md allows a script until then).

Everything in one process and one run, so ratios compare like with like:
  engine  -- greedy decode tokens/s of our plain decoding vs transformers `generate` on the same
             GGUF, same dtype, same threads, fixed length (end-of-text ignored);
  drafters-- our plain decoding vs each drafter, with tau, acceptance and equality to plain.
Decode time excludes prefill for both engines (transformers: time of N tokens minus time of 1).

    python scripts/bench_engine.py engine --dtype fp32 --new 128
    python scripts/bench_engine.py drafters --new 128 --methods none,ngram,layer-skip,layer-skip:int8
    python scripts/bench_engine.py memory --methods none,layer-skip,ngram
Prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

PROMPTS = [  # (category, prompt): chat, code, maths, and input-grounded tasks
    ("chat", "Give me three tips for sleeping better."),
    ("code", "Write a Python function that checks whether a string is a palindrome, with a docstring."),
    ("math", "A shop sells pens at 3 euros each. How much do 7 pens cost? Explain step by step."),
    ("summarise", "Summarise the following text in two sentences.\n\nThe city council met on Tuesday "
     "evening to discuss the proposal for a new public park on the site of the old railway depot. "
     "Residents asked for more trees, a playground for young children, a dog area and longer opening "
     "hours in summer. Several shop owners worried about parking. The council agreed to plant forty "
     "trees, to build the playground first, and to study parking before the next meeting in May."),
    ("extract", "From the text below, list every person and the city they live in.\n\nAnna Schmidt "
     "lives in Berlin and works with Marco Rossi, who lives in Milan. Their manager, Claire Dubois, "
     "lives in Lyon. Last year Anna Schmidt visited Marco Rossi in Milan twice."),
    ("code-edit", "Rename the variable `x` to `total` in this function and return the code.\n\n"
     "def add_all(values):\n    x = 0\n    for v in values:\n        x = x + v\n    return x\n"),
]


def hf_decode_rate(hf, ids: list[int], n_new: int) -> float:
    x = torch.tensor([ids])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def timed(n):
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t

    timed(4)  # warm-up
    return (n_new - 1) / (timed(n_new) - timed(1))


def engine(args) -> None:
    import os

    from transformers import AutoModelForCausalLM

    from selfspec.generation import generate
    from selfspec.models.loading import load_model

    torch.set_num_threads(args.threads)
    m = load_model(args.model, dtype=args.dtype, ctx_size=1024)
    d, f = os.path.split(str(m.path))
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=m.transformer.dtype)
    hf.eval()
    generate(m, "warm up", max_new_tokens=8, ignore_eos=True)
    rows = []
    for cat, prompt in PROMPTS:
        ids = m.encode(prompt)
        ours = generate(m, ids, max_new_tokens=args.new, ignore_eos=True).stats.tokens_per_s
        theirs = hf_decode_rate(hf, ids, args.new)
        rows.append((cat, ours, theirs))
        print(f"{cat}: ours {ours:.1f} tok/s, transformers {theirs:.1f} tok/s", file=sys.stderr)
    print(f"\n| prompt | selfspec tok/s | transformers tok/s | ratio |\n|---|---|---|---|")
    for cat, o, t in rows:
        print(f"| {cat} | {o:.1f} | {t:.1f} | {o / t:.2f}x |")
    o = statistics.median(r[1] for r in rows)
    t = statistics.median(r[2] for r in rows)
    print(f"| **median** | **{o:.1f}** | **{t:.1f}** | **{o / t:.2f}x** |")


def drafter_of(spec: str, model, args):
    """METHOD[:SKIP][@VOCAB], e.g. layer-skip:int8 (a shipped skip variant) or layer-skip@16384
    (draft head over the context's tokens + 16384 frequent ones)."""
    from selfspec.drafters.factory import build_drafter

    spec, _, vocab = spec.partition("@")
    kind, _, skip = spec.partition(":")
    return build_drafter(kind, model, skip_config=skip or args.skip_config, draft_vocab=int(vocab) if vocab else None)


def drafters(args) -> None:
    from selfspec.generation import generate
    from selfspec.models.loading import load_model

    torch.set_num_threads(args.threads)
    m = load_model(args.model, dtype=args.dtype, ctx_size=1024)
    methods = args.methods.split(",")
    generate(m, "warm up", max_new_tokens=8, ignore_eos=True)
    table = {meth: [] for meth in methods}
    for cat, prompt in PROMPTS:
        ids = m.encode(prompt)
        plain = None
        for meth in methods:
            d = drafter_of(meth, m, args)
            r = generate(m, ids, max_new_tokens=args.new, drafter=d, ignore_eos=True)
            if meth == "none":
                plain = r
            same = plain is not None and r.token_ids == plain.token_ids
            s = r.stats
            table[meth].append((cat, s.tokens_per_s, s.mean_accepted_tokens, s.acceptance_rate, same,
                                s.draft_seconds, s.verify_seconds, s.rounds, s.drafted))
            print(f"{cat} {meth}: {s.tokens_per_s:.1f} tok/s tau {s.mean_accepted_tokens:.2f} "
                  f"acc {s.acceptance_rate:.2f} same {same}", file=sys.stderr)
    base = {row[0]: row[1] for row in table["none"]}
    print("\n| prompt | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
    for i, (cat, _) in enumerate(PROMPTS):
        cells = []
        for meth in methods:
            _, tps, tau, acc, same, *_ = table[meth][i]
            extra = "" if meth == "none" else f" ({tps / base[cat]:.2f}x, τ {tau:.2f}, acc {acc:.0%}{'' if same else ', DIFFERS'})"
            cells.append(f"{tps:.1f}{extra}")
        print(f"| {cat} | " + " | ".join(cells) + " |")
    cells = []
    for meth in methods:
        speed = statistics.geometric_mean(row[1] / base[row[0]] for row in table[meth])
        cells.append(f"{speed:.2f}x")
    print("| **geomean speedup** | " + " | ".join(cells) + " |")
    for meth in methods[1:]:
        rows = table[meth]
        draft_s = sum(r[5] for r in rows) / max(1, sum(r[8] for r in rows))
        verify_s = sum(r[6] for r in rows) / max(1, sum(r[7] for r in rows))
        step = 1 / statistics.median(base.values())
        print(f"\n{meth}: per draft token {1000 * draft_s:.1f} ms ({draft_s / step:.2f} of a plain step), "
              f"per verify round {1000 * verify_s:.1f} ms ({verify_s / step:.2f} of a plain step)")


def one_method_rss(args) -> None:
    """Child process of `memory`: one generation, then print the peak RSS in MB."""
    import resource

    from selfspec.generation import generate
    from selfspec.models.loading import load_model

    torch.set_num_threads(args.threads)
    m = load_model(args.model, dtype=args.dtype, ctx_size=1024)
    d = drafter_of(args.methods, m, args)
    generate(m, m.encode(PROMPTS[3][1]), max_new_tokens=args.new, drafter=d, ignore_eos=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def memory(args) -> None:
    """Peak RSS per method, each in a fresh process (ru_maxrss never goes down)."""
    import subprocess

    rows = []
    for spec in args.methods.split(","):
        cmd = [sys.executable, __file__, "_rss", "--model", args.model, "--dtype", args.dtype,
               "--threads", str(args.threads), "--new", str(args.new), "--methods", spec]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append((spec, float(out.strip().splitlines()[-1])))
    base = rows[0][1]
    print("\n| method | peak RSS MB | vs first |\n|---|---|---|")
    for spec, mb in rows:
        print(f"| {spec} | {mb:.0f} | {100 * (mb / base - 1):+.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("engine", "drafters", "memory", "_rss"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--methods", default="none,ngram,layer-skip")
    ap.add_argument("--skip-config", default=None)
    args = ap.parse_args()
    {"engine": engine, "drafters": drafters, "memory": memory, "_rss": one_method_rss}[args.what](args)


if __name__ == "__main__":
    main()
