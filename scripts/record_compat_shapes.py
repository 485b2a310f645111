"""Record the key structure of `selfspec generate --json` and of the server's responses into
tests/data/compat/shapes.json, for tests/test_compat.py to compare today's version against.

Run it with the OLD selfspec on PYTHONPATH (before the restructure, commit 1eaeb31), after
scripts/make_compat_fixtures.py (it uses the tiny model that script ships):

    PYTHONPATH=/tmp/old python scripts/record_compat_shapes.py

A shape is the set of key paths of a JSON value: `stats.tokens_per_s`, `choices[].message.content`
(a list contributes the union of its items' paths); values are not recorded. The functions below
are imported by the test, so both versions are described by the same code.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "compat"
PROMPT = "def fibonacci(n):\n"
MESSAGES = [{"role": "user", "content": "Hello there."}]


def paths(obj, prefix: str = "") -> set[str]:
    """Every key path of a JSON value (lists: the union over their items)."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{prefix}.{k}" if prefix else k
            out.add(p)
            out |= paths(v, p)
    elif isinstance(obj, list):
        for v in obj:
            out |= paths(v, prefix + "[]")
    return out


def generate_shapes(cli: list[str], model: Path, env: dict | None = None, cwd: Path | None = None
                    ) -> dict[str, list[str]]:
    """`generate --json -n 4` with --draft none and --draft ngram: the last stdout line's paths.
    `cwd`: where to run (`python -c` puts the current folder before PYTHONPATH)."""
    out = {}
    for draft in ("none", "ngram"):
        proc = subprocess.run([*cli, "generate", "--model", str(model), "--prompt", PROMPT, "-n", "4",
                               "--draft", draft, "--no-chat", "--json"], capture_output=True, text=True,
                              env=env, check=True, stdin=subprocess.DEVNULL, cwd=cwd)
        out[draft] = sorted(paths(json.loads(proc.stdout.strip().splitlines()[-1])))
    return out


def _sse(text: str) -> tuple[set[str], str]:
    """Paths over all `data:` chunks of an SSE body, and its last data line."""
    found: set[str] = set()
    last = ""
    for line in text.splitlines():
        if line.startswith("data:"):
            last = line[5:].strip()
            if last != "[DONE]":
                found |= paths(json.loads(last))
    return found, last


def server_shapes(create_app, model) -> dict[str, list[str] | str]:
    """Non-streaming and streaming /v1/completions and /v1/chat/completions through the app
    factory (FastAPI's TestClient runs its lifespan, hence its worker)."""
    from fastapi.testclient import TestClient

    bodies = {"completions": {"model": model.name, "prompt": PROMPT, "max_tokens": 4, "temperature": 0},
              "chat/completions": {"model": model.name, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}}
    out: dict[str, list[str] | str] = {}
    with TestClient(create_app(model)) as client:
        for route, body in bodies.items():
            r = client.post(f"/v1/{route}", json=body)
            r.raise_for_status()
            out[route] = sorted(paths(r.json()))
            r = client.post(f"/v1/{route}", json={**body, "stream": True})
            r.raise_for_status()
            chunks, last = _sse(r.text)
            out[f"{route} stream"] = sorted(chunks)
            out[f"{route} stream end"] = last
    return out


def main() -> None:
    import importlib.util

    if importlib.util.find_spec("selfspec.cachedir") is None:
        sys.exit("run with the OLD selfspec on PYTHONPATH (commit 1eaeb31, before the restructure)")
    from selfspec.models.loading import load_model
    from selfspec.server import create_app

    model_dir = DATA / "model"
    import tempfile

    with tempfile.TemporaryDirectory() as cwd:
        shapes = {"generate": generate_shapes([sys.executable, "-c", "from selfspec.cli import main; main()"],
                                              model_dir, cwd=Path(cwd))}
    shapes["server"] = server_shapes(create_app, load_model(model_dir, dtype="fp32", threads=1))
    (DATA / "shapes.json").write_text(json.dumps(shapes, indent=1) + "\n")
    print(f"wrote {DATA / 'shapes.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
