"""`--dtype native` (selfspec/models/native.py, selfspec/kernels/qgemm.c): the kernel on every
block format against the `gguf` package's dequantiser followed by a float64 matmul, bitwise row
invariance for M = 1..9 (and past the kernel's 12-row slab), odd shapes, and the real SmolLM2
against its fp32 load: logits, greedy tokens, every drafter lossless on top."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from nativecheck import assert_native_matches_fp32
from selfspec import kernels
from selfspec.errors import SelfspecError
from selfspec.models import native

FORMATS = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32", "F16", "BF16")
# byte offset and count of each block's f16 scale fields (kept finite and small in random blocks)
_F16_FIELDS = {"Q4_0": (0, 1), "Q4_1": (0, 2), "Q5_0": (0, 1), "Q8_0": (0, 1), "Q4_K": (0, 2), "Q6_K": (208, 1)}

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason=f"no compiled kernel: {kernels.kernel_status()}")


def random_blocks(tname: str, rows: int, K: int, rng: np.random.Generator):
    """Random `[rows, row_bytes]` blocks of format `tname` (every quant bit random, scales finite)."""
    t = gguf.GGMLQuantizationType[tname]
    if tname in ("F32", "F16", "BF16"):
        w = rng.standard_normal((rows, K)).astype(np.float32)
        raw = {"F32": lambda: w.view(np.uint8), "F16": lambda: w.astype(np.float16).view(np.uint8),
               "BF16": lambda: (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)}[tname]()
        return raw.reshape(rows, -1).copy(), t
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (rows, K // block, size), dtype=np.uint8)
    off, n = _F16_FIELDS[tname]
    scales = (rng.uniform(0.5, 2.0, (rows, K // block, n)) * 0.01).astype(np.float16)
    raw[:, :, off: off + 2 * n] = scales.view(np.uint8).reshape(rows, K // block, 2 * n)
    return raw.reshape(rows, -1), t


def linear_of(raw: np.ndarray, t, rows: int, K: int, q8: bool = False) -> native.NativeLinear:
    return native.NativeLinear([native.Blocks(native.RawTensor("w", t, [K, rows], raw))], q8=q8)


# (format, q8): every format on fp32 activations, the block formats also on int8 ones (native-q8)
KERNELS = [(t, False) for t in FORMATS] + [(t, True) for t in native.Q8_FORMATS]
KERNEL_IDS = [t + ("-q8" if q8 else "") for t, q8 in KERNELS]


def reference(raw: np.ndarray, t, rows: int, K: int, x: torch.Tensor) -> torch.Tensor:
    w = torch.from_numpy(np.array(gguf.quants.dequantize(raw, t), dtype=np.float32)).reshape(rows, K)
    return (x.double() @ w.double().t()).float()


def _block(tname: str) -> int:
    return max(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tname]][0], 8)


@needs_kernel
@pytest.mark.parametrize("tname", FORMATS)
@pytest.mark.parametrize("shape", ["37x2block", "1xblock", "5x3block"])
def test_kernel_matches_dequantised_matmul(tname, shape):
    rows, nblocks = {"37x2block": (37, 2), "1xblock": (1, 1), "5x3block": (5, 3)}[shape]
    K = nblocks * _block(tname) * (8 if _block(tname) < 32 else 1)  # F32/F16/BF16: K = 64..192
    raw, t = random_blocks(tname, rows, K, np.random.default_rng(1))
    x = torch.randn(9, K, generator=torch.Generator().manual_seed(0))
    y = linear_of(raw, t, rows, K)(x)
    ref = reference(raw, t, rows, K, x)
    err = (y - ref).abs().max().item()
    # fp32 accumulation in another order than float64: a few ulps of the largest partial sums
    bound = 1e-5 * (x.abs() @ torch.from_numpy(np.array(gguf.quants.dequantize(raw, t), dtype=np.float32))
                    .reshape(rows, K).abs().t()).max().item()
    print(f"{tname} {rows}x{K}: max |y - ref| = {err:.3g} (bound {bound:.3g})")
    assert err <= bound


def quantised_rows(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """native-q8's activations, float64: per row and block (32; 256 for the K-quants),
    round(x * 127/amax) * amax/127 (fp32 scale, round half to even), as qgemm.c's quantise_rows
    computes them."""
    xb = x.numpy().reshape(x.shape[0], -1, block)
    amax = np.abs(xb).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return torch.from_numpy(np.rint(xb * inv).astype(np.float64) * (amax / np.float32(127)).astype(np.float64)
                            ).reshape(x.shape)


@needs_kernel
@pytest.mark.parametrize("tname", native.Q8_FORMATS)
def test_q8_kernel_matches_quantised_reference(tname):
    """native-q8 computes the file's weights against activations rounded to int8 per block of 32
    (per 256 for Q4_K and Q6_K, whose integer sub-block scales then fold into one integer per
    super-block): within float rounding of that model's float64 product (measured ~2e-8 of
    Σ|w||x|), and ~1e-3 from the fp32-activation product (the model it approximates)."""
    rows, K = 13, 512
    raw, t = random_blocks(tname, rows, K, np.random.default_rng(3))
    lin = linear_of(raw, t, rows, K, q8=True)
    assert lin.q8 and lin.kernel == "gguf-native-q8"
    x = torch.randn(9, K, generator=torch.Generator().manual_seed(1))
    w = torch.from_numpy(np.array(gguf.quants.dequantize(raw, t), dtype=np.float64)).reshape(rows, K)
    scale = (x.double().abs() @ w.abs().t()).max().item()
    y = lin(x).double()
    xq = quantised_rows(x, 256 if tname in ("Q4_K", "Q6_K") else 32)
    err, off = (y - xq @ w.t()).abs().max().item() / scale, (y - x.double() @ w.t()).abs().max().item() / scale
    print(f"{tname} q8: |y - q8 reference| {err:.2g}, |y - fp32-activation product| {off:.2g} (of max Σ|w||x|)")
    assert err <= 1e-6 and off <= 5e-3


DIGIT_MAX = 65536 * 127 + 256 * 127 + 255  # the largest |a| qgemm.c's three digits hold


def wide_scale(x: torch.Tensor) -> np.ndarray:
    """`native`'s fixed-point scale for the K-quants per row and block of 256, as qgemm.c's
    wide_rows picks it: 2^(23-E) with 2^(E-1) <= amax < 2^E, or 2^(22-E) where amax * 2^(23-E)
    rounds above DIGIT_MAX (amax within 0.4% below a power of two)."""
    xb = x.double().numpy().reshape(x.shape[0], -1, 256)
    amax = np.abs(xb).max(-1, keepdims=True)
    scale = np.ldexp(1.0, 23 - np.frexp(amax)[1])
    return np.where(np.rint(amax * scale) > DIGIT_MAX, scale / 2, scale)


def wide_rows(x: torch.Tensor) -> torch.Tensor:
    """`native`'s activations for the K-quants, float64: round-half-even(x * scale) / scale per
    block (wide_scale; the product by a power of two is exact in both)."""
    xb = x.double().numpy().reshape(x.shape[0], -1, 256)
    scale = wide_scale(x)
    return torch.from_numpy(np.rint(xb * scale) / scale).reshape(x.shape)


def check_kquant_exact(tname: str, x: torch.Tensor, seed: int, label: str) -> None:
    """y against the float64 product of the file's weights and `native`'s own activations (off by
    the float steps only), each row alone bit for bit as in the batch, and against fp32
    activations by at most half a unit of each block's fixed point per activation (<= amax *
    2^-23, x 1.004 where a block took the next exponent)."""
    rows, K = 13, x.shape[1]
    raw, t = random_blocks(tname, rows, K, np.random.default_rng(seed))
    lin = linear_of(raw, t, rows, K)
    w = torch.from_numpy(np.array(gguf.quants.dequantize(raw, t), dtype=np.float64)).reshape(rows, K)
    scale = (x.double().abs() @ w.abs().t()).max(dim=1, keepdim=True).values  # per activation row
    y = lin(x).double()
    for m in range(x.shape[0]):  # the M = 1 path (codes in registers) gives the same bits as M > 1's
        assert torch.equal(lin(x[m:m + 1]).double()[0], y[m])
    own = ((y - wide_rows(x) @ w.t()).abs() / scale).max().item()
    half_unit = torch.from_numpy(np.broadcast_to(0.5 / wide_scale(x), (x.shape[0], K // 256, 256)).reshape(x.shape[0], K))
    moved = half_unit @ w.abs().t()
    fp = ((y - x.double() @ w.t()).abs() - moved - 5e-7 * scale).max().item()
    print(f"{tname} {label}: |y - own model| {own:.2g} of Σ|w||x|; |y - fp32-activation product| "
          f"{((y - x.double() @ w.t()).abs() / scale).max().item():.2g}, within the rounding bound: {fp <= 0}")
    assert own <= 5e-7 and fp <= 0


@needs_kernel
@pytest.mark.parametrize("tname", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("magnitude", [1.0, 1e-36, 1e30])
def test_kquant_kernel_is_exact_on_its_activations(tname, magnitude):
    """`native` on Q4_K/Q6_K holds each activation block of 256 as 24-bit fixed point on a
    power-of-two scale (three digits) and computes the super-block's products in integers,
    exactly: against the float64 product of the file's weights and those activations it is off
    by the float steps only (the lanes' float(), the fmas per super-block); against fp32
    activations by at most amax * 2^-23 per activation. Scales far from 1 (tiny activations
    need two exact steps to their fixed point) keep both."""
    x = torch.randn(9, 768, generator=torch.Generator().manual_seed(4)) * magnitude
    x[1, 300] *= 1e4  # one block whose largest value dwarfs the rest
    check_kquant_exact(tname, x, 5, f"x{magnitude:g}")


@needs_kernel
@pytest.mark.parametrize("tname", ["Q4_K", "Q6_K"])
def test_kquant_kernel_top_of_binade(tname):
    """Blocks whose largest value lies just below a power of two (their fixed point would pass
    the three digits' range; they take the next exponent) or exactly at one, of either sign, and
    a block at the range's edge: still the exact model (a digit that wrapped around would be off
    by 2^24 units)."""
    x = torch.randn(6, 1024, generator=torch.Generator().manual_seed(8))
    below = [1 - 2.0 ** -24, 1 - 2.0 ** -12, 1 - 2.0 ** -9, 0.999, DIGIT_MAX / 2.0 ** 23, 1.0]
    for r, top in enumerate(below):
        for b in range(4):
            blk = x[r, 256 * b:256 * b + 256]
            blk *= 2.0 ** (b - 1) * top / blk.abs().max()  # amax = top * 2^(b-1), a value of either sign
            blk[17 + 13 * r] = (-1) ** (r + b) * blk.abs().max()  # the largest value at both signs
            blk[200] = -blk[17 + 13 * r]
    check_kquant_exact(tname, x, 9, "top of binade")


@needs_kernel
@pytest.mark.parametrize("tname", ["Q4_K", "Q6_K"])
def test_kquant_kernel_special_values(tname):
    """An all-zero activation row gives exact zeros; a NaN or an infinity in a row makes that
    row's outputs NaN (as fp32 activations would), and leaves the other rows as they were."""
    rows, K = 5, 512
    raw, t = random_blocks(tname, rows, K, np.random.default_rng(6))
    lin = linear_of(raw, t, rows, K)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(5))
    clean = lin(x.clone())
    x[1] = 0.0
    x[2, 7], x[3, 400] = float("nan"), float("inf")
    y = lin(x)
    assert torch.equal(y[1], torch.zeros(rows))
    assert y[2].isnan().all() and y[3].isnan().all()
    assert torch.equal(y[0], clean[0])


