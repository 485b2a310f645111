"""What this CPU can do, and the dtype we pick for it (DESIGN.md, "Machines differ")."""
from __future__ import annotations

import os
import platform
import re
from functools import lru_cache

import torch

from selfspec.errors import InvalidParameterError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Weight-only quantised dtypes: the linears' weights in int8/int4, everything else (embeddings,
# norms, attention, KV cache) in fp32 (selfspec/models/quant.py).
WEIGHT_BITS = {"int8": 8, "int4": 4}
DTYPE_CHOICES = ("auto", "fp32", "bf16", "int8", "int4")


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


# Why `--dtype auto` computes in fp32 (reported as `dtype_reason`).
AUTO_REASON = ("fp32: the model at full activation precision gives the same answer on every machine; "
               "bf16, int8 and int4 change the model's output (95-97% greedy agreement with fp32) and are "
               "opt-in (--dtype)")


def resolve_dtype(name: str) -> tuple[torch.dtype, str]:
    """The float dtype the decoder computes in, and the dtype's name as reported in stats.

    `auto` is fp32: the one full-precision option today, so a user gets the same answer on every
    machine (`AUTO_REASON`). Picking bf16 from a CPU flag had made the default both another model
    and slower (AVX-512-bf16 EPYC: plain bf16 19-23 tok/s on SmolLM2 against fp32's 24-25, and
    `auto` speculation 1.07-1.21x against fp32's 1.67-3.18x). `int8`/`int4` compute in fp32
    around weight-only quantised linears (see `WEIGHT_BITS`)."""
    if name == "auto":
        name = "fp32"
    if name in WEIGHT_BITS:
        return torch.float32, name
    if name not in DTYPES:
        raise InvalidParameterError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return DTYPES[name], name
