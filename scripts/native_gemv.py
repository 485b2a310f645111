"""The native kernel (selfspec/kernels/qgemm.c) against this machine's read bandwidth.

Prints, in one run: the read bandwidth (a sum over a 1 GiB fp32 tensor, larger than any cache),
then per shape and format the kernel's time at M = 1 (weights streamed: a rotation of copies
larger than the last-level cache), its GB/s of weight bytes and % of the bandwidth, t(M)/t(1)
for M = 2, 4, 9 (also for `--dtype native-q8`'s int8-activation kernel), and PyTorch's int4 kernel and fp32 oneDNN at M = 1 and 9 on the same shape for
comparison. `--compare-with before=OLD.so` times another build of the kernels (e.g. the previous
qgemm.c) interleaved with this checkout's, so before and after share the run and its load.
Usage: python scripts/native_gemv.py [--threads 2] [--cpu-time] [--compare-with NAME=OLD.so,...]
[--native-only] [--resident] (weights read from the caches: the compute bound), or --rss for the
peak resident memory of native, fp32 and int4 loads (fresh processes).
"""
from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "tests", "models"),
                os.path.join(os.path.dirname(__file__), "..", "tests")]

import argparse
import time

import numpy as np
import torch

COPIES_BYTES = 512 << 20  # enough copies of a weight to stream it from DRAM


def bandwidth(reps: int = 5) -> float:
    t = torch.ones(256 << 20, dtype=torch.float32)  # 1 GiB
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return t.nbytes / best / 1e9


CLOCK = time.perf_counter  # --cpu-time: time.thread_time (1 thread; robust on a shared machine)


def timed(fn, xs, reps: int) -> float:
    fn(xs[0])
    best = float("inf")
    for _ in range(3):
        t0 = CLOCK()
        for i in range(reps):
            fn(i)
        best = min(best, (CLOCK() - t0) / reps)
    return best