@needs_kernel
@pytest.mark.parametrize("tname,q8", KERNELS, ids=KERNEL_IDS)
def test_row_invariant_bitwise(tname, q8):
    """Row i of an M-row call equals the 1-row call on that row, bit for bit, for M = 1..9 and
    past the 9- and 12-row slabs (13, 64): one fixed summation order per output element."""
    K = 2 * _block(tname) * (8 if _block(tname) < 32 else 1)
    rows = 11  # not a multiple of the kernel's 4- or 8-row group
    raw, t = random_blocks(tname, rows, K, np.random.default_rng(2))
    lin = linear_of(raw, t, rows, K, q8)
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(3))
    single = [lin(x[i: i + 1].clone()) for i in range(64)]
    for m in (*range(1, 10), 13, 64):
        y = lin(x[:m].clone())
        for i in range(m):
            assert torch.equal(y[i: i + 1], single[i]), f"{tname}: row {i} of an {m}-row call differs"


@pytest.fixture
def isa_paths():
    """Both dequantiser paths of this machine, ["avx2"] or ["avx2", "avx512"]; the machine's own
    is restored afterwards. An AVX2 machine says the AVX-512 path was not run."""
    lib = kernels.library()
    paths = ["avx2"] + (["avx512"] if lib.selfspec_qgemm_isa(1) else [])
    if len(paths) == 1:
        print("this CPU has no AVX-512: the AVX-512 dequantisers were not run")

    def use(path: str) -> None:
        assert lib.selfspec_qgemm_isa(int(path == "avx512")) == int(path == "avx512")

    yield paths, use
    kernels.set_qgemm_isa(lib)


