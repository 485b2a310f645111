"""Decode cost of one model in several dtypes, in one run: plain greedy steps (1 token) and
9-token verify passes, timed by wall clock at --threads and by the CPU time of 1 thread (what the
step costs a core, robust on a machine that other processes share). Usage:
python scripts/native_step.py [--model smollm2-135m] [--dtypes fp32,native,int4] [--threads 2]
[--compare-with NAME=OLD.so,...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def steps(model, clock, n: int = 32) -> tuple[float, float]:
    tr = model.transformer
    cache = model.fresh_cache()
    ids = torch.tensor(model.encode("Write a short story about a lighthouse keeper."))
    tr.forward(ids, 0, cache)
    p = len(ids)
    t0 = clock()
    for i in range(n):
        tr.forward(torch.tensor([42]), p + i, cache)
    one = (clock() - t0) / n
    t0 = clock()
    for i in range(n // 4):
        cache.rollback(p)
        tr.forward(torch.tensor([42] * 9), p, cache)
    nine = (clock() - t0) / (n // 4)
    return one, nine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="fp32,native,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-with", metavar="NAME=SO,...", help="also run the native dtypes on these builds "
                    "of the kernels (e.g. the previous qgemm.c), as rows 'native (NAME)'")
    args = ap.parse_args()
    from selfspec import kernels
    from selfspec.models import native
    from selfspec.models.loading import load_model

    libs = {"": kernels.library()}
    if args.compare_with:
        sys.path.insert(0, os.path.dirname(__file__))
        from native_gemv import other_library

        for entry in args.compare_with.split(","):
            name, _, path = entry.rpartition("=")
            libs[f" ({name or path})"] = other_library(path)

    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| dtype | tok/s wall, %d threads | 9-token pass / step | tok/s by 1-thread CPU time | 9-token / step |"
          % args.threads)
    print("|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        for suffix, lib in libs.items() if dtype == "native" else [("", None)]:
            native._lib = (lambda lib=lib: lib) if lib is not None else kernels.library
            # loaded after the swap: the fused layers (layer.c) bind their library at load, and a
            # model loaded once would run every build's linears through the first one's layers
            model = load_model(args.model, dtype=dtype)
            torch.set_num_threads(args.threads)
            w1, w9 = min(steps(model, time.perf_counter) for _ in range(2))
            torch.set_num_threads(1)
            c1, c9 = min(steps(model, time.thread_time) for _ in range(2))
            print(f"| {dtype}{suffix} | {1 / w1:.1f} | {w9 / w1:.2f} | {1 / c1:.1f} | {c9 / c1:.2f} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
