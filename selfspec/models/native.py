"""`--dtype native`: the GGUF file's own weight blocks, memory-mapped, computed on directly.

Each linear weight stays in its file format (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K, F32, F16, BF16)
in the read-only memory map that `gguf.GGUFReader` opens: no fp32 copy, no re-quantisation, no
weight-cache entry. `NativeLinear` computes y = x W^T with fp32 activations and fp32
accumulation in our C kernel (selfspec/kernels/qgemm.c), which gives every output element one
fixed sequence of operations whatever the number of rows: row-invariant by construction, so the
row probe (selfspec/models/rows.py) is skipped for it. The dequantised weights are those of the
`gguf` package's dequantisers bit for bit; only the summation order differs from the fp32 path,
and on Q4_K/Q6_K the activations' rounding to 24-bit fixed point per block of 256 (each within
about 2^-23 times its block's largest value, held as three bytes; the super-block's products then
exact integers, qgemm_wide.h).

A tensor whose format the kernel lacks (or every tensor, when no C compiler built the kernels)
is dequantised to fp32 at load and takes the fp32 path; `fallback_types` lists those formats
(reported as `native_fallback` in `--json`). The embedding is looked up by dequantising the
asked rows; a tied LM head is a `NativeLinear` over the same blocks.
"""
from __future__ import annotations

import copy
import ctypes
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from selfspec.errors import ModelLoadError
from selfspec.models.transformer import Layer, Linear, Transformer, make_linear

# Byte offset and count of each block's f16 scale fields: a scale that is not finite (inf/NaN)
# would turn the whole output row into NaN, so the load refuses it and names the tensor.
SCALE_FIELDS = {"Q4_0": (0, 1), "Q4_1": (0, 2), "Q5_0": (0, 1), "Q8_0": (0, 1), "Q4_K": (0, 2), "Q6_K": (208, 1)}
# ggml type id -> block size (weights) and bytes per block, for the formats qgemm.c computes on.
KERNEL_FORMATS = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20),
                  "Q5_0": (6, 32, 22), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q6_K": (14, 256, 210),
                  "BF16": (30, 1, 2)}
_SIMD = 8  # the kernel's vector width: F32/F16/BF16 rows need K % 8 == 0
# the formats `native-q8` computes with int8 activations (the float formats keep fp32 activations)
Q8_FORMATS = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K")


