"""The precision self-draft of a GGUF-native model (`--draft quantized` on `--dtype native` or
`native-q8`): the same decoder drafting on cheaper native blocks.

A native model's weights are the file's own blocks, so the cheaper copy is a cheaper block
format, computed by the same kernels (selfspec/kernels/qgemm.c). With `--draft-bits 4` (the
default here) every layer part stored with more than 4.5 bits per weight (Q4_1, Q5_0, Q6_K, Q8_0,
F16, BF16, F32) gets a copy in Q4_K where its rows are whole super-blocks of 256 (the integer
kernel that reaches the bandwidth) and in Q4_0 otherwise; with `--draft-bits 8`, parts above
Q8_0's 8.5 get Q8_0 copies. The LM head gets a Q8_0 copy only where it has more than 8.5 bits
(quant.HEAD_BITS: a 4-bit head cut SmolLM2's agreement from 95% to 87%). Parts already at or
below the target are shared, not copied. And the draft multiplies with activations quantised per
row to int8 (the `native-q8` kernels), which on the K-quants take half the time of fp32
activations (docs/kernels.md). The draft may be any function of the context: verification runs
the model as loaded, so the output stays that of the loaded model bit for bit.

Where neither helps (a `native-q8` model whose blocks all have at most the target's bits, such
as a Q4_0 file for a 4-bit draft) no cheaper native format exists, and `NoCheaperFormat` says
so: the caller turns it into a plain error (drafters/quantized.py) or leaves the draft out
(drafters/auto.py).
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from selfspec.errors import InvalidParameterError
from selfspec.models.native import KERNEL_FORMATS, Blocks, NativeLinear, _lib, fused_layers
from selfspec.models.quant import LINEARS
from selfspec.models.transformer import Transformer

# bits per weight of each format the kernels compute on (block bytes * 8 / block weights)
BITS_PER_WEIGHT = {name: size * 8 / block for name, (_, block, size) in KERNEL_FORMATS.items()}
HEAD_FORMAT = "Q8_0"
_CHUNK_ROWS = 4096  # rows dequantised at a time: the 1.5B's 151936-row head without a 0.9 GB fp32 copy


class NoCheaperFormat(InvalidParameterError):
    """The native model has no cheaper native form for a precision draft."""


def _reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1 / x in fp32, 0 where x is 0 (an all-zero block: every code then rounds to its zero)."""
    return torch.where(x != 0, 1 / x.float(), torch.zeros((), dtype=torch.float32))


