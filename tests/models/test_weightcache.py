"""The weight cache (selfspec/models/weightcache.py) on tiny random models in a private cache
folder: cached weights give the logits of freshly built ones for every dtype; a corrupt, truncated
or foreign entry is detected and rebuilt, never used; stale entries are replaced; off switch."""
from __future__ import annotations

import json
import logging
import os
import time

import pytest
import torch

from selfspec.models import registry, weightcache
from selfspec.models.loading import load_transformer
from tiny import build_tiny, one_thread

DTYPES = [(torch.float32, None, "fp32"), (torch.bfloat16, None, "bf16"), (torch.float32, 8, "int8"),
          (torch.float32, 4, "int4")]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(weightcache.ENV, raising=False)
    return tmp_path / "cache" / weightcache.FOLDER


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny Llama (untied head, 2 global layers) and Gemma-3 (tied, sliding + global, qk-norm)."""
    return {arch: build_tiny(arch, tmp_path_factory.mktemp(arch))[1] for arch in ("llama", "gemma3")}


def _load(folder, dtype, bits, **kw):
    info = {}
    tr = load_transformer(folder, dtype, 64, bits, info=info, **kw)
    return tr, info


def _logits(tr) -> torch.Tensor:
    ids = torch.randint(0, 160, (20,), generator=torch.Generator().manual_seed(0))
    return tr.forward(ids, 0, tr.new_cache(64))


def _entry(cache, dtype_name: str):
    (entry,) = [p for p in cache.iterdir() if f"-{dtype_name}-" in p.name]
    return entry


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype, bits, name", DTYPES, ids=[d[2] for d in DTYPES])
def test_cached_weights_give_the_logits_of_fresh_ones(cache, folders, arch, dtype, bits, name):
    fresh, info = _load(folders[arch], dtype, bits, weight_cache=False)
    assert info["weight_cache"] == "off" and not cache.exists()
    written, info = _load(folders[arch], dtype, bits)
    assert info["weight_cache"] == "written"
    read, info = _load(folders[arch], dtype, bits)
    assert info["weight_cache"] == "hit"
    assert read.kernel == fresh.kernel and read.config == fresh.config and read.nbytes == fresh.nbytes
    ref = _logits(fresh)
    assert torch.equal(_logits(written), ref) and torch.equal(_logits(read), ref)
    manifest = json.loads((_entry(cache, name) / weightcache.MANIFEST).read_text())
    assert manifest["key"]["dtype"] == name
    assert manifest["key"]["model_sha256"] == registry.model_identity(folders[arch])


def _corrupt_data(path):
    time.sleep(0.05)  # a later mtime than the one recorded, whatever the file system's clock granularity
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-64])


def _rewrite_header_keeping_mtime(path):
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = data.index(b'"dtype"')
    data[i + 1] = ord("D")  # same size, other header
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _delete_weights(path):
    path.unlink()


@pytest.mark.parametrize("damage", [_corrupt_data, _truncate, _rewrite_header_keeping_mtime, _delete_weights])
def test_damaged_entry_is_detected_and_rebuilt(cache, folders, damage, caplog):
    fresh, _ = _load(folders["llama"], torch.float32, None, weight_cache=False)
    _load(folders["llama"], torch.float32, None)
    weights = _entry(cache, "fp32") / weightcache.WEIGHTS
    damage(weights)
    with caplog.at_level(logging.WARNING, logger="selfspec.weightcache"):
        rebuilt, info = _load(folders["llama"], torch.float32, None)
    assert info["weight_cache"] == "written"  # not used: built again from the model and written anew
    assert "unusable" in caplog.text
    assert torch.equal(_logits(rebuilt), _logits(fresh))
    again, info = _load(folders["llama"], torch.float32, None)
    assert info["weight_cache"] == "hit" and torch.equal(_logits(again), _logits(fresh))


def test_modified_then_restored_file_is_rehashed_once(cache, folders, monkeypatch):
    """A write that leaves the bytes as they were (same content, new mtime) costs one full hash."""
    _load(folders["llama"], torch.float32, None)
    weights = _entry(cache, "fp32") / weightcache.WEIGHTS
    time.sleep(0.05)
    weights.write_bytes(weights.read_bytes())
    hashed = []
    real = weightcache.sha256_file
    monkeypatch.setattr(weightcache, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert _load(folders["llama"], torch.float32, None)[1]["weight_cache"] == "hit"
    assert _load(folders["llama"], torch.float32, None)[1]["weight_cache"] == "hit"
    assert hashed == [weights]


def test_entry_of_another_version_is_replaced(cache, folders, monkeypatch):
    _load(folders["llama"], torch.float32, None)
    _load(folders["llama"], torch.bfloat16, None)
    old = _entry(cache, "fp32")
    monkeypatch.setattr(weightcache, "FORMAT", weightcache.FORMAT + 1)
    assert _load(folders["llama"], torch.float32, None)[1]["weight_cache"] == "written"
    assert not old.exists() and _entry(cache, "fp32") != old  # the stale fp32 entry is gone
    assert _entry(cache, "bf16").exists()  # another dtype's entry is not stale


def test_off_switch_and_cache_listing(cache, folders, monkeypatch):
    monkeypatch.setenv(weightcache.ENV, "0")
    assert _load(folders["llama"], torch.float32, None)[1]["weight_cache"] == "off"
    assert not cache.exists()
    monkeypatch.delenv(weightcache.ENV)
    _load(folders["llama"], torch.float32, None)
    from selfspec.paths import clear, entries

    row = next(r for r in entries() if r["kind"] == "weights")
    assert row["entries"] == 1 and row["bytes"] > 0
    assert clear(["weights"]) == row["bytes"] and not cache.exists()



# ------------------------------------------------------------------------------------- alignment
# PyTorch's int8 weight-only kernel segfaults on AVX-512 when its weight is not 64-byte aligned
# and M >= 4 (selfspec/models/quant.py, ALIGN): on such a machine these tests crash, not fail,
# when an alignment is lost.
_KERNEL_PARTS = ("weight", "q", "scale", "packed", "scales_zeros", "bias")


def _kernel_tensors(tr):
    """(name, tensor) of every tensor the forward pass reads from the weights: the embedding,
    norms and each linear's parts (plain, strided ones: oneDNN's prepacked weights are opaque)."""
    yield "embed", tr.embed
    yield "final_norm", tr.final_norm
    linears = {f"L{i}.{n}": getattr(layer, n) for i, layer in enumerate(tr.layers)
               for n in ("wqkv", "wo", "w_gate_up", "w_down")} | {"lm_head": tr.lm_head}
    for name, lin in linears.items():
        for part in _KERNEL_PARTS:
            t = getattr(lin, part, None)
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                yield f"{name}.{part}", t
    for i, layer in enumerate(tr.layers):
        for n in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"):
            if getattr(layer, n) is not None:
                yield f"L{i}.{n}", getattr(layer, n)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype, bits, name", DTYPES, ids=[d[2] for d in DTYPES])
def test_cached_weights_are_aligned_and_run_every_row_count(cache, folders, arch, dtype, bits, name):
    fresh, _ = _load(folders[arch], dtype, bits, weight_cache=False)
    assert _load(folders[arch], dtype, bits)[1]["weight_cache"] == "written"
    assert weightcache.misaligned(_entry(cache, name) / weightcache.WEIGHTS) == []
    read, info = _load(folders[arch], dtype, bits)
    assert info["weight_cache"] == "hit"
    assert info["weight_cache_copies"] == 0  # aligned in the file: nothing had to be copied
    tensors = dict(_kernel_tensors(read))
    assert bits is None or {"lm_head.q", "L0.wqkv.q" if bits == 8 else "L0.wqkv.packed"} <= set(tensors)
    assert [n for n, t in tensors.items() if t.data_ptr() % 64] == []
    ids = torch.randint(0, 160, (9,), generator=torch.Generator().manual_seed(1))
    for m in range(1, 10):  # the int8 kernel crashed on misaligned weights from M = 4 on
        got = read.forward(ids[:m], 0, read.new_cache(64))
        assert torch.equal(got, fresh.forward(ids[:m], 0, fresh.new_cache(64))), m


def _offsets(path):
    """{name: offset of its data from the file start} of a safetensors file, read independently
    of the code under test."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    return {k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_align_data_pads_the_header_so_tensors_start_at_multiples_of_64(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(16.0), "bb": torch.ones(32, dtype=torch.bfloat16),
               "c": torch.arange(64, dtype=torch.int8), "d": torch.randn(4, 8)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    assert any(o % 64 for o in _offsets(path).values())  # as safetensors writes it: misaligned
    weightcache.align_data(path)
    assert all(o % 64 == 0 for o in _offsets(path).values())
    assert weightcache.misaligned(path) == []
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert raw[8 + n - 1:8 + n] == b" " and (8 + n) % 64 == 0
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t)
    before = raw
    weightcache.align_data(path)  # already aligned: left as it is
    assert path.read_bytes() == before


