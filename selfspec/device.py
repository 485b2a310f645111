"""Where the decoder runs: `--device cpu|cuda|auto` (docs/gpu.md).

The decoder, KV cache, sampling, drafters and verification are device-agnostic: every tensor
they create during decoding is made on the model's device (`Transformer.device`). Token ids that
only drafters look at (n-gram lookup, draft token lists) stay on the CPU and are copied in with
the round's forward input. What is CPU-only is said here: the int8/int4 weight layouts are packed
for PyTorch's CPU kernels (`aten._weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), so CUDA
takes float weights, bf16 by default.
"""
from __future__ import annotations

import torch

from selfspec.errors import InvalidParameterError, SelfspecError

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
    """What a benchmark's `machine` block says about the device (CONVENTIONS.md, "Benchmark")."""
    if device.type != "cuda":
        return {"device": str(device)}
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
