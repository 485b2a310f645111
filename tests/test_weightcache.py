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

from selfspec.models import weightcache
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
    assert manifest["key"]["model_sha256"] == weightcache.model_sha256(folders[arch])


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
    from selfspec.cachedir import clear, entries

    row = next(r for r in entries() if r["kind"] == "weights")
    assert row["entries"] == 1 and row["bytes"] > 0
    assert clear(["weights"]) == row["bytes"] and not cache.exists()