def test_odd_sized_tensors_get_padding_that_loads_never_see(cache, folders):
    config = _load(folders["llama"], torch.float32, None, weight_cache=False)[0].config
    tensors = {"a": torch.arange(3.0), "b": torch.arange(16.0), "c": torch.arange(5, dtype=torch.bfloat16),
               "c2": torch.arange(32, dtype=torch.bfloat16), "d": torch.arange(7, dtype=torch.int8),
               "e": torch.arange(64, dtype=torch.int8)}
    key = weightcache.CacheKey("0" * 64, "fp32", "test")
    assert weightcache.store(key, config, tensors, folders["llama"])
    weights = key.folder / weightcache.WEIGHTS
    assert weightcache.misaligned(weights) == []
    assert sum(n.endswith(weightcache.PAD) for n in _offsets(weights)) == 3  # after a, c and d
    _, state = weightcache.load(key)
    assert sorted(state) == sorted(tensors)
    for name, t in tensors.items():
        got = state.pop(name)
        assert got.data_ptr() % 64 == 0 and torch.equal(got, t)
    assert state.copies == 0


def test_misaligned_entry_is_copied_on_load(cache, folders, monkeypatch, caplog):
    """An entry whose tensors are not aligned (written by another writer) still gives aligned
    tensors: the load copies them."""
    config = _load(folders["llama"], torch.float32, None, weight_cache=False)[0].config
    monkeypatch.setattr(weightcache, "with_padding", lambda t: t)
    key = weightcache.CacheKey("0" * 64, "fp32", "test")
    with caplog.at_level(logging.WARNING, logger="selfspec.weightcache"):
        assert weightcache.store(key, config, {"a": torch.arange(3.0), "b": torch.arange(16.0)}, folders["llama"])
    assert "not 64-byte aligned" in caplog.text
    _, state = weightcache.load(key)
    b = state.pop("b")  # 12 bytes after a multiple of 8: never aligned in the file
    assert b.data_ptr() % 64 == 0 and torch.equal(b, torch.arange(16.0)) and state.copies == 1


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_linear_from_misaligned_state_is_aligned(bits):
    from selfspec.models.quant import Int4Linear, Int8Linear

    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(2))
    fresh = Int8Linear(w) if bits == 8 else Int4Linear(w)

    def misaligned(t):
        raw = torch.empty(t.nbytes + 64, dtype=torch.uint8)
        start = 24 if raw.data_ptr() % 64 == 0 else 64 - raw.data_ptr() % 64 + 24
        out = raw[start: start + t.nbytes].view(t.dtype).view(t.shape)
        out.copy_(t)
        assert out.data_ptr() % 64 == 24
        return out

    state = {k: misaligned(v) for k, v in fresh.state().items()}
    lin = (Int8Linear if bits == 8 else Int4Linear).from_state(state)
    assert all(t.data_ptr() % 64 == 0 for t in lin.state().values())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(lin(x), fresh(x))


