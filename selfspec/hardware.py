"""The hardware the decoder runs on: what this CPU can do and the dtype we pick for it (machines
differ in their instruction sets, so the fastest exact dtype does too), and the device
(`--device cpu|cuda|auto`, docs/gpu.md).

The decoder, KV cache, sampling, drafters and verification are device-agnostic: every tensor
they create during decoding is made on the model's device (`Transformer.device`). Token ids that
only drafters look at (n-gram lookup, draft token lists) stay on the CPU and are copied in with
the round's forward input. What is CPU-only is said here: the int8/int4 weight layouts are packed
for PyTorch's CPU kernels (`aten._weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), so CUDA
takes float weights, bf16 by default.
"""
from __future__ import annotations

import os
import platform
import re
from functools import lru_cache

import torch

from selfspec.errors import InvalidParameterError, SelfspecError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Weight-only quantised dtypes: the linears' weights in int8/int4, everything else (embeddings,
# norms, attention, KV cache) in fp32 (selfspec/models/quant.py).
WEIGHT_BITS = {"int8": 8, "int4": 4}
# GGUF-native dtypes: fp32 activations around the file's own blocks (24-bit fixed point per block
# of 256 on the K-quants; selfspec/models/native.py)
NATIVE_DTYPES = ("native", "native-q8")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "int8", "int4", *NATIVE_DTYPES)


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """CPU model name and the SIMD flags that decide kernel speed."""
    model, flags = platform.processor() or "unknown", set()
    try:
        text = open("/proc/cpuinfo").read()
        m = re.search(r"model name\s*:\s*(.*)", text)
        model = m.group(1).strip() if m else model
        f = re.search(r"flags\s*:\s*(.*)", text)
        flags = set(f.group(1).split()) if f else set()
    except OSError:
        pass
    keep = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")
    return {"cpu": model, "flags": [k for k in keep if k in flags], "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def native_bf16() -> bool:
    flags = cpu_info()["flags"]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def isa() -> str:
    """The instruction-set family the kernels actually run with: "avx512" or "avx2" (or
    "default"). ATen's own dispatch level, lowered by `ATEN_CPU_CAPABILITY`; oneDNN's
    `ONEDNN_MAX_CPU_ISA=AVX2` or `SELFSPEC_ISA=avx2` lower it to avx2 as well."""
    family = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2", "default"
    forced = [os.environ.get(v, "").strip().lower() for v in ("SELFSPEC_ISA", "ONEDNN_MAX_CPU_ISA")]
    if family == "avx512" and any(f.startswith("avx2") for f in forced):
        family = "avx2"
    return family


def isa_key() -> str:
    """Everything that decides which kernel code runs, for keys of caches of measured choices
    (costs, row-invariance probes): a forced-AVX2 run never reuses an AVX-512 run's measurements."""
    parts = [f"aten={torch.backends.cpu.get_cpu_capability().lower()}"]
    for var in ("ONEDNN_MAX_CPU_ISA", "SELFSPEC_ISA"):
        parts.append(f"{var.lower()}={os.environ.get(var, '').strip().lower() or '-'}")
    parts.append("flags=" + ",".join(cpu_info()["flags"]))
    return ";".join(parts)


# Why `--dtype auto` chose what it did on the CPU (reported as `dtype_reason`): the model as
# shipped, never another one. bf16, int8, int4 and native-q8 round weights or activations
# differently (82-97% greedy agreement with fp32, docs/kernels.md) and are opt-in.
OPT_IN = "bf16, int8, int4 and native-q8 change the model's output and are opt-in (--dtype)"
AUTO_NATIVE_REASON = ("native: the GGUF file's own blocks, the same model as fp32 (up to summation order and "
                      "fp32-sized roundings of the activations), "
                      "2.8-4.0x fp32's plain decoding at 0.2-0.4x the memory (docs/benchmarks.md); " + OPT_IN)


def auto_fp32_reason(why: str) -> str:
    """`dtype_reason` when `--dtype auto` falls back to fp32 on the CPU, `why` said first."""
    return f"fp32: {why}; {OPT_IN}"


def set_threads(threads: int | None) -> None:
    """Set PyTorch's (and so our kernels') CPU thread count for the whole process; None leaves it.
    Process-wide: entry points (the CLI commands, worker processes) call it, and `load_model` for
    a caller that passes `threads`."""
    if threads is None:
        return
    if threads < 1:
        raise SelfspecError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def resolve_dtype(name: str) -> tuple[torch.dtype, str]:
    """The float dtype the decoder computes in, and the dtype's name as reported in stats.

    `auto` here is fp32; `load_model` turns a CPU load of a GGUF file into `native` first where
    every weight has a kernel and the blocks measure faster on this machine
    (`selfspec.models.loading.auto_cpu_dtype`): both are the model as shipped. Picking bf16
    from a CPU flag had made the default both another model and slower (AVX-512-bf16 EPYC:
    plain bf16 19-23 tok/s on SmolLM2 against fp32's 24-25, and `auto` speculation
    1.07-1.21x against fp32's 1.67-3.18x). `int8`/`int4` compute in fp32
    around weight-only quantised linears (see `WEIGHT_BITS`); `native` in fp32 around the GGUF
    file's own blocks (selfspec/models/native.py; native-q8 quantises the activations of those
    linears per row to int8 blocks, opt-in: another model). Why `auto` picks native:
    docs/kernels.md, "Why --dtype auto is native"."""
    if name == "auto":
        name = "fp32"
    if name in WEIGHT_BITS or name in NATIVE_DTYPES:
        return torch.float32, name
    if name not in DTYPES:
        raise InvalidParameterError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return DTYPES[name], name

DEVICE_CHOICES = ("auto", "cpu", "cuda")
CPU = torch.device("cpu")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): CUDA when PyTorch sees a GPU, else the CPU. `cuda` without one is a
    user error that says why (a CPU-only PyTorch build, or no GPU visible)."""
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else name
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise InvalidParameterError(f"--device must be one of {', '.join(DEVICE_CHOICES)} (or cuda:N), got {name!r}")
    if kind == "cpu":
        return CPU
    if not torch.cuda.is_available():
        why = (f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None
               else f"no GPU is visible to torch {torch.__version__} (CUDA {torch.version.cuda})")
        raise SelfspecError(f"CUDA is not available: {why}; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise InvalidParameterError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device(name)


def device_dtype(dtype: str, device: torch.device) -> str:
    """The dtype name to load with on `device`: on CUDA `auto` is bf16 (tensor cores, half the
    bytes) and the CPU-only int8/int4 layouts are refused; on the CPU, `dtype` unchanged."""
    if device.type == "cpu":
        return dtype
    if dtype == "auto":
        return "bf16"
    if dtype in ("int8", "int4"):
        raise InvalidParameterError(
            f"--dtype {dtype} is CPU-only (its weights are packed for PyTorch's CPU kernels); "
            f"on {device.type} use --dtype bf16 or fp32, or run on --device cpu")
    return dtype


def check_cpu_only(what: str, device: torch.device) -> None:
    """Refuse a CPU-only feature (a quantised draft) on another device."""
    if device.type != "cpu":
        raise InvalidParameterError(
            f"{what} is CPU-only (int8/int4 weights packed for PyTorch's CPU kernels); "
            f"on {device.type} use another drafter (layer-skip, ngram, model, auto) or --device cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a wall-clock time covers them (CUDA runs
    asynchronously; a CPU op has finished when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict:
    """What a benchmark's `machine` block says about the device (results.json's `machine`)."""
    if device.type != "cuda":
        return {"device": str(device)}
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}


def comparison_caveat(load_samples: list[float], seconds: list[float], min_seconds: float = 1.0) -> str | None:
    """Why two timings taken one after the other (--compare) may not be comparable, or None: the
    machine's 1-minute load average (os.getloadavg, sampled around the runs) rose above the number
    of cores this process may use, or a run decoded for less than `min_seconds`."""
    cores = usable_cores()
    why = []
    if load_samples and max(load_samples) > cores:
        why.append(f"the machine's load average reached {max(load_samples):.1f} on {cores} cores: other "
                   f"programs shared the CPU")
    if seconds and min(seconds) < min_seconds:
        why.append(f"a run decoded for only {min(seconds):.2f} s (use a larger -n)")
    if not why:
        return None
    return "these timings are not comparable: " + "; ".join(why) + "; the speedup may be far off"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> float:
    """The machine's 1-minute load average (0.0 where the OS does not say)."""
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def machine_busy() -> bool:
    """Whether other programs are loading the CPU now: the 1-minute load average above the
    cores this process may use plus a half (our own threads alone make it about the core count).
    Measurements taken then are not cached (costs for `--draft auto`, the `--dtype auto` timing):
    a contended calibration of SmolLM2 had cached a 2-token verify pass at 4.9 steps."""
    return load_average() > usable_cores() + 0.5