class Blocks:
    """One GGUF tensor `[rows, K]` as its raw bytes `[rows, row_bytes]` (a view of the map)."""

    def __init__(self, tensor) -> None:
        import gguf

        self.name = tensor.name
        self.type = gguf.GGMLQuantizationType(int(tensor.tensor_type))
        self.type_name = self.type.name
        shape = [int(s) for s in tensor.shape.tolist()]  # GGUF order: [K, rows, ...]
        self.K = shape[0]
        self.rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        block, size = gguf.GGML_QUANT_SIZES[self.type]
        if self.K % block:
            raise ModelLoadError(f"tensor {self.name} has {self.K} columns, not a multiple of its "
                                 f"{self.type_name} block of {block}")
        self.row_bytes = self.K // block * size
        raw = np.asarray(tensor.data)
        expected = self.rows * self.row_bytes
        if raw.nbytes != expected or not raw.flags.c_contiguous:
            raise ModelLoadError(f"tensor {self.name} ({self.type_name}, {self.rows}x{self.K}) holds "
                                 f"{raw.nbytes} bytes where its shape needs {expected}: the file is truncated "
                                 f"or corrupt")
        with warnings.catch_warnings():  # the map is read-only and nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            self.data = torch.from_numpy(raw.view(np.uint8).reshape(self.rows, self.row_bytes))
        self._check_scales(block, size)

    def _check_scales(self, block: int, size: int) -> None:
        fields = SCALE_FIELDS.get(self.type_name)
        if fields is None:
            return
        off, n = fields
        blocks = self.data.numpy().reshape(-1, size)
        # an f16 is not finite when its five exponent bits are all set: tested on a strided view of
        # the scales' bits, without copying them out (SmolLM2's 211 tensors: 0.03-0.04 -> 0.017 s)
        bits = blocks[:, off: off + 2 * n].view(np.uint16)
        bad = (bits & 0x7C00) == 0x7C00
        if bad.any():
            i = int(np.argmax(bad.any(axis=1)))
            raise ModelLoadError(f"tensor {self.name} ({self.type_name}) has a non-finite scale in block {i} "
                                 f"(row {i // (self.K // block)}): the file is corrupt")

    @property
    def kernel_ok(self) -> bool:
        fmt = KERNEL_FORMATS.get(self.type_name)
        return fmt is not None and self.K % max(fmt[1], _SIMD) == 0

    @property
    def fmt(self) -> int:
        return KERNEL_FORMATS[self.type_name][0]

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 `[n, K]` of the given rows (all by default), by the `gguf` package (the reference)."""
        import gguf

        raw = self.data.numpy() if rows is None else self.data.numpy()[rows.cpu().numpy()]
        return torch.from_numpy(np.array(gguf.quants.dequantize(raw, self.type), dtype=np.float32)).reshape(-1, self.K)


def _lib():
    from selfspec import kernels

    return kernels.library()


class NativeLinear(Linear):
    """y = x W^T (+ b) on one or more `Blocks` side by side (a fused q|k|v keeps each part's
    format). `maps[i]`: the order in which part i's rows are read (None: file order)."""

    kernel = "gguf-native"
    row_invariant = True  # one fixed summation order per output element (qgemm.c)

    def __init__(self, parts: list[Blocks], bias: torch.Tensor | None = None,
                 maps: list[torch.Tensor | None] | None = None, q8: bool = False) -> None:
        Ks = {p.K for p in parts}
        if len(Ks) != 1:
            raise ModelLoadError(f"fused tensors {[p.name for p in parts]} differ in columns: {sorted(Ks)}")
        self.parts = parts
        self.maps = [None if m is None else m.to(torch.int32).contiguous() for m in (maps or [None] * len(parts))]
        self.weight = None
        self.bias = bias
        self.in_features = parts[0].K
        self.out_features = sum(p.rows for p in parts)
        self.nbytes = sum(p.rows * p.row_bytes for p in parts) + (bias.nbytes if bias is not None else 0)
        self.types = sorted({p.type_name for p in parts})
        # native-q8: activations quantised per row in blocks of 32 (256 for Q4_K/Q6_K; qgemm.c),
        # where every part has an integer kernel; a row's quantisation depends on that row only,
        # so still row-invariant
        self.q8 = q8 and all(t in Q8_FORMATS for t in self.types)
        if self.q8:
            self.kernel = "gguf-native-q8"
        n = len(parts)
        self._args = ((ctypes.c_int * n)(*(p.fmt for p in parts)),
                      (ctypes.c_void_p * n)(*(p.data.data_ptr() for p in parts)),
                      (ctypes.c_int64 * n)(*(p.rows for p in parts)),
                      (ctypes.c_void_p * n)(*(None if m is None else m.data_ptr() for m in self.maps)))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(device="cpu", dtype=torch.float32).contiguous()
        M = x2.shape[0]
        y = torch.empty(M, self.out_features, dtype=torch.float32, device="cpu")
        if M:
            lib = _lib()
            fn = lib.selfspec_qgemm_q8 if self.q8 else lib.selfspec_qgemm
            rc = fn(len(self.parts), *self._args, self.in_features, x2.data_ptr(), M, y.data_ptr())
            if rc != 0:
                raise RuntimeError(f"the native kernel rejected {self.types} weights (code {rc})")
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def select_rows(self, ids: torch.Tensor) -> "NativeLinear | None":
        """The linear of output rows `ids` only, on the same blocks read through a row map: a
        draft LM head over part of the vocabulary (drafters/vocab.py) that copies nothing and
        reads only its rows' blocks. None for a fused linear (several parts)."""
        if len(self.parts) != 1:
            return None
        ids = ids.to(device="cpu", dtype=torch.long)
        part, m = self.parts[0], self.maps[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= part.rows):
            raise IndexError(f"row ids out of range of the {part.rows}-row {part.name}")
        sub = copy.copy(part)  # the same map of the file, fewer rows read
        sub.rows = int(ids.numel())
        bias = None if self.bias is None else self.bias[ids]
        return NativeLinear([sub], bias, [ids if m is None else m.long()[ids]], q8=self.q8)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight `[out, in]` (for the row probe's and precision drafts' dense views)."""
        ws = [p.dequantize() if m is None else p.dequantize()[m.long()] for p, m in zip(self.parts, self.maps)]
        return torch.cat(ws)


class _Lin(ctypes.Structure):  # layer.c's native_linear
    _fields_ = [("nseg", ctypes.c_int), ("q8", ctypes.c_int), ("fmt", ctypes.c_void_p), ("ptr", ctypes.c_void_p),
                ("rows", ctypes.c_void_p), ("map", ctypes.c_void_p), ("K", ctypes.c_int64), ("N", ctypes.c_int64),
                ("bias", ctypes.c_void_p)]

    @classmethod
    def of(cls, lin: NativeLinear) -> "_Lin":
        fmt, ptr, rows, maps = lin._args
        return cls(len(lin.parts), int(lin.q8), ctypes.addressof(fmt), ctypes.addressof(ptr), ctypes.addressof(rows),
                   ctypes.addressof(maps), lin.in_features, lin.out_features,
                   None if lin.bias is None else lin.bias.data_ptr())


class _Layer(ctypes.Structure):  # layer.c's native_layer
    _fields_ = [("qkv", _Lin), ("wo", _Lin), ("gate_up", _Lin), ("down", _Lin), ("attn_norm", ctypes.c_void_p),
                ("ffn_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("post_attn_norm", ctypes.c_void_p), ("post_ffn_norm", ctypes.c_void_p), ("H", ctypes.c_int),
                ("KV", ctypes.c_int), ("D", ctypes.c_int), ("gelu", ctypes.c_int), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("softcap", ctypes.c_float)]


FUSED_ENV = "SELFSPEC_FUSED"  # "0": the layers as PyTorch operations around each native linear
MAX_HEAD_DIM = 512  # layer.c's


def fused_layers(tr: Transformer) -> "FusedLayers | None":
    """The decoder's layers as one C call each (kernels/layer.c), or None where that code does
    not cover the model: it runs Llama-family and Gemma layers (RMSNorm, q|k|v with an optional
    bias, Gemma's q/k and post norms, rotate-half RoPE, attention over an fp32 cache, SiLU or
    GELU-tanh MLP) whose four linears are all native. `SELFSPEC_FUSED=0` turns it off."""
    import os

    c = tr.config
    lib = _lib()
    if os.environ.get(FUSED_ENV, "1") == "0" or lib is None or tr.device.type != "cpu" or tr.dtype != torch.float32:
        return None
    if (c.activation not in ("silu", "gelu_tanh") or c.hidden % 8 or c.intermediate % 8 or c.head_dim % 8
            or c.head_dim > MAX_HEAD_DIM):
        return None
    for layer in tr.layers:
        lins = (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
        if not all(isinstance(lin, NativeLinear) for lin in lins) or any(lin.bias is not None for lin in lins[1:]):
            return None
    return FusedLayers(tr, lib)


class FusedLayers:
    """Transformer.forward's per-layer work as `selfspec_native_layer` calls (fused_layers)."""

    def __init__(self, tr: Transformer, lib) -> None:
        c = tr.config
        self.fn = lib.selfspec_native_layer
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.structs = [_Layer(_Lin.of(la.wqkv), _Lin.of(la.wo), _Lin.of(la.w_gate_up), _Lin.of(la.w_down),
                               ptr(la.attn_norm), ptr(la.ffn_norm), ptr(la.q_norm), ptr(la.k_norm),
                               ptr(la.post_attn_norm), ptr(la.post_ffn_norm), c.n_heads, c.n_kv_heads, c.head_dim,
                               int(c.activation == "gelu_tanh"), c.rms_eps, c.query_scale,
                               float(c.attn_softcap or 0.0))
                        for la in tr.layers]
        self.layers = tr.layers  # the tensors the structs point into stay alive with them

    def __call__(self, i: int, x: torch.Tensor, start: int, cache, rope, visibility, attn: bool, mlp: bool) -> None:
        """x [T, hidden] (fp32, contiguous, owned by the caller's forward) += layer i's halves."""
        T = x.shape[0]
        cos, ssin = rope
        lo, mask = visibility if attn else (None, None)
        k, v = cache.k, cache.v
        layer_bytes = k.stride(0) * k.element_size()
        rc = self.fn(ctypes.addressof(self.structs[i]), x.data_ptr(), T, int(attn), int(mlp),
                     k.data_ptr() + i * layer_bytes, v.data_ptr() + i * layer_bytes, cache.max_len, start,
                     None if lo is None else lo.data_ptr(), None if mask is None else mask.data_ptr(),
                     cos.data_ptr(), ssin.data_ptr())
        if rc != 0:
            raise RuntimeError(f"the fused layer kernel failed in layer {i} (code {rc})")