@needs_kernel
@pytest.mark.parametrize("tname,q8", KERNELS, ids=KERNEL_IDS)
def test_isa_paths_give_the_same_bits(tname, q8, isa_paths):
    """The AVX-512 decoders (table lookups) and VNNI dot products give the AVX2 path's outputs
    bit for bit, for every row count: one model, one answer, on both machine families."""
    paths, use = isa_paths
    K, rows = 3 * _block(tname) * (8 if _block(tname) < 32 else 1), 19
    raw, t = random_blocks(tname, rows, K, np.random.default_rng(7))
    lin = linear_of(raw, t, rows, K, q8)
    emb = native.NativeEmbedding(lin.parts[0])
    x = torch.randn(13, K, generator=torch.Generator().manual_seed(8))
    out = {}
    for path in paths:
        use(path)
        out[path] = [lin(x[:m].clone()) for m in (1, 2, 9, 13)] + [emb.lookup(torch.arange(rows))]
    for path in paths[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out["avx2"], out[path])), f"{tname}: {path} != avx2"


@needs_kernel
@pytest.mark.parametrize("K", [576, 640])
def test_short_q8_0_paths_give_the_same_bits(K, isa_paths):
    """Q8_0 rows shorter than 700 take the tile path or the register path at M = 1, whichever
    this machine runs faster (kernels.kernel_paths): both give the same bits, on both instruction
    sets' decoders where the CPU has both, alone and in a fused linear beside Q5_0 parts
    (Gemma-3's q|k|v), so the choice never changes an output."""
    lib = kernels.library()
    rng = np.random.default_rng(11)
    q8_raw, q8_t = random_blocks("Q8_0", 37, K, rng)
    q5_raw, q5_t = random_blocks("Q5_0", 21, K, rng)
    alone = linear_of(q8_raw, q8_t, 37, K)
    fused = native.NativeLinear([native.Blocks(native.RawTensor("q", q5_t, [K, 21], q5_raw)),
                                 native.Blocks(native.RawTensor("v", q8_t, [K, 37], q8_raw))])
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(12))
    paths, use = isa_paths
    out = {}
    try:
        for isa in paths:  # both instruction sets' decoders where the CPU has both
            use(isa)
            for tiles in (1, 0):
                assert lib.selfspec_qgemm_short_q8_0(tiles) == tiles
                assert lib.selfspec_qgemm_short_q8_0(-1) == tiles  # a query leaves it
                out[isa, tiles] = (alone(x.clone()), fused(x.clone()))
    finally:
        kernels.kernel_paths(lib)
    first = out["avx2", 1]
    assert all(torch.equal(first[0], o[0]) and torch.equal(first[1], o[1]) for o in out.values())
    assert torch.equal(first[1][:, 21:], first[0])  # the Q8_0 part of the fused call: the same rows
    ref = reference(q8_raw, q8_t, 37, K, x)
    assert (first[0] - ref).abs().max().item() < 1e-4


