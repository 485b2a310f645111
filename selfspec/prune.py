"""`selfspec cache prune`: find (and delete) cache entries this version of selfspec can never use.

Unlike `cache clear`, nothing usable goes. An entry is unusable when its own record says it was
made for something that no longer exists here:
- weights: the manifest's key (selfspec version, FORMAT, torch version, loader code fingerprint)
  differs from what this installation computes, or the manifest is unreadable;
- costs: the entry does not record this selfspec version and costs key format (entries of older
  versions record neither: their key had no ISA or version, so no lookup finds them);
- rows: rows.json entries of another PROBE_VERSION, selfspec or torch version (the file is rewritten
  with the rest);
- kernels: libraries built from other kernel sources, flags or compiler than today's (kept when no
  compiler is found: then nothing says which one is current), and kernel-paths.json entries timed
  on such a library (the file is rewritten with the rest);
- temporary files and folders of interrupted atomic writes (`paths.atomic_output`, the weight
  cache's staging folder, older versions' `NAME.PID.tmp`), whose writing process is gone; a `.tmp`
  without a process id once it is an hour old.
Online-skip entries and studies are kept: they name a model by hash, and only the model knows it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from selfspec.paths import atomic_write_json, cache_dir, disk_size, pid_alive

# `.{stem}.{pid}.{thread}.tmp{suffix}` (atomic_output), `.{name}.{pid}.tmp` (weight-cache staging),
# `{key}.{pid}.{random}.tmp` (a tokenizer's conversion folder), `{name}.{pid}.tmp` (older
# versions): the process id is the first number before `.tmp`.
TMP = re.compile(r"\.(\d+)(?:\.\w+)?\.tmp(?:\.[^.]+)?$")
TMP_NO_PID_AGE = 3600.0  # seconds before a `.tmp` without a process id counts as abandoned


@dataclass
class Stale:
    kind: str
    path: str
    bytes: int
    reason: str
    rows: tuple[str, ...] = ()  # for rows.json and kernel-paths.json: the entries that go (the file stays)


def _temporaries(root: Path) -> list[Stale]:
    out = []
    for p in root.rglob("*"):
        if ".tmp" not in p.name:
            continue
        if (m := TMP.search(p.name)) is not None:
            if pid_alive(int(m.group(1))) and int(m.group(1)) != os.getpid():
                continue
            reason = f"left by an interrupted write (process {m.group(1)} is gone)"
        elif p.name.endswith(".tmp") and time.time() - p.stat().st_mtime > TMP_NO_PID_AGE:
            reason = "left by an interrupted write (over an hour old)"
        else:
            continue
        out.append(Stale("tmp", str(p), disk_size(p), reason))
    # A temporary folder's contents go with it: drop what lies inside another candidate.
    dirs = [s.path + os.sep for s in out if Path(s.path).is_dir()]
    return [s for s in out if not any(s.path.startswith(d) for d in dirs)]


def _temporary(p: Path) -> bool:
    """A temporary of a write (handled by `_temporaries` alone, whether its writer lives or not)."""
    return TMP.search(p.name) is not None or p.name.endswith(".tmp")


def _weights(root: Path) -> list[Stale]:
    import torch

    from selfspec import __version__
    from selfspec.models.weightcache import FOLDER, FORMAT, MANIFEST, code_fingerprint

    want = {"selfspec": __version__, "format": FORMAT, "torch": torch.__version__}
    out = []
    for entry in sorted((root / FOLDER).glob("*")):
        if not entry.is_dir() or _temporary(entry):
            continue
        try:
            key = json.loads((entry / MANIFEST).read_text())["key"]
            now = {**want, "code": code_fingerprint(key.get("dtype"))}
            wrong = [f"{k} {key.get(k)!r} (now {v!r})" for k, v in now.items() if key.get(k) != v]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            wrong = ["no readable manifest"]
        if wrong:
            out.append(Stale("weights", str(entry), disk_size(entry), "made for " + ", ".join(wrong)))
    return out


def _costs(root: Path) -> list[Stale]:
    from selfspec import __version__
    from selfspec.drafters.costs import KEY_FORMAT

    out = []
    for entry in sorted((root / "costs").glob("*.json")):
        if _temporary(entry):
            continue
        try:
            d = json.loads(entry.read_text())
            ok = d.get("selfspec") == __version__ and d.get("format") == KEY_FORMAT
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            out.append(Stale("costs", str(entry), disk_size(entry), "keyed for another selfspec version"))
    return out


def _rows(root: Path) -> list[Stale]:
    import torch

    from selfspec import __version__
    from selfspec.models.rows import PROBE_VERSION

    path = root / "rows.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        return [Stale("rows", str(path), disk_size(path), "unreadable")]
    if not isinstance(data, dict):
        return [Stale("rows", str(path), disk_size(path), "unreadable")]
    want = (f"probe={PROBE_VERSION}|", f"selfspec={__version__}|", f"torch={torch.__version__}|")
    gone = tuple(sorted(k for k in data if not all(w in k + "|" for w in want)))
    return _entries("rows", path, data, gone, "of another probe, selfspec or torch version")


def _entries(kind: str, path: Path, data: dict, gone: tuple[str, ...], why: str) -> list[Stale]:
    """The entries `gone` of a JSON file of keyed entries (`data`): the whole file when every
    entry goes, else those entries (prune rewrites the file with the rest)."""
    if not gone:
        return []
    if len(gone) == len(data):
        return [Stale(kind, str(path), disk_size(path), f"every entry is {why}", gone)]
    kept = {k: v for k, v in data.items() if k not in gone}
    freed = disk_size(path) - len(json.dumps(kept, indent=1, sort_keys=True)) - 1
    return [Stale(kind, str(path), max(freed, 0), f"{len(gone)} of {len(data)} entries {why}", gone)]


def _kernels(root: Path) -> list[Stale]:
    from selfspec.kernels import compiler, library_path

    cc = compiler()
    if cc is None:
        return []
    current = library_path(cc).name
    return [Stale("kernels", str(p), disk_size(p), "built from other kernel sources, flags or compiler")
            for p in sorted((root / "kernels").glob("*")) if p.name != current and not _temporary(p)]


def _kernel_paths(root: Path) -> list[Stale]:
    """kernel-paths.json entries (kernels.kernel_paths) timed on another build than today's; none
    when no compiler is found (nothing says which build is current)."""
    from selfspec.kernels import compiler, library_path

    path = root / "kernel-paths.json"
    cc = compiler()
    if cc is None or not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        return [Stale("kernel-paths", str(path), disk_size(path), "unreadable")]
    current = library_path(cc).name
    gone = tuple(sorted(k for k, v in data.items() if not isinstance(v, dict) or v.get("build") != current))
    return _entries("kernel-paths", path, data, gone, "timed on another kernel build")


def find() -> list[Stale]:
    """What `prune` would delete."""
    root = cache_dir()
    return (_temporaries(root) + _weights(root) + _costs(root) + _rows(root) + _kernels(root)
            + _kernel_paths(root))


def prune(dry_run: bool = False) -> tuple[list[Stale], int]:
    """Delete (unless `dry_run`) every unusable entry; returns them and the bytes freed."""
    stale = find()
    if not dry_run:
        for s in stale:
            path = Path(s.path)
            if s.kind in ("rows", "kernel-paths") and path.is_file() and s.rows:
                kept = {k: v for k, v in json.loads(path.read_text()).items() if k not in s.rows}
                if kept:
                    atomic_write_json(path, kept, sort_keys=True)
                    continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return stale, sum(s.bytes for s in stale)


def as_dict(s: Stale) -> dict:
    d = asdict(s)
    d["rows"] = list(s.rows)
    return d