def test_every_record_names_an_hf_folder_by_one_hash_and_old_hashes_still_load(cache, folders, caplog):
    """Skip configs, studies, trained drafters and the weight cache record the same model hash;
    a skip config, study or drafter written with an older selfspec's hash of the folder loads."""
    import hashlib
    from types import SimpleNamespace

    from selfspec.drafters.layerskip import SkipConfig
    from selfspec.errors import SkipConfigError
    from selfspec.search.study import model_identity
    from selfspec.drafters.trained.store import model_sha256

    folder = folders["llama"]
    model = SimpleNamespace(name=folder.name, path=folder, config=SimpleNamespace(n_layers=2))
    sha = registry.model_identity(folder)
    assert model_identity(model) == (folder.name, sha)
    assert model_sha256(model) == sha
    assert weightcache.key_for(folder, "fp32", "dense").model_sha256 == sha
    SkipConfig(model="renamed", n_layers=2, model_sha256=sha).check_model(model)

    legacy = hashlib.sha256()  # what `selfspec search` recorded before: name NUL hash, weights first
    for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        legacy.update(f.name.encode() + b"\0" + registry.sha256_file(f).encode())
    assert legacy.hexdigest() != sha
    with caplog.at_level(logging.WARNING, logger="selfspec.models.registry"):
        SkipConfig(model="renamed", n_layers=2, model_sha256=legacy.hexdigest()).check_model(model)
    assert "older hash" in caplog.text
    with pytest.raises(SkipConfigError):
        SkipConfig(model="renamed", n_layers=2, model_sha256="ab" * 32).check_model(model)
    gguf = cache.parent / "m.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_bytes(b"GGUF" + bytes(100))
    assert registry.model_identity(gguf) == hashlib.sha256(gguf.read_bytes()).hexdigest()


def test_int4_entry_packed_under_another_isa_is_never_read(cache, folders):
    """PyTorch packs int4 weights in a layout of ATen's CPU capability: an entry written by a
    forced-AVX2 process (or another machine sharing the cache folder) must not be read by an
    AVX-512 one. It was: the model then gave garbage, identically with and without a drafter."""
    import subprocess
    import sys
    from pathlib import Path

    if torch.backends.cpu.get_cpu_capability().lower() != "avx512":
        pytest.skip("needs an AVX-512 machine to write an entry under the other capability")
    folder = folders["llama"]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "SELFSPEC_ISA": "avx2",
           "PYTHONPATH": str(root)}
    code = ("import sys, torch; from selfspec.models.loading import load_transformer; "
            "assert torch.backends.cpu.get_cpu_capability().lower() == 'avx2'; "
            "from pathlib import Path; load_transformer(Path(sys.argv[1]), torch.float32, 64, 4)")
    subprocess.run([sys.executable, "-c", code, str(folder)], env=env, check=True, timeout=300)
    (avx2_entry,) = cache.iterdir()
    fresh, _ = _load(folder, torch.float32, 4, weight_cache=False)
    here, info = _load(folder, torch.float32, 4)
    assert info["weight_cache"] != "hit", "an int4 entry packed under AVX2 was read under AVX-512"
    assert torch.equal(_logits(here), _logits(fresh))
    assert [p.name for p in cache.iterdir()] != [avx2_entry.name]  # its own entry (replacing the other's)