@needs_kernel
@pytest.mark.parametrize("tname", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_few_rows_paths_give_the_same_bits(tname, isa_paths):
    """Two to four activation rows on a 32-block format: decoded into registers per weight row or
    through the tile path, whichever this machine runs faster (kernels.kernel_paths), the same
    bits, and each row the 1-row call's, on both instruction sets' decoders where the CPU has
    both; on rows read in order, through a row map (a draft head's rows, llama's q and k), in a
    fused linear, with a last group of fewer than 4 rows and K not a multiple of 256."""
    paths, use = isa_paths
    lib = kernels.library()
    K, rows = 9 * 32, 23  # a full tile of 256 and one unit
    rng = np.random.default_rng(13)
    raw, t = random_blocks(tname, rows, K, rng)
    q5_raw, q5_t = random_blocks("Q5_0", 10, K, rng)
    lin = linear_of(raw, t, rows, K)
    mapped = lin.select_rows(torch.tensor([22, 0, 5, 5, 17, 3, 9]))
    fused = native.NativeLinear([native.Blocks(native.RawTensor("a", t, [K, rows], raw)),
                                 native.Blocks(native.RawTensor("b", q5_t, [K, 10], q5_raw))])
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(14))
    out = {}
    try:
        for isa in paths:
            use(isa)
            for most in (1, 4):  # 1: the tile path for every M > 1; 4: registers up to M = 4
                assert lib.selfspec_qgemm_few_rows(most) == most and lib.selfspec_qgemm_few_rows(0) == most
                got = out[isa, most] = [[f(x[:m].clone()) for m in (2, 3, 4)] for f in (lin, mapped, fused)]
                singles = [[f(x[i: i + 1].clone()) for i in range(4)] for f in (lin, mapped, fused)]
                for f_out, f_single in zip(got, singles):
                    for y in f_out:  # row i of an M-row call: the 1-row call on that row
                        for i in range(y.shape[0]):
                            assert torch.equal(y[i: i + 1], f_single[i]), f"{tname} {isa}: row {i} of {y.shape[0]}"
    finally:
        kernels.kernel_paths(lib)
    first = out["avx2", 1]
    for key, other in out.items():
        for a, b in zip(first, other):
            assert all(torch.equal(ya, yb) for ya, yb in zip(a, b)), f"{tname}: {key} differs from avx2 tiles"
    ref = reference(raw, t, rows, K, x)
    assert (first[0][2] - ref).abs().max().item() < 1e-4


