"""The weight cache: what loading a model computes once (GGUF dequantisation, fused and cast
tensors, int8/int4 quantisation) kept as safetensors under `cache_dir()/weights`, so a later
load reads (or memory-maps) it instead of computing it again.

One entry per model SHA-256 + dtype + layout + selfspec version + `FORMAT` + torch version + a
fingerprint of the code that produces the tensors (any edit of it is a new key, so a developer
never loads tensors that older code made). An entry is a folder with `weights.safetensors` and
`manifest.json`; entries of the same model and dtype under another key are stale and are deleted
when a new one is written. `SELFSPEC_WEIGHT_CACHE=0` turns the cache off.

What the cache stores is the dense form the kernels start from: fp32/bf16 tensors (oneDNN's
prepacked fp32 weights are opaque, so prepacking runs at every load), int8 weights with their
scales, int4 weights already packed for PyTorch's CPU kernel (a plain uint8 tensor).

Alignment: every stored tensor starts at a multiple of 64 bytes from the file start, so a mapped
tensor is as aligned as one PyTorch allocates (the int8 kernel segfaults on AVX-512 otherwise,
quant.ALIGN). safetensors pads its header only to 8 bytes and lays tensors out back to back, so
the writer pads the header with spaces (`align_data`) and rounds each tensor up with a padding
tensor (`with_padding`); a load still copies any tensor that is not aligned (`Tensors.pop`).

Integrity ("detected and rebuilt, never used"): written to a temporary name and renamed, so a
crash never leaves a half-written entry. A load checks the manifest's key, the file's size and a
SHA-256 of the safetensors header (the tensor names, shapes and offsets) every time: a truncated
or foreign file fails there. The SHA-256 of the whole file is taken when it is written and checked
again whenever the file's mtime differs from the one recorded then (the file was written to since;
~1 s for 540 MB, once: the manifest then records the new mtime). Bits that flip without any write
(bad disk, RAM) are not checked on every load, the policy `verify_sha256` has for the GGUF files
too: hashing SmolLM2's 540 MB on every load would cost about what reading the weights costs. An
entry failing a check is deleted and rebuilt from the model file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from selfspec.models.config import ModelConfig
from selfspec.models.quant import ALIGN, aligned
from selfspec.paths import atomic_output, atomic_write_json, cache_dir
from selfspec.models.registry import model_identity, sha256_file

log = logging.getLogger("selfspec.weightcache")

# Bump when the meaning of stored tensors changes in a way the code fingerprint misses. 2: every
# tensor 64-byte aligned in the file (entries of 1 were not: the int8 kernel crashed on them).
FORMAT = 2
ENV = "SELFSPEC_WEIGHT_CACHE"
FOLDER = "weights"
WEIGHTS, MANIFEST = "weights.safetensors", "manifest.json"
# Modules whose code decides which tensors are stored and what they hold: a loaded model's
# entries, and a native precision draft's copies (dtype "native-draft<bits>"), each its own set
# so an edit of one never invalidates the other's entries.
_PRODUCERS = ("loading.py", "quant.py", "config.py", "weightcache.py")
_DRAFT_PRODUCERS = ("native_draft.py", "weightcache.py")
DRAFT_DTYPE = "native-draft"
MIN_FREE_BYTES = 2 << 30  # never fill the disk: skip writing when less would be left
# Suffix of the padding tensors `with_padding` adds. safetensors orders tensors by dtype, then by
# name, and no real name continues with a space, so "NAME pad" comes right after NAME.
PAD = " pad"


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@lru_cache(maxsize=2)
def _fingerprint(producers: tuple[str, ...]) -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in producers:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def code_fingerprint(dtype: str | None = None) -> str:
    """A hash of the code that makes the entries of `dtype` (a loaded model's by default)."""
    return _fingerprint(_DRAFT_PRODUCERS if (dtype or "").startswith(DRAFT_DTYPE) else _PRODUCERS)




@dataclass(frozen=True)
class CacheKey:
    model_sha256: str
    dtype: str  # "fp32" | "bf16" | "int8" | "int4"
    layout: str  # how the tensors are laid out, e.g. "dense" or "int4-g32-head8"

    def fields(self) -> dict:
        from selfspec import __version__

        return {"model_sha256": self.model_sha256, "dtype": self.dtype, "layout": self.layout,
                "selfspec": __version__, "format": FORMAT, "torch": torch.__version__,
                "code": code_fingerprint(self.dtype)}

    @property
    def prefix(self) -> str:
        """Shared by every entry of this model and dtype, whatever the version."""
        return f"{self.model_sha256[:16]}-{self.dtype}-"

    @property
    def folder(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:16]
        return cache_dir() / FOLDER / f"{self.prefix}{digest}"


def key_for(path: Path, dtype: str, layout: str) -> CacheKey:
    return CacheKey(model_identity(path), dtype, layout)


# ------------------------------------------------------------------------------------- reading
class CorruptEntry(Exception):
    """An entry failed a check; it is deleted and rebuilt."""


class Tensors:
    """The tensors of an entry, each read when it is taken (`pop`): one that the caller copies
    anyway (an fp32 weight about to be prepacked) is in memory only until then, so a load never
    holds two copies of the weights. Every tensor `pop` returns is 64-byte aligned: one that is
    not in the file is copied (`copies` counts them; 0 for entries this version wrote)."""

    def __init__(self, handle, names: list[str], where: str) -> None:
        self._handle, self._names, self._where = handle, dict.fromkeys(names), where
        self.copies = 0

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(list(self._names))

    def pop(self, name: str, *default):
        if name not in self._names:
            if default:
                return default[0]
            raise KeyError(name)
        del self._names[name]
        try:
            t = self._handle.get_tensor(name)
        except Exception as e:
            from selfspec.errors import ModelLoadError

            raise ModelLoadError(f"cannot read tensor {name!r} of the weight cache entry {self._where} ({e}); "
                                 f"delete it with `selfspec cache clear weights`") from None
        out = aligned(t)
        self.copies += out is not t
        return out


def load(key: CacheKey, mmap: bool = True) -> tuple[ModelConfig, Tensors] | None:
    """The config and tensors of the entry for `key`, or None when there is none or it failed a
    check (then it is deleted: the caller rebuilds it). `mmap=False` reads each tensor into
    private memory when it is taken, for tensors that are copied anyway (fp32 weights about to be
    prepacked): mapped, their file pages would stay in the resident set as long as the mapping.
    Either way the tensors come 64-byte aligned (`Tensors`)."""
    folder = key.folder
    if not (folder / MANIFEST).is_file():
        return None
    try:
        manifest = _verified_manifest(key, folder)
        from safetensors import safe_open

        handle = safe_open(str(folder / WEIGHTS), framework="pt", backend="mmap" if mmap else "pread")
        names = set(handle.keys())
        if names != set(manifest["tensors"]):
            raise CorruptEntry(f"its tensors {sorted(names ^ set(manifest['tensors']))[:3]} differ from the manifest's")
        weights = [n for n in manifest["tensors"] if not n.endswith(PAD)]
        reader = handle if mmap else _AlignedReader(folder / WEIGHTS)
        return ModelConfig.from_dict(manifest["config"]), Tensors(reader, weights, folder.name)
    except Exception as e:  # anything wrong with an entry means: rebuild it, never use it
        log.warning("weight cache entry %s is unusable (%s); rebuilding it from the model file", folder.name, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _AlignedReader:
    """`get_tensor` of a safetensors file (already validated by `safe_open`) that preads each
    tensor into a fresh PyTorch tensor, so the private copy is 64-byte aligned: safetensors' own
    pread backend returns buffers 16 bytes past a 64-byte boundary, which `Tensors.pop` would
    have to copy once more (reading SmolLM2's fp32 weights took 0.1 s this way, 0.2 s with
    safetensors' pread and 1.6 s with pread and a copy)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        header = _read_header(self._file, path.name)
        self._start, self._meta = 8 + len(header), json.loads(header)

    def get_tensor(self, name: str) -> torch.Tensor:
        meta = self._meta[name]
        begin, end = meta["data_offsets"]
        t = torch.empty(meta["shape"], dtype=_DTYPES[meta["dtype"]])
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        if len(buf) != end - begin:
            raise CorruptEntry(f"{name} has {end - begin} bytes for {len(buf)} of its shape")
        done = 0
        while done < len(buf):  # one read returns at most ~2 GiB on Linux
            n = os.preadv(self._file.fileno(), [buf[done:]], self._start + begin + done)
            if n <= 0:
                raise CorruptEntry(f"the file ends inside tensor {name}")
            done += n
        return t


def _verified_manifest(key: CacheKey, folder: Path) -> dict:
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("key") != key.fields():
        raise CorruptEntry("its manifest is for another key")
    path = folder / WEIGHTS
    st = path.stat()
    if st.st_size != manifest["size"]:
        raise CorruptEntry(f"{WEIGHTS} has {st.st_size} bytes, the manifest says {manifest['size']}")
    if _header_sha256(path) != manifest["header_sha256"]:
        raise CorruptEntry(f"the header of {WEIGHTS} differs from the one written")
    if st.st_mtime_ns != manifest["mtime_ns"]:  # written to since: the whole file must still be what we wrote
        if sha256_file(path) != manifest["sha256"]:
            raise CorruptEntry(f"{WEIGHTS} was modified after it was written (SHA-256 differs)")
        manifest["mtime_ns"] = st.st_mtime_ns
        atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def _header_sha256(path: Path) -> str:
    """SHA-256 of the safetensors header: its 8-byte length and the JSON of names, dtypes,
    shapes and offsets. A truncated, foreign or rewritten-with-other-tensors file differs here."""
    with path.open("rb") as f:
        body = _read_header(f, path.name)
    return hashlib.sha256(struct.pack("<Q", len(body)) + body).hexdigest()


def _read_header(f, name: str) -> bytes:
    """The header JSON (with its padding) of the safetensors file open as `f`, which is left at
    the start of the data section."""
    head = f.read(8)
    if len(head) != 8:
        raise CorruptEntry(f"{name} is shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > 100 << 20:
        raise CorruptEntry(f"{name} claims a header of {n} bytes")
    body = f.read(n)
    if len(body) != n:
        raise CorruptEntry(f"{name} ends inside its header")
    return body


# ------------------------------------------------------------------------------------- writing
def store(key: CacheKey, config: ModelConfig, tensors: dict[str, torch.Tensor], source: Path) -> bool:
    """Write the entry for `key` (atomically) and delete stale entries of the same model and
    dtype. Never fails a load: a full disk or an unwritable folder is a warning. Returns whether
    the entry was written."""
    folder = key.folder
    tensors = with_padding({n: t.contiguous() for n, t in tensors.items()})
    size = sum(t.nbytes for t in tensors.values())
    root = folder.parent
    tmp = root / f".{folder.name}.{os.getpid()}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free - 2 * size < MIN_FREE_BYTES:  # 2x: `align_data` writes an aligned copy, then deletes the first
            log.warning("not caching the weights of %s: %.1f GB would leave less than %.0f GB free",
                        source.name, size / 1e9, MIN_FREE_BYTES / 2**30)
            return False
        from safetensors.torch import save_file

        from selfspec.progress import Bar

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = tmp / WEIGHTS
        with Bar(f"writing the weight cache ({size / 2**20:.0f} MiB; later loads read it)", 3, delay=1.0) as bar:
            save_file(tensors, str(weights))
            bar.advance(label="weight cache: aligning")
            align_data(weights)
            bar.advance(label="weight cache: hashing")
            if bad := misaligned(weights):  # a safetensors whose layout differs: loads copy these
                log.warning("weight cache: %d tensors of %s are not %d-byte aligned in the file (e.g. %s); "
                            "each load copies them", len(bad), source.name, ALIGN, bad[0])
            manifest = {"key": key.fields(), "config": config.to_dict(), "source": str(source),
                        "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "size": weights.stat().st_size,
                        "header_sha256": _header_sha256(weights), "sha256": sha256_file(weights),
                        "mtime_ns": weights.stat().st_mtime_ns, "tensors": sorted(tensors)}
            bar.advance(label="weight cache")
        atomic_write_json(tmp / MANIFEST, manifest)
        _remove_stale(key)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)  # atomic: readers see no entry or a whole one
        except OSError:
            if (folder / MANIFEST).is_file():  # another process wrote the same entry meanwhile
                return True
            raise
        return True
    except OSError as e:
        log.warning("could not write the weight cache entry %s: %s", folder, e)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def with_padding(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` plus, after each whose byte size is not a multiple of ALIGN, a zero tensor of its
    dtype named NAME + PAD that rounds it up. safetensors stores tensors back to back, sorted by
    dtype then name, so NAME + PAD lies right after NAME and every tensor then starts at a
    multiple of ALIGN from the data section. (None of SmolLM2's tensors needs one, nor by their
    shapes Gemma-3-270m's: this is for other models.)"""
    pads = {}
    for name, t in tensors.items():
        if rest := -t.nbytes % ALIGN:
            pads[name + PAD] = torch.zeros(rest // t.element_size(), dtype=t.dtype)
    return tensors | pads if pads else tensors


def align_data(path: Path) -> None:
    """Rewrite the safetensors file `path` so that its data section starts at a multiple of ALIGN
    from the file start: the header JSON gets trailing spaces (padding the format allows) and a
    new length. Tensor offsets count from the data section, so the header says the same. The
    data is streamed into the new file: never a second copy of the weights in memory."""
    with path.open("rb") as src:
        body = _read_header(src, path.name)
    pad = -(8 + len(body)) % ALIGN
    if not pad:
        return
    with atomic_output(path) as tmp, path.open("rb") as src, tmp.open("wb") as dst:
        src.seek(8 + len(body))
        dst.write(struct.pack("<Q", len(body) + pad) + body + b" " * pad)
        shutil.copyfileobj(src, dst, 1 << 20)


def misaligned(path: Path) -> list[str]:
    """Names of the tensors of the safetensors file `path` (padding aside) that do not start at a
    multiple of ALIGN bytes from the file start (none in files `store` writes)."""
    with path.open("rb") as f:
        body = _read_header(f, path.name)
    start = 8 + len(body)
    header = json.loads(body)
    return sorted(n for n, v in header.items()
                  if n != "__metadata__" and not n.endswith(PAD) and (start + v["data_offsets"][0]) % ALIGN)


def _remove_stale(key: CacheKey) -> None:
    for other in key.folder.parent.glob(key.prefix + "*"):
        if other.is_dir() and other.name != key.folder.name:
            shutil.rmtree(other, ignore_errors=True)