class NativeEmbedding:
    """The token embedding as file blocks; `lookup` dequantises only the asked rows (the same
    values as the fp32 path's embedding, bit for bit)."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, blocks: Blocks) -> None:
        self.blocks = blocks
        self.shape = (blocks.rows, blocks.K)
        self.nbytes = blocks.data.nbytes

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(-1).to(device="cpu", dtype=torch.int64).contiguous()
        lib = _lib()
        if lib is None or not self.blocks.kernel_ok:
            return self.blocks.dequantize(ids).reshape(*tokens.shape, self.shape[1])
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.shape[0]):
            raise IndexError(f"token id out of range of the {self.shape[0]}-row embedding")
        out = torch.empty(ids.numel(), self.shape[1], dtype=torch.float32)
        if lib.selfspec_dequant_rows(self.blocks.fmt, self.blocks.data.data_ptr(), self.shape[1], ids.data_ptr(),
                                     ids.numel(), out.data_ptr()) != 0:
            raise RuntimeError(f"the native kernel cannot read {self.blocks.type_name} embeddings")
        return out.reshape(*tokens.shape, self.shape[1])


def unsupported_types(tensors: dict) -> list[str]:
    """The formats of the weight matrices in `tensors` (internal name -> raw tensor) that the
    kernel lacks, which a native load dequantises to fp32 (`native_fallback`)."""
    import gguf

    missing = set()
    for t in tensors.values():
        shape = [int(d) for d in t.shape.tolist()]
        if len(shape) < 2:
            continue  # norms and biases are read as fp32 on every path
        name = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        fmt = KERNEL_FORMATS.get(name)
        if fmt is None or shape[0] % max(fmt[1], _SIMD):
            missing.add(name)
    return sorted(missing)


STREAM_BYTES = 128 << 20  # fp32 copies of the measured matrix: more than any last-level cache


def copy_blocks(blocks: Blocks) -> Blocks:
    """The same blocks in memory of their own (a copy to stream from, for `measured_choice`)."""
    out = copy.copy(blocks)
    out.data = blocks.data.clone()
    return out


def measured_choice(path: Path, tensors: dict) -> dict:
    """Whether the file's blocks or fp32 weights compute faster on this machine, measured once
    and cached (`SELFSPEC_CACHE/dtype-choice.json`, keyed by the file, the effective ISA, the
    kernel build and the thread count): the first layer's gate projection (its largest matrix) as
    a NativeLinear on the file's blocks and as oneDNN-prepacked fp32 (the fp32 load's kernel),
    both streamed from memory, each timed over a decode step (1 row) plus a verify pass (9 rows),
    medians of 5.
    Returns {"dtype": "native" | "fp32", "native_ms": .., "fp32_ms": .., "tensor": ..}."""
    import hashlib
    import statistics
    import time

    from selfspec import __version__, kernels
    from selfspec.hardware import isa_key
    from selfspec.models.loading import file_key
    from selfspec.paths import add_measurement, cache_dir, read_entries

    name = next((n for n in ("L0.w_gate", "L0.w_up", "L0.wq") if n in tensors), None)
    lib = _lib()
    key = hashlib.sha256("|".join([file_key(Path(path)), isa_key(), __version__, torch.__version__,
                                   kernels.build_name(), str(torch.get_num_threads())]).encode()).hexdigest()[:20]
    store = cache_dir() / "dtype-choice.json"
    cached = read_entries(store).get(key)
    if isinstance(cached, dict):
        return cached
    if name is None or lib is None:
        return {"dtype": "fp32", "native_ms": None, "fp32_ms": None, "tensor": name}
    blocks = Blocks(tensors[name])
    ids = torch.arange(blocks.rows, dtype=torch.int64)
    weight = torch.empty(blocks.rows, blocks.K, dtype=torch.float32)
    if lib.selfspec_dequant_rows(blocks.fmt, blocks.data.data_ptr(), blocks.K, ids.data_ptr(), blocks.rows,
                                 weight.data_ptr()) != 0:
        return {"dtype": "fp32", "native_ms": None, "fp32_ms": None, "tensor": name}
    # Copies enough to stream both from memory, as a decode step does (a model's weights do not
    # fit the caches; one matrix does, and in cache fp32 wins the comparison it loses in decoding)
    copies = min(64, max(2, -(-STREAM_BYTES // weight.nbytes)))  # a tiny test model: 64 are plenty
    fp32_linears = [make_linear(weight.clone()) for _ in range(copies)]
    native_linears = [NativeLinear([copy_blocks(blocks)]) for _ in range(copies)]
    del weight
    xs = [torch.randn(1, blocks.K), torch.randn(9, blocks.K)]
    times: dict[str, list[float]] = {"native": [], "fp32": []}
    with torch.inference_mode():
        for rep in range(6):
            for label, lins in (("native", native_linears), ("fp32", fp32_linears)):
                t = time.perf_counter()
                for x in xs:
                    for lin in lins:
                        lin(x)
                if rep:  # the first round warms oneDNN's primitives
                    times[label].append((time.perf_counter() - t) / copies)
    native_ms, fp32_ms = (1e3 * statistics.median(times[k]) for k in ("native", "fp32"))
    choice = {"dtype": "native" if native_ms <= fp32_ms else "fp32", "native_ms": round(native_ms, 3),
              "fp32_ms": round(fp32_ms, 3), "tensor": f"{name} ({blocks.type_name} {blocks.rows}x{blocks.K})"}
    add_measurement(store, key, choice)
    return choice


# ----------------------------------------------------------------------------------- the index
class RawTensor:
    """What the loaders read of a `gguf.ReaderTensor` (name, tensor_type, shape, data), made from
    the cached index over one read-only memory map of the file."""

    def __init__(self, name: str, tensor_type, shape: list[int], data: np.ndarray) -> None:
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, np.array(shape), data


INDEX_VERSION = 1


def read_index(path) -> tuple:
    """(config, fp32 loaders, raw tensors) of a GGUF file for `--dtype native`.

    `gguf.GGUFReader` parses every metadata field up front, the tokenizer's 49k-262k strings
    included: 5-20 s here, against milliseconds for the weights themselves. So its result (the
    config and each tensor's type, shape and byte range) is cached once per file version in
    `SELFSPEC_CACHE/native/` and a warm load maps the file and slices it."""
    import gguf

    from selfspec.models.config import ModelConfig
    from selfspec.models.loading import gguf_loader, read_gguf_tensors, file_key
    from selfspec.paths import atomic_write_json, cache_dir

    path = Path(path)
    index_file = cache_dir() / "native" / f"{file_key(path)}.json"
    try:
        index = json.loads(index_file.read_text())
        if index.get("version") != INDEX_VERSION:
            index = None
    except (OSError, ValueError):
        index = None
    if index is None:
        config, _, raw = read_gguf_tensors(path)
        index = {"version": INDEX_VERSION, "source": str(path), "config": config.to_dict(),
                 "tensors": {n: {"name": t.name, "type": int(t.tensor_type), "shape": [int(d) for d in t.shape.tolist()],
                                 "offset": int(t.data_offset), "nbytes": int(t.n_bytes)} for n, t in raw.items()}}
        try:
            index_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(index_file, index, indent=None)
        except OSError:
            pass  # a read-only cache folder: the next load parses again
    config = ModelConfig.from_dict(index["config"])
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    raw, src = {}, {}
    for name, e in index["tensors"].items():
        if e["offset"] + e["nbytes"] > mm.size:
            raise ModelLoadError(f"tensor {e['name']} needs bytes {e['offset']}..{e['offset'] + e['nbytes']} of {path}, "
                                 f"which has {mm.size}: the file is truncated")
        t = RawTensor(e["name"], gguf.GGMLQuantizationType(e["type"]), e["shape"],
                      mm[e["offset"]: e["offset"] + e["nbytes"]])
        raw[name] = t
        src[name] = gguf_loader(t, name, config)
    return config, src, raw


# ------------------------------------------------------------------------------------- building
def build_native(config, tensors: dict, src: dict, max_len: int, q8: bool = False) -> tuple[Transformer, dict]:
    """The decoder over the file's blocks. `tensors`: internal name -> the reader's tensor;
    `src`: internal name -> fp32 loader (selfspec/models/loading.py), used for norms, biases and
    the formats the kernel lacks. Returns (decoder, info) with info["native_fallback"]: the
    formats dequantised to fp32 (empty when every linear runs natively). `q8`: `--dtype native-q8`,
    the block-format linears on activations quantised per row to int8 (NativeLinear)."""
    from selfspec.models import greedy_head
    from selfspec.models.loading import unpermute

    c = config
    lib_ok = _lib() is not None
    fallback: Counter = Counter()
    native_types: Counter = Counter()

    def get(name, required=True):
        if name not in src:
            if required:
                raise ModelLoadError(f"the model file lacks tensor {name!r}")
            return None
        return src[name]()

    def row_map(name: str, rows: int) -> torch.Tensor | None:
        if c.arch == "llama" and name.split(".")[-1] in ("wq", "wk"):
            heads = c.n_heads if name.endswith("wq") else c.n_kv_heads
            return unpermute(torch.arange(rows).unsqueeze(1), heads).squeeze(1)
        return None

    made: dict[str, Blocks] = {}

    def blocks(name: str) -> Blocks:
        """The tensor's blocks, checked once (a tied LM head shares the embedding's)."""
        if name not in tensors:
            raise ModelLoadError(f"the model file lacks tensor {name!r}")
        if name not in made:
            made[name] = Blocks(tensors[name])
        return made[name]

    def linear(names: list[str], bias_names: list[str], expected_rows: list[int] | None = None) -> Linear:
        parts = [blocks(n) for n in names]
        for n, p, rows in zip(names, parts, expected_rows or [None] * len(parts)):
            if p.K != c.hidden and n.split(".")[-1] in ("wq", "wk", "wv", "w_gate", "w_up"):
                raise ModelLoadError(f"tensor {n} has {p.K} columns, expected {c.hidden} from the model config")
            if rows is not None and p.rows != rows:
                raise ModelLoadError(f"tensor {n} has {p.rows} rows, expected {rows} from the model config")
        biases = [get(b, required=False) for b in bias_names]
        if any(b is not None for b in biases) and any(b is None for b in biases):
            raise ModelLoadError(f"only some of {names} have a bias")
        bias = torch.cat(biases).float().contiguous() if biases and biases[0] is not None else None
        if lib_ok and all(p.kernel_ok for p in parts):
            native_types.update(p.type_name for p in parts)
            return NativeLinear(parts, bias, [row_map(n, p.rows) for n, p in zip(names, parts)], q8=q8)
        fallback.update(p.type_name for p in parts if not (lib_ok and p.kernel_ok))
        weight = torch.cat([get(n) for n in names]).float().contiguous()
        return make_linear(weight, bias)

    embed_blocks = blocks("embed")
    if (embed_blocks.rows, embed_blocks.K) != (c.vocab_size, c.hidden):
        raise ModelLoadError(f"tensor embed has shape {(embed_blocks.rows, embed_blocks.K)}, expected "
                             f"{(c.vocab_size, c.hidden)} from the model config")
    layers = []
    for i in range(c.n_layers):
        p = f"L{i}."
        norms = {n: (t.float().contiguous() if (t := get(p + n, required=False)) is not None else None)
                 for n in ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")}
        layers.append(Layer(
            attn_norm=get(p + "attn_norm").float().contiguous(),
            wqkv=linear([p + "wq", p + "wk", p + "wv"], [p + "bq", p + "bk", p + "bv"],
                        [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim]),
            wo=linear([p + "wo"], [p + "bo"], [c.hidden]),
            ffn_norm=get(p + "ffn_norm").float().contiguous(),
            w_gate_up=linear([p + "w_gate", p + "w_up"], [p + "b_gate", p + "b_up"], [c.intermediate] * 2),
            w_down=linear([p + "w_down"], [p + "b_down"], [c.hidden]),
            **norms))
    if "lm_head" in tensors:
        lm_head = linear(["lm_head"], [], [c.vocab_size])
    else:
        lm_head = linear(["embed"], [], [c.vocab_size])  # tied: the embedding's blocks
    tr = Transformer(c, NativeEmbedding(embed_blocks), layers, get("final_norm").float().contiguous(), lm_head,
                     max_len)
    tr.fused = fused_layers(tr)
    if greedy_head.eligible(lm_head, c.final_softcap):
        tr.argmax_head = greedy_head.ExactArgmax(lm_head)
    return tr, {"native_types": dict(native_types), "native_fallback": sorted(fallback)}