def quantise_q4_0(w: torch.Tensor) -> torch.Tensor:
    """fp32 `[rows, K]` (K % 32 == 0) as Q4_0 blocks `[rows, K / 32 * 18]`: per 32 weights an f16
    scale d and 4-bit codes q with w ~ d (q - 8); d is the block's largest-magnitude weight over
    -8, so that weight is exactly code 0 and the rest round to nearest. Byte j of a block's codes
    holds weight j in its low nibble and weight j + 16 in its high one (the GGUF layout)."""
    rows, K = w.shape
    b = w.reshape(rows, K // 32, 32)
    peak = b.gather(2, b.abs().argmax(dim=2, keepdim=True))  # signed, [rows, n, 1]
    d = (peak / -8).to(torch.float16)
    q = torch.clamp(torch.round(b * _reciprocal(d)) + 8, 0, 15).to(torch.uint8)
    codes = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat((d.view(torch.uint8).reshape(rows, K // 32, 2), codes), dim=2).reshape(rows, -1)


def quantise_q8_0(w: torch.Tensor) -> torch.Tensor:
    """fp32 `[rows, K]` (K % 32 == 0) as Q8_0 blocks `[rows, K / 32 * 34]`: per 32 weights an f16
    scale d = max|w| / 127 and int8 codes q with w ~ d q, rounded to nearest."""
    rows, K = w.shape
    b = w.reshape(rows, K // 32, 32)
    d = (b.abs().amax(dim=2, keepdim=True) / 127).to(torch.float16)
    q = torch.clamp(torch.round(b * _reciprocal(d)), -127, 127).to(torch.int8)
    return torch.cat((d.view(torch.uint8).reshape(rows, K // 32, 2), q.view(torch.uint8)), dim=2).reshape(rows, -1)


def quantise_q4_k(w: torch.Tensor) -> torch.Tensor:
    """fp32 `[rows, K]` (K % 256 == 0) as Q4_K blocks `[rows, K / 256 * 144]`: per super-block of
    256 an f16 scale d and offset scale dmin, per sub-block of 32 a 6-bit scale sc and offset m,
    and 4-bit codes q with w ~ d sc q - dmin m. Each sub-block's range [min(lo, 0), max(hi, 0)] is
    spread over the 16 codes (no search for better scales: this is a draft's copy). Layout as
    the gguf package reads it: d, dmin, the 12 bytes of packed scales (sub-blocks 0-3 in the low
    6 bits of bytes 0-3 and 4-7, sub-blocks 4-7 in the nibbles of bytes 8-11 plus the top 2 bits
    of bytes 0-7), then 128 bytes of codes (sub-block 2i in the low nibbles of bytes 32i..32i+31,
    2i+1 in the high ones)."""
    rows, K = w.shape
    b = w.reshape(rows, K // 256, 8, 32)
    lo = b.amin(dim=3).clamp(max=0)
    scale = (b.amax(dim=3).clamp(min=0) - lo) / 15  # [rows, n, 8]
    d = (scale.amax(dim=2, keepdim=True) / 63).to(torch.float16)
    dmin = ((-lo).amax(dim=2, keepdim=True) / 63).to(torch.float16)

    sc = torch.clamp(torch.round(scale * _reciprocal(d)), 0, 63)
    m = torch.clamp(torch.round(-lo * _reciprocal(dmin)), 0, 63)
    ds = (d.float() * sc).unsqueeze(3)
    dm = (dmin.float() * m).unsqueeze(3)
    q = torch.clamp(torch.round((b + dm) * _reciprocal(ds)), 0, 15).to(torch.uint8)  # [rows, n, 8, 32]
    codes = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).reshape(rows, K // 256, 128)
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    packed = torch.cat((sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                        (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)), dim=2)
    head = torch.cat((d.view(torch.uint8).reshape(rows, -1, 2), dmin.view(torch.uint8).reshape(rows, -1, 2)), dim=2)
    return torch.cat((head, packed, codes), dim=2).reshape(rows, -1)


QUANTISERS = {"Q4_0": quantise_q4_0, "Q8_0": quantise_q8_0, "Q4_K": quantise_q4_k}


def requantised(part: Blocks, fmt: str, data: torch.Tensor | None = None) -> Blocks:
    """A copy of `part` in format `fmt`, in memory of its own: its rows dequantised a chunk at a
    time by the kernel library (the gguf package's values bit for bit) and quantised again; or
    `data`, those blocks as an earlier run made them (the weight cache), when its shape fits."""
    _, block, size = KERNEL_FORMATS[fmt]
    shape = (part.rows, part.K // block * size)
    if data is not None and tuple(data.shape) == shape and data.dtype == torch.uint8:
        return _blocks_like(part, fmt, data)
    lib, quantise = _lib(), QUANTISERS[fmt]
    out = torch.empty(shape, dtype=torch.uint8)
    for lo in range(0, part.rows, _CHUNK_ROWS):
        ids = torch.arange(lo, min(lo + _CHUNK_ROWS, part.rows), dtype=torch.int64)
        w = torch.empty(ids.numel(), part.K, dtype=torch.float32)
        if lib.selfspec_dequant_rows(part.fmt, part.data.data_ptr(), part.K, ids.data_ptr(), ids.numel(),
                                     w.data_ptr()) != 0:
            raise RuntimeError(f"the native kernel cannot read {part.type_name} blocks")
        out[lo: lo + ids.numel()] = quantise(w)
    return _blocks_like(part, fmt, out)


def _blocks_like(part: Blocks, fmt: str, data: torch.Tensor) -> Blocks:
    """`part`'s name and shape over `data`, blocks of format `fmt`."""
    import gguf

    made = copy.copy(part)
    made.type = gguf.GGMLQuantizationType[fmt]
    made.type_name = fmt
    made.row_bytes = data.shape[1]
    made.data = data
    return made


def _format(part: Blocks, bits: int | None) -> str:
    """The draft's format for `part` (bits None: the LM head): Q4_K where a row is whole super-
    blocks of 256 (our fastest integer kernel, docs/kernels.md), else Q4_0; Q8_0 for 8 bits."""
    if bits is None or bits == 8:
        return HEAD_FORMAT if bits is None else "Q8_0"
    return "Q4_K" if part.K % 256 == 0 else "Q4_0"


def _cheaper(part: Blocks, bits: int | None) -> bool:
    return part.K % 32 == 0 and BITS_PER_WEIGHT[part.type_name] > BITS_PER_WEIGHT[_format(part, bits)]


def plan(tr: Transformer, bits: int) -> dict:
    """What a `bits` draft of native decoder `tr` would change, before building it:
    {"copies": {format: count of parts re-quantised}, "int8_activations": bool (the model's
    linears run on fp32 activations now), "extra_bytes": bytes the copies hold}."""
    if bits not in (4, 8):
        raise InvalidParameterError(f"draft bits must be 8 or 4, got {bits}")
    copies: dict[str, int] = {}
    extra = 0
    q8_gain = False
    for lin, b in _linears(tr, bits):
        if not isinstance(lin, NativeLinear):
            continue  # a format the kernels lack, dequantised at load: the draft shares it
        q8_gain |= not lin.q8
        for p in lin.parts:
            if _cheaper(p, b):
                key = f"{p.type_name}->{_format(p, b)}"
                copies[key] = copies.get(key, 0) + 1
                _, block, size = KERNEL_FORMATS[_format(p, b)]
                extra += p.rows * p.K // block * size
    return {"copies": copies, "int8_activations": q8_gain, "extra_bytes": extra}


def _linears(tr: Transformer, bits: int):
    for layer in tr.layers:
        for name in LINEARS:
            yield getattr(layer, name), bits
    yield tr.lm_head, None


def is_native(tr: Transformer) -> bool:
    return isinstance(tr.layers[0].wqkv, NativeLinear) if tr.layers else False


def draft_view(tr: Transformer, bits: int = 4, copies: bool = True) -> Transformer:
    """The decoder a precision self-draft of native `tr` runs (module docstring), over the same
    embedding, norms, RoPE tables and KV-cache layout. Raises NoCheaperFormat where it would
    compute exactly what `tr` computes. `copies=False`: the file's blocks only, on int8
    activations (for measuring what the copies add: scripts/profile_step.py --native-draft)."""
    what = plan(tr, bits) if copies else {"copies": {}, "int8_activations": True, "extra_bytes": 0}
    if not what["copies"] and not what["int8_activations"]:
        types = sorted({t for lin, _ in _linears(tr, bits) for t in getattr(lin, "types", ())})
        limit = "Q4_0/Q4_K's 4.5" if bits == 4 else "Q8_0's 8.5"
        raise NoCheaperFormat(f"no cheaper native format exists for a {bits}-bit draft of this model: its blocks "
                              f"({', '.join(types)}) have at most {limit} bits per weight, its head at most "
                              f"Q8_0's, and it already runs on int8 activations (--dtype native-q8)")
    from selfspec.progress import Bar

    made: dict[int, Blocks] = {}  # id(part) -> its copy, made once however often the part is listed
    cached = _cached_copies(tr, bits) if copies and what["copies"] else None
    by_key: dict[str, torch.Tensor] = {}  # every copy's blocks by their weight-cache name
    computed = False

    def view_of(lin, b: int | None, name: str):
        nonlocal computed
        if not isinstance(lin, NativeLinear):
            return lin
        parts = []
        for i, p in enumerate(lin.parts):
            if copies and _cheaper(p, b):
                if id(p) not in made:
                    key = f"{name}.{i}"
                    old = cached.pop(key, None) if cached is not None else None
                    made[id(p)] = requantised(p, _format(p, b), old)
                    by_key[key] = made[id(p)].data
                    computed |= by_key[key] is not old
                p = made[id(p)]
            parts.append(p)
        return NativeLinear(parts, lin.bias, lin.maps, q8=True)

    layers = []
    label = f"building the {bits}-bit native draft (layers)"
    with Bar(label, len(tr.layers) + 1, delay=1.0) as bar:
        for i, layer in enumerate(tr.layers):
            layers.append(dataclasses.replace(layer, **{n: view_of(getattr(layer, n), bits, f"L{i}.{n}")
                                                        for n in LINEARS}))
            bar.advance()
        head = view_of(tr.lm_head, None, "lm_head")
        bar.advance()
    if computed:
        _store_copies(tr, bits, by_key)
    view = Transformer(tr.config, tr.embed, layers, tr.final_norm, head, tr.rope_max)
    view.fused = fused_layers(view)
    view.draft_plan = what
    return view


def relative_cost(view: Transformer, tr: Transformer, context: int = 8, reps: int = 5) -> float:
    """A draft step of `view` over a decode step of `tr`, measured here (medians of `reps`
    one-token forwards each, interleaved, after one warm-up, over a small cache of its own): the
    prior of auto's cost estimate for the draft, which decides whether it is tried at all. On the
    registry models it ranges from ~0.45 (Qwen 1.5B: K-quants at twice the speed on int8
    activations) to ~0.8 (SmolLM2, whose step is not bound by its weights' bytes)."""
    import statistics
    import time

    cache = tr.new_cache(context + 2)
    prefix = torch.arange(context) % tr.config.vocab_size
    tok = torch.tensor([1])
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.inference_mode():
        tr.forward(prefix, 0, cache, last_only=True)
        for rep in range(reps + 1):
            for i, model in enumerate((tr, view)):
                cache.rollback(context)
                t = time.perf_counter()
                model.forward(tok, context, cache, last_only=True)
                if rep:
                    times[i].append(time.perf_counter() - t)
    return statistics.median(times[1]) / statistics.median(times[0])


def _ratio_path(model, bits: int):
    from selfspec.drafters.costs import _path

    return _path(model).with_suffix(f".native-draft{bits}.json")


def cached_relative_cost(model, bits: int) -> float | None:
    """`relative_cost` of `model`'s `bits` draft as measured by an earlier run on this machine
    (cached beside its forward-pass costs, under the same key: model file, dtype, kernel build,
    thread count), or None."""
    import json

    try:
        ratio = float(json.loads(_ratio_path(model, bits).read_text())["ratio"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ratio if ratio > 0 else None


def measure_relative_cost(model, bits: int, view: Transformer) -> float:
    """`relative_cost` of `view`, cached for later runs unless the machine is busy (costs.
    write_entry: a contended measurement would mislead every later run)."""
    from selfspec.drafters.costs import write_entry

    ratio = relative_cost(view, model.transformer)
    try:
        write_entry(_ratio_path(model, bits), {"ratio": ratio})
    except OSError:
        pass  # a read-only cache folder: the next run measures again
    return ratio


# ---------------------------------------------------------------- the copies in the weight cache
def _cache_key(tr: Transformer, bits: int):
    from selfspec.models import weightcache

    if getattr(tr, "source", None) is None or not weightcache.enabled():
        return None
    # the layout names the rule that picks each part's format (_format, _cheaper, HEAD_FORMAT)
    return weightcache.key_for(tr.source, f"{weightcache.DRAFT_DTYPE}{bits}", "q4k256-else-q40-head-q80")


def _cached_copies(tr: Transformer, bits: int):
    """The copies an earlier run stored for this file and rule (weightcache.Tensors, mapped), or
    None."""
    from selfspec.models import weightcache

    key = _cache_key(tr, bits)
    hit = weightcache.load(key) if key is not None else None
    return None if hit is None else hit[1]


def _store_copies(tr: Transformer, bits: int, tensors: dict[str, torch.Tensor]) -> None:
    """Keep the copies for the next run (weightcache.store: atomic, skipped on a full disk)."""
    from selfspec.models import weightcache

    key = _cache_key(tr, bits)
    if key is not None and tensors:
        weightcache.store(key, tr.config, tensors, tr.source)
