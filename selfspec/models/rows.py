"""Row invariance of the linears, decided per machine by a probe at load.

The forward pass must be row-invariant: row i of a k-token pass bitwise equal to the 1-token pass
at that position, or verifying k drafts at once could pick another token than plain decoding
(lossless means equal token ids). Attention is by construction
(selfspec/kernels/attention.c). Linears depend on the kernel library: oneDNN picks another code
path for a single row on some shapes (measured: SmolLM2's `w_down`, 1536 input features, fp32
prepacked and bf16 alike, on an AVX-512-bf16 EPYC), while PyTorch's int8/int4 weight-only
kernels were invariant for every row count. So each linear is probed once per (instruction set,
library versions, kernel, shape) on random rows, for every row count a forward uses (1..CHUNK):

- "direct": every row of an M-row call equals the 1-row call on that row;
- "pad1":   that holds once a 1-row call is computed as two identical rows;
- "rowwise": neither; each row is then computed alone (padded), exact whatever the kernel does.

The probe rows are made so that another summation order cannot hide: each is orthogonal (in
float64) to half of the weight rows, so those outputs are ~0 and consist of rounding only. On
plain random rows a bf16 output rounds most order changes away: SmolLM2's bf16 `w_down` passed
such a probe on layer 0's weights (8 rows, every row count) while a 9-token forward's row 4 of
layer 11 differed from the 1-token pass (tests/test_row_invariance.py); on these rows every one
of its 30 layers shows the M=1 switch, in bf16 as in fp32.

Results are cached in `SELFSPEC_CACHE/rows.json`, keyed by `machine.isa_key()`.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter

import torch

from selfspec.paths import atomic_write_json, read_entries
from selfspec.models.transformer import CHUNK, Linear, Transformer

log = logging.getLogger("selfspec.rows")

PROBE_ROWS = tuple(range(2, 18)) + tuple(m for m in (24, 32, 48, CHUNK) if m <= CHUNK)
REF_ROWS = 8  # rows of each M-row call compared with their single-row results
POLICIES = ("direct", "pad1", "rowwise")
PROBE_VERSION = 2  # in the cache key: 1 probed with plain random rows (see the module doc)


def _activation_dtype(lin: Linear) -> torch.dtype:
    w = getattr(lin, "weight", None)
    return w.dtype if w is not None and w.dtype.is_floating_point else torch.float32


def probe_rows(lin: Linear, n: int) -> torch.Tensor:
    """`n` random input rows orthogonal to `lin`'s first min(out, in // 2) weight rows (computed in
    float64, then cast to the activation dtype), so those outputs are rounding noise and every
    change of summation order shows in them, even through a bf16 output."""
    from selfspec.models.quant import dense_weight

    g = torch.Generator(device="cpu").manual_seed(0)
    w = dense_weight(lin)[: min(lin.out_features, lin.in_features // 2)].double()
    q, _ = torch.linalg.qr(w.t())  # [in, s], orthonormal
    x = torch.randn(n, lin.in_features, generator=g, dtype=torch.float64, device="cpu")
    x = x - (x @ q) @ q.t()
    return (x / x.std(dim=1, keepdim=True)).to(_activation_dtype(lin))


def probe_linear(lin: Linear) -> str:
    """The cheapest policy under which `lin` is row-invariant on this machine (see module doc)."""
    X = probe_rows(lin, max(PROBE_ROWS))
    if lin.bias is not None:  # the same kernel call with a zero bias: a bias would round the ~0 outputs away
        lin = copy.copy(lin)
        lin.bias = torch.zeros_like(lin.bias)
    n_ref = min(REF_ROWS, X.shape[0])
    single = [lin._apply(X[r: r + 1].clone()) for r in range(n_ref)]
    padded = [lin._apply(X[r: r + 1].expand(2, -1).contiguous())[:1] for r in range(n_ref)]
    multi = {m: lin._apply(X[:m].clone()) for m in PROBE_ROWS}

    def agrees(refs) -> bool:
        return all(torch.equal(y[r: r + 1], refs[r]) for m, y in multi.items() for r in range(min(m, n_ref)))

    if agrees(single):
        return "direct"
    if agrees(padded):
        return "pad1"
    return "rowwise"


def _key(lin: Linear) -> str:
    from selfspec import __version__
    from selfspec.hardware import isa_key

    bias = "bias" if lin.bias is not None else "nobias"
    return (f"{isa_key()}|torch={torch.__version__}|selfspec={__version__}|probe={PROBE_VERSION}|"
            f"{type(lin).__name__}|{lin.kernel}|"
            f"{_activation_dtype(lin)}|{lin.out_features}x{lin.in_features}|{bias}")


def _cache_file():
    from selfspec.paths import cache_dir

    return cache_dir() / "rows.json"


def _read_cache() -> dict:
    return {k: v for k, v in read_entries(_cache_file()).items() if v in POLICIES}


def _write_cache(data: dict) -> None:
    path = _cache_file()
    try:
        atomic_write_json(path, data, sort_keys=True)
    except OSError as e:
        log.warning("could not write %s: %s", path, e)


def linears(tr: Transformer) -> list[Linear]:
    """Every linear a full forward pass runs: the layers' four and the LM head."""
    out = [getattr(layer, n) for layer in tr.layers for n in ("wqkv", "wo", "w_gate_up", "w_down")]
    return out + [tr.lm_head]


def make_row_invariant(tr: Transformer, use_cache: bool = True) -> dict[str, int]:
    """Set `rows` on every linear of `tr` from the probe (cached); returns how many linears got
    each policy. Only CPU kernels are probed: on other devices exactness is checked separately."""
    if tr.device.type != "cpu":
        return {}
    cache = _read_cache() if use_cache else {}
    probed: dict[str, str] = {}
    counts: Counter = Counter()
    for lin in linears(tr):
        if getattr(lin, "row_invariant", False):  # by construction (e.g. selfspec/kernels/qgemm.c)
            lin.rows = "direct"
            counts["by-construction"] += 1
            continue
        key = _key(lin)
        policy = probed.get(key) or cache.get(key)
        if policy is None:
            policy = probed[key] = probe_linear(lin)
            if policy == "rowwise":
                log.warning("the %s kernel is not row-invariant on this machine for %dx%d weights: those "
                            "linears compute one row at a time (exact, slower)", lin.kernel, lin.out_features,
                            lin.in_features)
        lin.rows = policy
        counts[policy] += 1
    if probed and use_cache:
        _write_cache({**_read_cache(), **probed})
    return dict(counts)