@needs_kernel
def test_kernel_paths_are_measured_once_and_cached(monkeypatch, tmp_path):
    """Which of two same-bits paths runs (short Q8_0 rows, a few activation rows) is timed once
    per machine, ISA, build and thread count and cached (not while the machine is busy); the
    library runs the cached choice; a damaged entry is timed again."""
    from selfspec import hardware

    lib = kernels.library()
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    store = tmp_path / "kernel-paths.json"
    try:
        monkeypatch.setattr(hardware, "machine_busy", lambda: True)
        first = kernels.kernel_paths(lib)
        us = first["us"]
        assert first["short_q8_0"] == min(("tiles", "registers"), key=lambda p: us["short_q8_0"][p])
        assert all(us[f"M={m}"]["tiles"] > 0 and us[f"M={m}"]["registers"] > 0 for m in (2, 3, 4))
        # registers up to the first M at which they lose (1: already at M = 2)
        wins = [us[f"M={m}"]["registers"] < us[f"M={m}"]["tiles"] for m in (2, 3, 4)] + [False]
        assert first["few_rows"] == 1 + wins.index(False)
        assert not store.exists()  # busy: timed again next time
        monkeypatch.setattr(hardware, "machine_busy", lambda: False)
        kernels.kernel_paths(lib)
        (key, entry), = json.loads(store.read_text()).items()
        # the cached verdict decides, without timing again (here the opposite of what was measured)
        other = {**entry, "short_q8_0": "tiles" if entry["short_q8_0"] == "registers" else "registers",
                 "few_rows": 3 if entry["few_rows"] != 3 else 2}
        store.write_text(json.dumps({key: other}))

        def no_timing(*a, **k):
            raise AssertionError("timed again instead of reading the cache")

        with monkeypatch.context() as m:
            m.setattr(kernels, "_time_paths", no_timing)
            got = kernels.kernel_paths(lib)
            assert (got["short_q8_0"], got["few_rows"]) == (other["short_q8_0"], other["few_rows"])
            assert lib.selfspec_qgemm_short_q8_0(-1) == int(other["short_q8_0"] == "tiles")
            assert lib.selfspec_qgemm_few_rows(0) == other["few_rows"]
        store.write_text(json.dumps({key: {"short_q8_0": "sideways", "few_rows": 9}}))
        again = kernels.kernel_paths(lib)
        assert again["short_q8_0"] in ("tiles", "registers") and again["few_rows"] in (1, 2, 3, 4)
        assert json.loads(store.read_text())[key]["few_rows"] == again["few_rows"]
        # timing that fails leaves the paths of before (the same bits), and caches nothing
        store.unlink()

        def failing(*a, **k):
            raise RuntimeError("no memory for the probe")

        monkeypatch.setattr(kernels, "_time_paths", failing)
        assert kernels.kernel_paths(lib) == {"short_q8_0": "tiles", "few_rows": 1, "us": None}
        assert lib.selfspec_qgemm_short_q8_0(-1) == 1 and lib.selfspec_qgemm_few_rows(0) == 1
        assert not store.exists()
    finally:
        monkeypatch.undo()
        kernels.kernel_paths(lib)  # the real cache's choice again


@needs_kernel
@pytest.mark.parametrize("tname,q8", [("Q6_K", False), ("Q8_0", False), ("Q4_K", True)])
def test_select_rows_reads_only_those_rows(tname, q8):
    """A draft head over part of the vocabulary (drafters/vocab.py) on native blocks: the chosen
    rows' outputs, bit for bit the full linear's, through a row map over the same memory."""
    K, rows = 2 * _block(tname) * 4, 61
    raw, t = random_blocks(tname, rows, K, np.random.default_rng(7))
    full = linear_of(raw, t, rows, K, q8=q8)
    ids = torch.tensor([0, 3, 4, 17, 40, 59, 60])
    sub = full.select_rows(ids)
    assert sub.out_features == len(ids) and sub.parts[0].data.data_ptr() == full.parts[0].data.data_ptr()
    assert sub.nbytes == len(ids) * full.parts[0].row_bytes
    for M in (1, 3):
        x = torch.randn(M, K)
        assert torch.equal(sub(x), full(x)[:, ids])
    with pytest.raises(IndexError):
        full.select_rows(torch.tensor([rows]))


