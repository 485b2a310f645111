"""`selfspec cache prune`: a cache folder with a usable and an unusable entry of each kind; the
unusable ones (and only they) go, `--dry-run` lists them without deleting, `--json` is one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

OLD = Path(__file__).parent / "data" / "compat" / "cache"  # written by the pre-restructure version


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """(root, usable paths, unusable paths)."""
    import torch

    from selfspec import __version__
    from selfspec.drafters.costs import CostModel
    from selfspec.models import rows
    from selfspec.models.transformer import Linear
    from selfspec.models.weightcache import FORMAT, CacheKey

    from selfspec.drafters import costs as costs_module

    root = tmp_path / "cache"
    monkeypatch.setenv("SELFSPEC_CACHE", str(root))
    monkeypatch.setattr(costs_module, "machine_busy", lambda: False)  # save() writes nothing on a busy machine
    keep, gone = [], []
    # weights: an entry of today's key; an old one (format 1, old code), a format-1 one of today's
    # other fields, one without a manifest.
    shutil.copytree(OLD / "weights", root / "weights")
    gone += list((root / "weights").iterdir())
    for name, fields in (("usable", {}), ("oldformat", {"format": FORMAT - 1}), ("nomanifest", None)):
        entry = root / "weights" / f"{'ab' * 8}-fp32-{name}"
        entry.mkdir()
        (entry / "weights.safetensors").write_bytes(b"x" * 100)
        if fields is not None:
            key = {**CacheKey("ab" * 32, "fp32", "dense").fields(), **fields}
            (entry / "manifest.json").write_text(json.dumps({"key": key}))
        (keep if name == "usable" else gone).append(entry)
    # costs: one saved by today's code, the old version's entry.
    CostModel([1.0, 2.0], path=root / "costs" / "today.json").save()
    keep.append(root / "costs" / "today.json")
    shutil.copytree(OLD / "costs", root / "costs", dirs_exist_ok=True)
    gone += [p for p in (root / "costs").iterdir() if p.name != "today.json"]
    # rows.json: today's key of a real linear, and the same linear probed with PROBE_VERSION 1.
    now = rows._key(Linear(torch.ones(4, 4)))
    old = now.replace(f"probe={rows.PROBE_VERSION}|", "probe=1|").replace(f"selfspec={__version__}", "selfspec=0.0.9")
    (root / "rows.json").write_text(json.dumps({now: "direct", old: "pad1"}))
    # kernels: today's library name, one of other sources.
    from selfspec.kernels import compiler, library_path

    (root / "kernels").mkdir()
    if compiler() is not None:
        current = library_path(compiler())
        current.write_bytes(b"\x7fELF today")
        keep.append(current)
        gone.append(root / "kernels" / "libselfspec-0123456789abcdef.so")
        gone[-1].write_bytes(b"\x7fELF old")
        # kernel-paths.json: an entry timed on today's library, one on the old one, one without
        entry = {"short_q8_0": "tiles", "few_rows": 2, "us": None}
        (root / "kernel-paths.json").write_text(json.dumps({
            "today": {**entry, "build": current.name}, "old": {**entry, "build": gone[-1].name}, "unnamed": entry}))
    # temporary files: of a process that is gone (atomic_output's name, the weight cache's staging
    # folder, an older version's costs name), and of one still running (its write is in progress).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for rel in (f"costs/.today.{dead.pid}.140.tmp.json", f"tokenizers/{'cd' * 10}.{dead.pid}.k3_x9q.tmp/",
                f"weights/.{'ab' * 8}-fp32-x.{dead.pid}.tmp/", f"costs/old.json.{dead.pid}.tmp"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if rel.endswith("/") else path.write_text("{")
        gone.append(path)
    (gone[-2] / "weights.safetensors").write_bytes(b"y" * 50)
    live = root / "costs" / f".other.{os.getppid()}.7.tmp.json"
    live.write_text("{")
    keep.append(live)
    return root, keep, gone


def _prune(*args: str) -> dict:
    from typer.testing import CliRunner

    from selfspec.cli.main import app

    r = CliRunner().invoke(app, ["cache", "prune", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_prune_deletes_only_unusable_entries(cache):
    root, keep, gone = cache
    size = sum(p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
               for p in gone)
    listed = _prune("--dry-run")
    assert listed["dry_run"] is True
    paths = {e["path"] for e in listed["entries"]}
    timed = {str(root / "kernel-paths.json")} if (root / "kernel-paths.json").exists() else set()
    assert paths == {str(p) for p in gone} | {str(root / "rows.json")} | timed
    assert all(p.exists() for p in gone)  # a dry run deletes nothing
    rows_entry = next(e for e in listed["entries"] if e["kind"] == "rows")
    assert len(rows_entry["rows"]) == 1 and "probe=1|" in rows_entry["rows"][0]
    if timed:
        paths_entry = next(e for e in listed["entries"] if e["kind"] == "kernel-paths")
        assert paths_entry["rows"] == ["old", "unnamed"]

    done = _prune()
    assert done["entries"] == listed["entries"] and done["bytes"] == listed["bytes"] >= size
    assert not any(p.exists() for p in gone)
    assert all(p.exists() for p in keep), [str(p) for p in keep if not p.exists()]
    assert list(json.loads((root / "rows.json").read_text()).values()) == ["direct"]
    if timed:
        assert list(json.loads((root / "kernel-paths.json").read_text())) == ["today"]
    assert _prune()["entries"] == []  # nothing left to prune


def test_prune_text_output_says_what_it_frees(cache):
    from typer.testing import CliRunner

    from selfspec.cli.main import app

    r = CliRunner().invoke(app, ["cache", "prune", "--dry-run"])
    assert r.exit_code == 0 and "would free" in r.stdout and "MiB" in r.stdout
    r = CliRunner().invoke(app, ["cache", "prune"])
    assert r.exit_code == 0 and r.stdout.strip().splitlines()[-1].startswith("freed ")
