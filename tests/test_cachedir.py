"""`selfspec cache list|clear` on a private cache folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def run(tmp_path, *args):
    env = {**os.environ, "SELFSPEC_CACHE": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "selfspec.cli.main", "cache", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_list_and_clear(tmp_path):
    (tmp_path / "costs").mkdir()
    (tmp_path / "costs" / "a.json").write_text('{"verify": [1, 2]}')
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "v.json").write_text("x" * 1000)
    listed = {r["kind"]: r for r in json.loads(run(tmp_path, "list", "--json").stdout.splitlines()[-1])["kinds"]}
    assert listed["costs"]["entries"] == 1 and listed["vocab"]["bytes"] == 1000
    assert listed["models"]["entries"] == 0
    proc = run(tmp_path, "clear", "costs", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "costs").exists() and (tmp_path / "vocab" / "v.json").exists()
    assert run(tmp_path, "clear", "--yes").returncode == 0
    assert not (tmp_path / "vocab").exists()


def test_clear_unknown_kind_changes_nothing(tmp_path):
    (tmp_path / "costs").mkdir()
    proc = run(tmp_path, "clear", "everything-please", "--yes")
    assert proc.returncode == 2 and "unknown cache kind" in proc.stderr.splitlines()[-1]
    assert (tmp_path / "costs").exists()