@needs_kernel
def test_draft_vocab_head_on_native_is_not_dequantised(smollm_native, monkeypatch):
    """--draft-vocab on native blocks selects rows of the file's head (no fp32 copy of the head,
    which cost the Qwen 1.5B seconds per sequence), and layer-skip drafting stays lossless."""
    from selfspec.drafters.layerskip import LayerSkipDrafter
    from selfspec.drafters.vocab import SubsetHead, subset_ids
    from selfspec.models import native as native_module

    def no_dense(self):
        raise AssertionError("the subset head dequantised the whole LM head")

    monkeypatch.setattr(native_module.NativeLinear, "dequantize", no_dense)
    head = SubsetHead(smollm_native.transformer, subset_ids(smollm_native, [1, 2, 3], 4096))
    assert head.linear.kernel.startswith("gguf-native") and head.linear.out_features == 4096
    from prompts import PROMPTS

    _check_drafters(smollm_native, lambda: (LayerSkipDrafter.for_model(smollm_native, draft_vocab=4096),), PROMPTS[:1])


@needs_kernel
@pytest.mark.parametrize("tname", FORMATS)
def test_embedding_rows_equal_gguf_dequantiser(tname):
    """The C dequantisers give the `gguf` package's values bit for bit (so the native embedding
    equals the fp32 path's, and the weights the kernel multiplies are the file's)."""
    K, rows = 2 * _block(tname) * (8 if _block(tname) < 32 else 1), 7
    raw, t = random_blocks(tname, rows, K, np.random.default_rng(4))
    emb = native.NativeEmbedding(native.Blocks(native.RawTensor("e", t, [K, rows], raw)))
    ids = torch.tensor([3, 0, 6, 3])
    want = torch.from_numpy(np.array(gguf.quants.dequantize(raw, t), dtype=np.float32)).reshape(rows, K)[ids]
    assert torch.equal(emb.lookup(ids), want)


def test_truncated_tensor_is_a_clear_error():
    raw, t = random_blocks("Q4_K", 4, 512, np.random.default_rng(5))
    with pytest.raises(SelfspecError, match="truncated or corrupt"):
        native.Blocks(native.RawTensor("blk.0.ffn_down.weight", t, [512, 4], raw.reshape(-1)[:-10]))


@pytest.mark.parametrize("tname", ["Q4_1", "Q6_K"])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_bad_scale_is_a_clear_error(tname, value):
    raw, t = random_blocks(tname, 3, 512, np.random.default_rng(6))
    raw = raw.copy()
    off, n = native.SCALE_FIELDS[tname]
    off += 2 * (n - 1)  # the block's last scale (Q4_1: its offset m)
    block_bytes = gguf.GGML_QUANT_SIZES[t][1]
    raw.reshape(-1, block_bytes)[5, off: off + 2] = np.array([value], dtype=np.float16).view(np.uint8)
    with pytest.raises(SelfspecError, match="non-finite scale in block 5"):
        native.Blocks(native.RawTensor("blk.1.attn_q.weight", t, [512, 3], raw))


def test_truncated_file_is_a_clear_error(tmp_path):
    from selfspec.models.loading import load_transformer
    from selfspec.models.registry import REGISTRY

    src = REGISTRY["smollm2-135m"].path()
    bad = tmp_path / "cut.gguf"
    shutil.copyfile(src, bad)
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size * 3 // 5)
    with pytest.raises(SelfspecError):
        load_transformer(bad, native=True)


# ------------------------------------------------------------------------- the real SmolLM2
@pytest.fixture(scope="module")
def smollm_native(smollm_in):
    model = smollm_in("native")
    assert model.dtype == "native" and model.kernel.startswith("gguf-native"), model.kernel
    return model


@needs_kernel
def test_smollm_native_matches_fp32(smollm, smollm_native):
    from prompts import PROMPTS

    assert_native_matches_fp32(smollm_native, smollm, PROMPTS[0], "SmolLM2")


def _check_drafters(model, drafters, prompts, n_new=24, dtype="native"):
    from lossless import assert_lossless
    from selfspec.generation import generate

    for prompt in prompts:
        plain = generate(model, prompt, max_new_tokens=n_new)
        for d in drafters():
            spec = generate(model, prompt, max_new_tokens=n_new, drafter=d)
            assert_lossless(plain.token_ids, spec.token_ids, f"native {d.name} on {prompt[:30]!r}")
            assert spec.stats.dtype == dtype


@needs_kernel
def test_smollm_native_drafters_lossless(smollm_native):
    from prompts import PROMPTS
    from selfspec.drafters.layerskip import LayerSkipDrafter
    from selfspec.drafters.ngram import NgramDrafter

    _check_drafters(smollm_native, lambda: (NgramDrafter(), LayerSkipDrafter.for_model(smollm_native)), PROMPTS[:1])


