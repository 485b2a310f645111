"""Issue 24's bandwidth target in one run: the machine's read bandwidth and what `native` and
`native-q8` stream at M = 1 on the target shapes (the Qwen 1.5B's MLP, SmolLM2's).

    python scripts/native_bandwidth.py [--threads 2]

Read bandwidth is torch's sum over 256 MB (best of 5), measured before and after. Each shape is
random blocks (tests/models/test_native.py's generator) in enough copies (>= 8, >= 200 MB) that
cycling through them streams the weights from DRAM; a call's time includes its Python call
(~8 µs), as in the model's unfused path.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "models"), str(ROOT / "tests")]

from test_native import linear_of, random_blocks  # noqa: E402

SHAPES = [("Q4_K", 8960, 1536), ("Q4_K", 1536, 8960), ("Q6_K", 1536, 8960), ("Q4_1", 1536, 576), ("Q4_1", 576, 1536)]


def read_bandwidth() -> float:
    big = torch.randn(64 * 1024 * 1024)
    big.sum()
    best = min(_timed(big.sum) for _ in range(5))
    return big.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = read_bandwidth()
    print(f"threads {args.threads}: read bandwidth (torch sum, 256 MB) {bw:.1f} GB/s\n")
    print("| shape (rows x K) | native | native-q8 |\n|---|---|---|")
    rng = np.random.default_rng(0)
    for tname, rows, K in SHAPES:
        blocks = [random_blocks(tname, rows, K, rng)]
        copies = max(8, int(200e6 // blocks[0][0].nbytes))
        blocks += [random_blocks(tname, rows, K, rng) for _ in range(copies - 1)]
        cells = []
        for q8 in (False, True):
            lins = [linear_of(raw, t, rows, K, q8) for raw, t in blocks]
            x = torch.randn(1, K)
            for lin in lins:
                lin(x)
            best = min(_timed(lambda: [lin(x) for lin in lins]) for _ in range(5)) / len(lins)
            gbs = blocks[0][0].nbytes / best / 1e9
            cells.append(f"{best * 1e6:.0f} µs, {gbs:.1f} GB/s ({100 * gbs / bw:.0f}%)")
        print(f"| {tname} {rows}x{K} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nread bandwidth after: {read_bandwidth():.1f} GB/s")


if __name__ == "__main__":
    main()
