"""What this CPU can do, and the dtype we pick for it (DESIGN.md, "Machines differ")."""
from __future__ import annotations

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


def resolve_dtype(name: str) -> tuple[torch.dtype, str]:
    """The float dtype the decoder computes in, and the dtype's name as reported in stats.

    `auto` is bf16 only where the CPU computes bf16 natively. Without it (AVX2), bf16 matmuls are
    emulated: one token decodes ~1.5x faster than fp32, but verifying 8 tokens costs 5-7 decode
    steps instead of ~2 (measured with ../shared/tools/cpu_kernels.py), which makes speculation
    lose. fp32 keeps verification cheap there. `int8`/`int4` compute in fp32 around weight-only
    quantised linears (see `WEIGHT_BITS`)."""
    if name == "auto":
        name = "bf16" if native_bf16() else "fp32"
    if name in WEIGHT_BITS:
        return torch.float32, name
    if name not in DTYPES:
        raise InvalidParameterError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return DTYPES[name], name
