"""The cache folder: where it is (`cache_dir`), what lives in it (CONVENTIONS.md, "Models and
files") and how to clear it.

Everything selfspec writes outside the repo is under `cache_dir()` (SELFSPEC_CACHE, default
~/.cache/selfspec); each kind below can be deleted safely: it is rebuilt on next use.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from selfspec.errors import InvalidParameterError


def cache_dir() -> Path:
    """Root of everything selfspec caches (assembled GGUFs, tokenizers...): `SELFSPEC_CACHE`."""
    root = Path(os.environ.get("SELFSPEC_CACHE") or Path.home() / ".cache" / "selfspec")
    root.mkdir(parents=True, exist_ok=True)
    return root


KINDS = {  # name -> (paths relative to the cache folder, what it holds)
    "models": (("models", "verified.json"), "GGUF files assembled from split packages, and their verified hashes"),
    "tokenizers": (("tokenizers",), "tokenizers converted from GGUF files"),
    "weights": (("weights",), "dequantised (fp32/bf16) and quantised (int8/int4) weights, read by later loads"),
    "costs": (("costs",), "forward-pass costs measured for --draft auto"),
    "vocab": (("vocab",), "token frequency rankings for the draft vocabulary subset"),
    "distill": (("distill",), "self-distillation sequences for `selfspec train-drafter`"),
    "studies": (("studies.db",), "skip-search studies (Optuna SQLite storage)"),
    "online": (("online",), "skip sets found on the fly (--skip-config online), per model, dtype and skip ratio"),
    "compiled": (("inductor",), "torch.compile kernels (--compile)"),
    "kernels": (("kernels",), "selfspec's own C kernels (exact attention), built for this machine's compiler"),
    "rows": (("rows.json",), "per-machine probe of which linears need single rows padded to stay row-invariant"),
}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def entries() -> list[dict]:
    root = cache_dir()
    rows = []
    for kind, (names, what) in KINDS.items():
        paths = [root / n for n in names if (root / n).exists()]
        count = sum(1 if p.is_file() else sum(1 for _ in p.iterdir()) for p in paths)
        rows.append({"kind": kind, "bytes": sum(_size(p) for p in paths), "entries": count, "what": what,
                     "paths": [str(p) for p in paths]})
    return rows


def clear(kinds: list[str]) -> int:
    """Delete the given kinds (all when empty); returns the bytes freed."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise InvalidParameterError(f"unknown cache kind {unknown[0]!r}; kinds: {', '.join(KINDS)}")
    root, freed = cache_dir(), 0
    for kind in kinds or list(KINDS):
        for name in KINDS[kind][0]:
            path = root / name
            if not path.exists():
                continue
            freed += _size(path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return freed