def native_linears(tname: str, n: int, k: int, resident: bool = False):
    from test_native import linear_of, random_blocks

    raw, t = random_blocks(tname, n, k, np.random.default_rng(0))
    copies = 1 if resident else max(1, COPIES_BYTES // raw.nbytes)
    lins = [linear_of(raw.copy(), t, n, k) for _ in range(copies)]
    q8 = [linear_of(lin.parts[0].data.numpy(), t, n, k, q8=True) for lin in lins]  # the same copies
    return lins, q8, raw.nbytes


_RSS = """
import resource, sys, torch
from selfspec.models.loading import load_model
m = load_model(sys.argv[1], dtype=sys.argv[2])
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m.transformer.forward(torch.tensor(m.encode("Hello")), 0, m.fresh_cache())
print(after_load, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(model: str, dtype: str) -> tuple[float, float]:
    """Peak RSS in MiB of a fresh process after loading `model` in `dtype`, and after one forward."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS, model, dtype], capture_output=True, text=True, check=True)
    a, b = out.stdout.split()[-2:]
    return int(a) / 1024, int(b) / 1024


def other_library(path: str):
    """Another build of the kernels (ctypes signatures as selfspec.kernels sets them), on this
    machine's instruction set."""
    import ctypes

    from selfspec import kernels

    lib = ctypes.CDLL(path)
    mine = kernels.library()
    for f in ("selfspec_qgemm", "selfspec_qgemm_q8", "selfspec_dequant_rows", "selfspec_qgemm_isa"):
        getattr(lib, f).restype = getattr(mine, f).restype
        getattr(lib, f).argtypes = getattr(mine, f).argtypes
    lib.selfspec_qgemm_isa(int(kernels.qgemm_isa() == "avx512"))
    return lib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss", action="store_true", help="only the peak RSS of native vs fp32 loads")
    ap.add_argument("--cpu-time", action="store_true", help="1 thread, timed by its CPU time: what one core "
                    "computes, unaffected by other processes taking turns on the cores")
    ap.add_argument("--compare-with", metavar="NAME=SO,...", help="also time the native kernel of these built "
                    "libraries (e.g. the previous qgemm.c), interleaved with this checkout's in the same run")
    ap.add_argument("--native-only", action="store_true", help="skip PyTorch's kernels")
    ap.add_argument("--resident", action="store_true", help="one copy of each weight, read from the caches after "
                    "the first call: what the cores compute when DRAM is not the limit (pick shapes that fit "
                    "the L3 and take far longer than a call's overhead, e.g. Q4_K:8960x1536)")
    ap.add_argument("--shapes", metavar="FMT:NxK,...", help="time these shapes instead of the default list, "
                    "e.g. Q8_0:151936x896 (the 0.5B's LM head),Q5_0:4864x896")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK, args.threads = time.thread_time, 1
    if args.rss:
        for model in ("smollm2-135m", "gemma3-270m"):
            for dtype in ("native", "fp32", "int4"):
                a, b = peak_rss(model, dtype)
                print(f"{model} --dtype {dtype}: peak RSS {a:.0f} MiB after load, {b:.0f} MiB after a forward")
        return
    torch.set_num_threads(args.threads)
    bw = bandwidth()
    print(f"read bandwidth (torch sum of 1 GiB, {args.threads} threads, wall clock): {bw:.1f} GB/s; "
          f"timing by {CLOCK.__name__}; weights {'cache-resident' if args.resident else 'streamed'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    shapes = [("Q4_1", 1536, 576), ("Q4_1", 576, 1536), ("Q8_0", 49152, 576), ("Q4_K", 8960, 1536),
              ("Q4_K", 1536, 8960), ("Q6_K", 1536, 8960), ("Q4_0", 8960, 1536), ("Q8_0", 8960, 1536)]
    if args.shapes:
        shapes = []
        for entry in args.shapes.split(","):
            fmt, _, nk = entry.partition(":")
            n, _, k = nk.partition("x")
            shapes.append((fmt, int(n), int(k)))
    from selfspec import kernels
    from selfspec.models import native

    libs = {}
    for entry in (args.compare_with or "").split(","):
        if entry:
            name, _, path = entry.rpartition("=")
            libs[name or path] = other_library(path)
    libs["this"] = kernels.library()
    print("| kernel | format | N x K | MB | t(1) µs | GB/s | % of bw | t(2)/t(1) | t(4)/t(1) | t(9)/t(1) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tname, n, k in shapes:
        lins, q8, nbytes = native_linears(tname, n, k, args.resident)
        runs = {}
        for name, lib in libs.items():  # each build's fp32-activation kernel, then its native-q8 one
            runs[name] = (lib, lins)
            runs[f"{name}, native-q8"] = (lib, q8)
        ts = {name: {} for name in runs}
        for m in (1, 2, 4, 9):
            x = torch.randn(m, k)
            for name, (lib, ls) in runs.items():  # interleaved: load from other processes hits all alike
                native._lib = lambda lib=lib: lib
                ts[name][m] = timed(lambda i: ls[i % len(ls)]._apply(x), [0], reps=max(20, len(ls)))
        for name, t in ts.items():
            gbs = nbytes / t[1] / 1e9
            print(f"| {name} | {tname} | {n}x{k} | {nbytes / 1e6:.2f} | {t[1] * 1e6:.0f} | {gbs:.1f} | "
                  f"{100 * gbs / bw:.0f} | {t[2] / t[1]:.2f} | {t[4] / t[1]:.2f} | {t[9] / t[1]:.2f} |")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.native_only:
        return
    print("\nPyTorch kernels on the same shapes (weights streamed the same way):")
    print("| kernel | N x K | t(1) µs | GB/s | t(9)/t(1) |")
    print("|---|---|---|---|---|")
    from selfspec.models.quant import Int4Linear, Int8Linear
    from selfspec.models.transformer import make_linear

    for n, k in ((1536, 576), (576, 1536), (8960, 1536), (1536, 8960)):
        w = torch.randn(n, k)
        for name, make in (("int4 g32 (_weight_int4pack_mm)", lambda: Int4Linear(w)),
                           ("int8 (_weight_int8pack_mm)", lambda: Int8Linear(w)),
                           ("fp32 oneDNN prepacked", lambda: make_linear(w.clone()))):
            one = make()
            nbytes = one.nbytes
            lins = [one] + [make() for _ in range(max(0, min(COPIES_BYTES // nbytes, 64) - 1))]
            ts = {}
            for m in (1, 9):
                x = torch.randn(m, k)
                ts[m] = timed(lambda i: lins[i % len(lins)]._apply(x), [0], reps=max(20, len(lins)))
            print(f"| {name} | {n}x{k} | {ts[1] * 1e6:.0f} | {nbytes / ts[1] / 1e9:.1f} | {ts[9] / ts[1]:.2f} |")


if __name__ == "__main__":
    main()
