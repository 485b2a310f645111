"""The cache folder: where it is (`cache_dir`), what lives in it (`KINDS`) and how to clear it;
and atomic writes (`atomic_output`, `atomic_write_text`, `atomic_write_json`) for every file
selfspec writes, so a crash or a concurrent reader never sees half a file.

Everything selfspec writes outside the repo is under `cache_dir()` (SELFSPEC_CACHE, default
~/.cache/selfspec); each kind below can be deleted safely: it is rebuilt on next use.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from pathlib import Path

from selfspec.errors import InvalidParameterError


def cache_dir() -> Path:
    """Root of everything selfspec caches (assembled GGUFs, tokenizers...): `SELFSPEC_CACHE`."""
    root = Path(os.environ.get("SELFSPEC_CACHE") or Path.home() / ".cache" / "selfspec")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_output(path: str | Path):
    """Yield a temporary path beside `path` for the caller (or a tool it runs) to write; on
    success it replaces `path` in one step, so readers see the old file or the whole new one,
    never half a file; on failure the temporary file is deleted. The temporary name keeps the
    suffix (np.save, safetensors) and is unique per process and thread."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """`obj` as JSON (ending in a newline when indented), written atomically (`atomic_output`)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys)
    atomic_write_text(path, text + "\n" if indent is not None else text)


def read_entries(path: str | Path) -> dict:
    """The entries of a cache file of keyed entries (a JSON object): {} when it is absent,
    unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def add_measurement(path: str | Path, key: str, value) -> None:
    """Add one timing-based verdict to a cache file of keyed entries (merged with what the file
    holds, written atomically). Not while other programs load the CPU (`hardware.machine_busy`):
    timings taken then would decide every later run; nothing either where the folder cannot be
    written (the next run measures again)."""
    from selfspec.hardware import machine_busy

    if machine_busy():
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**read_entries(path), key: value}, indent=None)
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with this id is running (an interrupted write's, a
    search worker's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def check_writable(out: str | Path, flag: str, error: type[Exception] = InvalidParameterError) -> Path:
    """Refuse an output file (`flag`'s value) that cannot be written, before the work that fills
    it: a folder, a missing parent, no permission."""
    import tempfile

    out = Path(out)
    if out.is_dir():
        raise error(f"{flag} {out} is a folder; give a file name such as {out / 'skip.json'}")
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.",
                                         suffix=".check"):
            pass
    except OSError as e:
        raise error(f"cannot write {flag} {out}: {e.strerror or e}") from None
    return out


KINDS = {  # name -> (paths relative to the cache folder, what it holds)
    "models": (("models", "verified.json"), "GGUF files assembled from split packages, and their verified hashes"),
    "tokenizers": (("tokenizers",), "tokenizers converted from GGUF files"),
    "weights": (("weights",), "dequantised (fp32/bf16) and quantised (int8/int4) weights and native drafts' "
                              "Q4 copies, read by later loads"),
    "costs": (("costs",), "forward-pass costs measured for --draft auto"),
    "dtype": (("dtype-choice.json",), "per-machine measurement of native blocks against fp32 weights, for --dtype auto"),
    "vocab": (("vocab",), "token frequency rankings for the draft vocabulary subset"),
    "distill": (("distill",), "self-distillation sequences for `selfspec train-drafter`"),
    "studies": (("studies.db",), "skip-search studies (Optuna SQLite storage)"),
    "online": (("online",), "skip sets found on the fly (--skip-config online), per model, dtype and skip ratio"),
    "compiled": (("inductor",), "torch.compile kernels (--compile)"),
    "native": (("native",), "GGUF indexes (config, tensor types and byte ranges) for --dtype native's memory-mapped loads"),
    "kernels": (("kernels",), "selfspec's own C kernels (exact attention, GGUF block matmuls), built for this machine's compiler"),
    "openvino": (("openvino",), "OpenVINO IR folders converted once from GGUF files by OpenVINO GenAI (bench peers)"),
    "llama-cpp": (("llama-cpp",), "llama-cpp-python wheels built once per instruction set (`make extras`)"),
    "rows": (("rows.json",), "per-machine probe of which linears need single rows padded to stay row-invariant"),
    "kernel-paths": (("kernel-paths.json",), "per-machine timing of kernel paths that give the same bits (short Q8_0 "
                                             "rows, verify passes of a few rows)"),
}


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file below a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def entries() -> list[dict]:
    root = cache_dir()
    rows = []
    for kind, (names, what) in KINDS.items():
        paths = [root / n for n in names if (root / n).exists()]
        count = sum(1 if p.is_file() else sum(1 for _ in p.iterdir()) for p in paths)
        rows.append({"kind": kind, "bytes": sum(disk_size(p) for p in paths), "entries": count, "what": what,
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
            freed += disk_size(path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return freed
