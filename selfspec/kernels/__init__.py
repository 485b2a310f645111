"""Our own CPU kernels (C, compiled once per machine with the system's C compiler, loaded with
ctypes), and the exact PyTorch paths used where no compiler is available.

`attention(...)`: fixed-order attention over the KV cache, row-invariant by construction
(`attention.c` says how). `qgemm.c`: y = x W^T on GGUF weight blocks for `--dtype native`
(selfspec/models/native.py calls it through `library()`), one fixed summation order per output. The shared library is built by `make` (`python -m selfspec.kernels
build`), or on first use, into `SELFSPEC_CACHE/kernels/`, keyed by the source, the compiler flags
and the compiler's version. It links the OpenMP runtime that PyTorch already loaded (same soname),
so its threads are PyTorch's threads and `torch.set_num_threads` governs both.

Without a compiler (or with `SELFSPEC_KERNELS=torch`) the same contract is met in PyTorch: each
query row's attention runs alone, with the 1-token pass's shapes, over a freshly gathered copy of
exactly its key sequence, so a k-token pass repeats the 1-token pass's computation row by row.
Slower (about one small matmul pair per row and layer), equally exact; `kernel_status()` says
which path runs and why.
"""
from __future__ import annotations
from selfspec.paths import atomic_output

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("selfspec.kernels")

HERE = Path(__file__).parent
SOURCES = ("attention.c", "qgemm.c", "layer.c")
HEADERS = ("qgemm_group.h", "qgemm_q8.h", "qgemm_wide.h", "simd.h")  # included by the sources: part of the build key, not compiled alone
# No -ffast-math: the compiler may vectorise across independent lanes but must keep every sum in
# the order written; -ffp-contract=off: no fused multiply-add the source does not ask for (fmaf).
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared")
ENV = "SELFSPEC_KERNELS"  # "torch": use the PyTorch paths even where the C kernels build

