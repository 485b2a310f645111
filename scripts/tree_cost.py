"""Cost of verifying a token tree of n nodes vs a chain of n drafts (one forward each, a tree's layout included), in units
of one plain decode step: trees pay only where their extra nodes are nearly free.

Shapes, for n nodes: chain (depth n), and trees of width w (w branches of n / w tokens under the
pending token). Each forward runs on a warm cache after a prompt of `--context` tokens; the
shapes are interleaved and each timed `--repeats` times, medians reported.

    python scripts/tree_cost.py --model smollm2-135m --dtype fp32 --sizes 4,8,16 --widths 2,4
Prints a Markdown table for docs/tree-verification.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from selfspec.models.loading import load_model
from selfspec.tree import TreeLayout


def branches(n: int, width: int) -> list[int]:
    """Parents of `width` chains of n // width nodes each, all under the pending token."""
    per = n // width
    return [-1 if j == 0 else b * per + j - 1 for b in range(width) for j in range(per)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--sizes", default="4,8,16")
    ap.add_argument("--widths", default="2,4")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    model = load_model(args.model, dtype=args.dtype, threads=args.threads, ctx_size=args.context + 64)
    tr = model.transformer
    cache = tr.new_cache(args.context + 64)
    ids = torch.randint(100, 1000, (args.context + 40,), generator=torch.Generator().manual_seed(0))
    start = args.context
    tr.forward(ids[:start], 0, cache)

    shapes = {"1 token": (1, None)}
    for n in map(int, args.sizes.split(",")):
        shapes[f"chain {n}"] = (n, None)
        for w in map(int, args.widths.split(",")):
            if n % w == 0 and n // w >= 1:
                shapes[f"tree {n} (width {w})"] = (n, branches(n, w))
    times = {name: [] for name in shapes}
    for _ in range(args.repeats):
        for name, (n, parents) in shapes.items():
            cache.rollback(start)
            rows = 1 if name == "1 token" else n + 1
            t = time.perf_counter()  # a tree's layout (depths, ancestor matrix) is built per round: timed too
            tr.forward(ids[start: start + rows], start, cache, tree=parents and TreeLayout.of(parents))
            times[name].append(time.perf_counter() - t)
    one = statistics.median(times["1 token"])
    print(f"| shape ({args.model}, {args.dtype}, {torch.get_num_threads()} threads, context {start}) | ms | x one step |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {med / one:.2f} |")


if __name__ == "__main__":
    main()