@needs_kernel
@pytest.mark.slow
def test_smollm_native_precision_draft_lossless(smollm_native):
    """A precision self-draft over native weights: Q4_0/Q4_K copies of the Q4_1 blocks on int8
    activations draft (models/native_draft.py), the file's blocks verify."""
    from prompts import PROMPTS
    from selfspec.drafters.layerskip import SkipConfig
    from selfspec.drafters.quantized import QuantizedSelfDrafter

    m = smollm_native
    n = m.config.n_layers
    _check_drafters(m, lambda: (QuantizedSelfDrafter.for_model(
        m, SkipConfig(model=m.name, n_layers=n, attention=(n // 2,)), bits=4, max_draft=6),), PROMPTS[:2])
    from selfspec.drafters.layerskip import LayerSkipDrafter
    from selfspec.drafters.ngram import NgramDrafter

    _check_drafters(m, lambda: (NgramDrafter(), LayerSkipDrafter.for_model(m)), PROMPTS[1:4])


@needs_kernel
def test_smollm_native_q8_lossless(smollm_in):
    """native-q8 is another model (int8 activations) but as row-invariant as native: a drafter's
    greedy output equals native-q8's own plain output."""
    from prompts import PROMPTS
    from selfspec.drafters.ngram import NgramDrafter

    model = smollm_in("native-q8")
    assert model.dtype == "native-q8" and model.kernel.startswith("gguf-native-q8"), model.kernel
    _check_drafters(model, lambda: (NgramDrafter(),), PROMPTS[:1], dtype="native-q8")


@needs_kernel
def test_gemma_native_q8_kquants_lossless():
    """Gemma-3's o and down projections are Q4_K/Q6_K: native-q8 runs them on the integer
    super-block path (activations per 256) inside the fused layers, and a 9-token pass's rows are
    the 1-token passes bitwise, so drafters stay lossless on it."""
    from prompts import PROMPTS
    from selfspec.drafters.layerskip import LayerSkipDrafter
    from selfspec.drafters.ngram import NgramDrafter
    from selfspec.models.loading import load_model

    model = load_model("gemma3-270m", dtype="native-q8", ctx_size=512)
    tr = model.transformer
    kq = [lin for layer in tr.layers for lin in (layer.wo, layer.w_down) if {"Q4_K", "Q6_K"} & set(lin.types)]
    assert kq and all(lin.q8 for lin in kq), [lin.types for layer in tr.layers for lin in (layer.wo, layer.w_down)]
    _assert_forward_row_invariant(model, "def fibonacci(n):\n    if n < 2:\n        return n\n    return")
    _check_drafters(model, lambda: (NgramDrafter(), LayerSkipDrafter.for_model(model)), PROMPTS[:1], dtype="native-q8")


def _assert_forward_row_invariant(m, text: str) -> None:
    """The last 9 tokens of `text` in one pass: its rows are the 1-token passes at those
    positions, bitwise."""
    tr = m.transformer
    ids = torch.tensor(m.encode(text))
    cache = m.fresh_cache()
    start = len(ids) - 9
    tr.forward(ids[:start], 0, cache)
    batch = tr.forward(ids[start:], start, cache)
    for i in range(9):
        cache.rollback(start + i)
        one = tr.forward(ids[start + i: start + i + 1], start + i, cache)
        assert torch.equal(one, batch[i: i + 1]), f"row {i}"


@needs_kernel
def test_native_forward_row_invariant(smollm_native):
    """A 9-token pass's rows are the 1-token passes at those positions, bitwise (the whole
    forward: native linears, native head, fixed-order attention)."""
    _assert_forward_row_invariant(smollm_native, "The quick brown fox jumps over the lazy dog because")


def test_without_kernel_native_falls_back_to_fp32(monkeypatch, smollm):
    """No compiled kernel: every tensor is dequantised to fp32 (the probed fp32 path), the
    formats are named in `native_fallback`, and the output is the fp32 model's."""
    from selfspec.models.loading import load_transformer
    from selfspec.models.registry import REGISTRY

    monkeypatch.setattr(native, "_lib", lambda: None)
    info: dict = {}
    tr = load_transformer(REGISTRY["smollm2-135m"].path(), native=True, info=info, ctx_size=256)
    assert info["native_fallback"] == ["Q4_1", "Q8_0"] and not info["native_types"]
    assert not any(isinstance(lin, native.NativeLinear) for lin in (tr.layers[0].wqkv, tr.lm_head))
    ids = torch.tensor(smollm.encode("Name three colours."))
    ref = smollm.transformer.forward(ids, 0, smollm.fresh_cache(), last_only=True)
    got = tr.forward(ids, 0, tr.new_cache(256), last_only=True)
    assert int(got.argmax()) == int(ref.argmax())


@needs_kernel
@pytest.mark.slow
def test_gemma_native_matches_fp32(gemma):
    """Gemma-3's Q5_0/Q8_0/Q4_K/Q6_K mix against its fp32 load (measured: max |Δlogit| 4e-5)."""
    from prompts import PROMPTS
    from selfspec.models.loading import load_model

    # (not conftest's loader: `from conftest import` finds whichever conftest.py came first on
    # the path, tests/bench/'s in a pytest-xdist worker)
    nat = load_model("gemma3-270m", dtype="native", ctx_size=1024)
    assert_native_matches_fp32(nat, gemma, PROMPTS[0], "Gemma-3")


# ---------------------------------------------------------------------- what --dtype auto loads
def test_auto_dtype_chooses_native_only_where_every_weight_has_a_kernel(monkeypatch, tmp_path):
    """`--dtype auto` on the CPU: native for a GGUF file whose weights all have block kernels;
    fp32, saying why, for an HF folder, without the compiled kernel, or for a format native
    would dequantise at every load."""
    from selfspec import kernels as kernels_module
    from selfspec.models.loading import auto_cpu_dtype
    from selfspec.models.registry import REGISTRY

    path = REGISTRY["smollm2-135m"].path()
    measured = {"dtype": "native", "native_ms": 1.0, "fp32_ms": 2.0, "tensor": "L0.w_gate"}
    monkeypatch.setattr(native, "measured_choice", lambda path, tensors: measured)
    if kernels.library() is not None:
        dtype, why = auto_cpu_dtype(path)
        assert dtype == "native" and why.startswith("native:") and "native 1.0 ms, fp32 2.0 ms" in why, why
        measured.update(dtype="fp32", native_ms=3.0)  # fp32 measured faster on this machine
        dtype, why = auto_cpu_dtype(path)
        assert dtype == "fp32" and "native 3.0 ms, fp32 2.0 ms" in why, why
        measured.update(dtype="native")
    dtype, why = auto_cpu_dtype(tmp_path)
    assert dtype == "fp32" and "HF folder" in why
    with monkeypatch.context() as m:
        m.delitem(native.KERNEL_FORMATS, "Q4_1")
        if kernels.library() is not None:
            dtype, why = auto_cpu_dtype(path)
            assert dtype == "fp32" and "Q4_1 weights have no native kernel" in why, why
    monkeypatch.setattr(kernels_module, "library", lambda: None)
    dtype, why = auto_cpu_dtype(path)
    assert dtype == "fp32" and "native kernels are not built" in why, why


@needs_kernel
def test_measured_choice_streams_both_and_is_cached(monkeypatch, tmp_path):
    """The dtype measurement times the file's blocks against fp32 weights (both streamed, a step
    plus a verify pass), once: a later load reads the cached verdict without measuring; a
    measurement beside other programs is not cached."""
    from selfspec import hardware
    from selfspec.models.registry import REGISTRY

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    path = REGISTRY["smollm2-135m"].path()
    tensors = native.read_index(path)[2]
    monkeypatch.setattr(hardware, "machine_busy", lambda: True)
    first = native.measured_choice(path, tensors)
    assert first["dtype"] in ("native", "fp32") and first["native_ms"] > 0 and first["fp32_ms"] > 0
    assert first["dtype"] == ("native" if first["native_ms"] <= first["fp32_ms"] else "fp32")
    assert not (tmp_path / "dtype-choice.json").exists()  # busy: measured again next time
    monkeypatch.setattr(hardware, "machine_busy", lambda: False)
    again = native.measured_choice(path, tensors)
    assert (tmp_path / "dtype-choice.json").exists()

    def no_timing(*a, **k):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(native, "NativeLinear", no_timing)
    assert native.measured_choice(path, tensors) == again


@needs_kernel
def test_default_load_is_native_and_says_why(monkeypatch):
    from selfspec.models.loading import load_model

    monkeypatch.setattr(native, "measured_choice", lambda path, tensors: {
        "dtype": "native", "native_ms": 1.0, "fp32_ms": 2.0, "tensor": "L0.w_gate"})
    model = load_model("smollm2-135m", ctx_size=256)  # dtype auto
    assert model.dtype == "native" and model.kernel.startswith("gguf-native"), model.kernel
    assert model.dtype_reason.startswith("native: the GGUF file's own blocks"), model.dtype_reason