_lock = threading.Lock()
_status: dict[str, str] = {}


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def library_path(cc: str) -> Path:
    from selfspec.paths import cache_dir

    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((HERE / name).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(_compiler_version(cc).encode())
    return cache_dir() / "kernels" / f"libselfspec-{h.hexdigest()[:16]}.so"


def _cpu_has_avx2() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and " f16c" in flags


def build(verbose: bool = False) -> Path:
    """Compile the kernels (if not yet built for this source and compiler) and return the library
    path. Raises RuntimeError with the reason when that is impossible."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    if not _cpu_has_avx2():
        raise RuntimeError("this CPU lacks AVX2/FMA/F16C, which the compiled kernels need")
    out = library_path(cc)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        cmd = [cc, *CFLAGS, *(str(HERE / s) for s in SOURCES), "-o", str(tmp), "-lm"]
        if verbose:
            print("building selfspec kernels: " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the kernels failed: {proc.stderr.strip()[:400]}")
    return out


@lru_cache(maxsize=1)
def _library():
    """The loaded C library, or None (with `_status["attention"]` saying why)."""
    if os.environ.get(ENV, "").strip().lower() == "torch":
        _status["attention"] = f"torch-rowwise ({ENV}=torch)"
        return None
    with _lock:
        try:
            path = build()
            lib = ctypes.CDLL(str(path))
        except (RuntimeError, OSError) as e:
            _status["attention"] = f"torch-rowwise (no compiled kernel: {e})"
            log.warning("selfspec's compiled attention kernel is unavailable (%s); using the slower "
                        "exact PyTorch path", e)
            return None
    f = lib.selfspec_attention
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                                                                ctypes.c_void_p, ctypes.c_float, ctypes.c_float,
                                                                ctypes.c_int]
    for g in (lib.selfspec_qgemm, lib.selfspec_qgemm_q8):
        g.restype = ctypes.c_int
        g.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                                               ctypes.c_void_p]
    d = lib.selfspec_dequant_rows
    d.restype = ctypes.c_int
    d.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    r = lib.selfspec_argmax_radius
    r.restype = ctypes.c_int
    r.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_double] * 2 + [ctypes.c_void_p]
    c = lib.selfspec_argmax_candidates
    c.restype = ctypes.c_int64
    c.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.selfspec_qgemm_isa.restype = ctypes.c_int
    lib.selfspec_qgemm_isa.argtypes = [ctypes.c_int]
    for f in (lib.selfspec_qgemm_short_q8_0, lib.selfspec_qgemm_few_rows):
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int]
    set_qgemm_isa(lib)
    _status["attention"] = "fixed-order-c"
    return lib


def set_qgemm_isa(lib=None) -> str:
    """Point the GGUF block kernels at this machine's instruction set (`selfspec.hardware.isa`,
    which honours SELFSPEC_ISA=avx2); returns the one in use, "avx512" or "avx2". Both give the
    same bits (qgemm.c); tests switch between them."""
    from selfspec.hardware import isa

    lib = lib or _library()
    if lib is None:
        return "none"
    _status["qgemm"] = "avx512" if lib.selfspec_qgemm_isa(int(isa() == "avx512")) else "avx2"
    kernel_paths(lib)
    return _status["qgemm"]


# GGML's ids of the formats the path timings use (qgemm.c's enum), with their block bytes
_Q5_0, _Q8_0 = (6, 22), (8, 34)


def kernel_paths(lib=None) -> dict:
    """Choose, among kernel paths that give the same bits, the faster on this machine, measured
    once per machine, instruction set, kernel build and thread count and cached
    (`SELFSPEC_CACHE/kernel-paths.json`; not written while other programs load the CPU):
    - `short_q8_0`: Q8_0 rows shorter than 700 at M = 1 (the LM heads of SmolLM2 and Gemma-3,
      Gemma-3's v parts) on the tile path or in registers (`selfspec_qgemm_short_q8_0`): the tile
      path was 1.5x faster on a Zen 4 EPYC, the register path 1.9x on a Zen 3;
    - `few_rows`: up to how many activation rows (1 = none, ..., 4) the 32-block formats are
      decoded into registers per weight row instead of the tile path (`selfspec_qgemm_few_rows`:
      verify passes of 1-3 drafts), 1.1-1.6x at M = 2-4 on a Zen 3.
    Returns {"short_q8_0": "tiles" | "registers", "few_rows": 1..4, "us": the timings, "build": the
    library's file name}."""
    import hashlib
    import time

    from selfspec.hardware import cpu_info, isa_key
    from selfspec.paths import add_measurement, cache_dir, read_entries

    lib = lib or _library()
    info = cpu_info()
    key = hashlib.sha256("|".join([info["cpu"], isa_key(), Path(lib._name).name, str(torch.get_num_threads())])
                         .encode()).hexdigest()[:20]
    store = cache_dir() / "kernel-paths.json"
    choice = read_entries(store).get(key)
    if not (isinstance(choice, dict) and choice.get("short_q8_0") in ("tiles", "registers")
            and choice.get("few_rows") in (1, 2, 3, 4)):
        try:  # the build is recorded for `selfspec cache prune`
            choice = {**_time_paths(lib, time.perf_counter), "build": Path(lib._name).name}
        except (RuntimeError, MemoryError) as e:  # the paths of before, untimed: the same bits
            log.warning("could not time the kernel paths (%s); using the default ones", e)
            choice = {"short_q8_0": "tiles", "few_rows": 1, "us": None}
        if choice["us"] is not None:
            add_measurement(store, key, choice)
    lib.selfspec_qgemm_short_q8_0(int(choice["short_q8_0"] == "tiles"))
    lib.selfspec_qgemm_few_rows(choice["few_rows"])
    _status["paths"] = f"short Q8_0 rows: {choice['short_q8_0']}, few rows in registers up to {choice['few_rows']}"
    return choice


def _random_blocks(fmt: tuple[int, int], rows: int, K: int, g: torch.Generator) -> torch.Tensor:
    """[rows, K/32 blocks] of a 32-block format (fmt: id, bytes per block): random codes and a
    small f16 scale in each block's first two bytes."""
    raw = torch.randint(0, 256, (rows, K // 32, fmt[1]), dtype=torch.uint8, generator=g)
    scales = (torch.rand(rows, K // 32, 1, generator=g) * 0.01 + 0.005).to(torch.float16)
    raw[:, :, :2] = scales.view(torch.uint8)
    return raw.contiguous()


def _time_paths(lib, clock, rounds: int = 7) -> dict:
    """kernel_paths' timings: each choice's alternatives interleaved, the best of `rounds` rounds
    of 3 calls (some 50 ms in all). Short Q8_0 rows: 4096 rows of K = 576 (SmolLM2's head) against
    one activation row. Few rows: Q5_0 1024x896 and Q8_0 1024x1536 (the Qwen 0.5B's and Gemma-3's
    32-block parts) against 2, 3, 4 rows, summed over both: registers run up to the largest M at
    which they, and at every smaller M, beat the tile path."""
    g = torch.Generator().manual_seed(0)
    maps = (ctypes.c_void_p * 1)(None)

    def timer(fmt, raw, K, M):
        rows = raw.shape[0]
        x, y = torch.randn(M, K, generator=g), torch.empty(M, rows)
        args = ((ctypes.c_int * 1)(fmt[0]), (ctypes.c_void_p * 1)(raw.data_ptr()), (ctypes.c_int64 * 1)(rows), maps,
                K, x.data_ptr(), M, y.data_ptr())

        def run(keep=(raw, x, y)) -> float:  # the tensors behind the pointers live as long as run
            t = clock()
            for _ in range(3):
                if lib.selfspec_qgemm(1, *args) != 0:
                    raise RuntimeError("the native kernel rejected its own probe blocks")
            return (clock() - t) / 3
        return run

    def best(setups: dict) -> dict:
        """{name: (setter, run)} -> {name: best seconds}, the alternatives interleaved"""
        out = dict.fromkeys(setups, float("inf"))
        for _ in range(rounds):
            for name, (setter, run) in setups.items():
                setter()
                out[name] = min(out[name], run())
        return out

    short = timer(_Q8_0, _random_blocks(_Q8_0, 4096, 576, g), 576, 1)
    t = best({"tiles": (lambda: lib.selfspec_qgemm_short_q8_0(1), short),
              "registers": (lambda: lib.selfspec_qgemm_short_q8_0(0), short)})
    us = {"short_q8_0": {k: round(v * 1e6, 1) for k, v in t.items()}}
    probes = [(_Q5_0, _random_blocks(_Q5_0, 1024, 896, g), 896), (_Q8_0, _random_blocks(_Q8_0, 1024, 1536, g), 1536)]
    few = 1
    for M in (2, 3, 4):
        runs = [timer(fmt, raw, K, M) for fmt, raw, K in probes]
        t = best({"tiles": (lambda: lib.selfspec_qgemm_few_rows(1), lambda: sum(r() for r in runs)),
                  "registers": (lambda M=M: lib.selfspec_qgemm_few_rows(M), lambda: sum(r() for r in runs))})
        us[f"M={M}"] = {k: round(v * 1e6, 1) for k, v in t.items()}
        if few == M - 1 and t["registers"] < t["tiles"]:
            few = M
    return {"short_q8_0": min(us["short_q8_0"], key=us["short_q8_0"].get), "few_rows": few, "us": us}


def qgemm_isa() -> str:
    """The instruction set the GGUF block kernels run with ("avx512", "avx2" or "none")."""
    return _status.get("qgemm", "none") if _library() is not None else "none"


def library():
    """The loaded C library (attention and the GGUF block kernels of `qgemm.c`), or None when
    it cannot be built or `SELFSPEC_KERNELS=torch`; `kernel_status()` says why."""
    return _library()


def build_name() -> str:
    """The loaded library's file name, which carries the hash of the kernels' sources and flags
    ("no-kernels" without one): part of the keys of measurements that depend on the kernels."""
    return Path(getattr(library(), "_name", "no-kernels")).name


def kernel_status() -> str:
    """Which attention path runs: "fixed-order-c", or "torch-rowwise (<why>)"."""
    _library()
    return _status["attention"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, start: int,
              mask: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """Attention of T query rows over one layer's cache, each row over its own key sequence:
    cache slots lo[t]..start-1, then start + s for every s with mask[t, s].

    q [T, H, D] (any float dtype); k, v [KV, max_len, D] fp32 or bf16 (contiguous); lo [T] int32;
    mask [T, T] uint8. Returns [T, H, D] fp32. Row t's result depends on its query and its key
    sequence only (bit for bit), whatever T is."""
    lib = _library()
    if lib is None or k.dtype not in (torch.float32, torch.bfloat16) or any(
            t.device.type != "cpu" for t in (q, k, v, lo, mask)):
        return _attention_rowwise(q, k, v, lo, start, mask, scale, softcap)
    T, H, D = q.shape
    KV, max_len, _ = k.shape
    # Every pointer handed to C is of a CPU tensor made here or checked above (explicit device:
    # a caller's default device, e.g. "meta" in a test, must not decide where memory lives).
    q = q.float().contiguous()
    out = torch.empty(T, H, D, dtype=torch.float32, device="cpu")
    rc = lib.selfspec_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), T, H, KV, D, max_len,
                                lo.data_ptr(), start, mask.data_ptr(), scale, softcap,
                                int(k.dtype == torch.bfloat16))
    if rc != 0:
        raise MemoryError("the attention kernel could not allocate its work buffer")
    return out


def _attention_rowwise(q, k, v, lo, start, mask, scale, softcap):
    """The PyTorch path: one row at a time, the 1-token pass's shapes, fresh contiguous copies of
    the row's query and keys (so neither a stride nor an alignment differs between passes)."""
    T, H, D = q.shape
    KV = k.shape[0]
    out = torch.empty(T, H, D, dtype=torch.float32, device=q.device)
    new = torch.arange(start, start + T, device=k.device)
    for t in range(T):
        # lo[t] > start when the row's window starts among the new rows (T > window): no cached key.
        index = torch.cat((torch.arange(min(int(lo[t]), start), start, device=k.device), new[mask[t].bool()]))
        keys = k.index_select(1, index).float()  # [KV, n, D], fresh
        values = v.index_select(1, index).float()
        qt = q[t].float().reshape(KV, H // KV, D).clone()
        scores = torch.matmul(qt, keys.transpose(1, 2)) * scale  # [KV, g, n]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores, dim=-1)
        out[t] = torch.matmul(probs, values).reshape(H, D)
    return out


def main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m selfspec.kernels build", file=sys.stderr)
        return 2
    try:
        path = build(verbose=True)
    except RuntimeError as e:
        print(f"selfspec kernels not built: {e}. selfspec will use its slower exact PyTorch "
              f"attention instead, and --dtype native will dequantise the GGUF's weights to fp32 "
              f"(said in --json as native_fallback).", file=sys.stderr)
        return 0  # a working fallback exists: never fail the install
    print(f"selfspec kernels: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
