"""Files and interfaces of the version before the package restructure (commit 1eaeb31) still work.

tests/data/compat/ was written by that version (scripts/make_compat_fixtures.py, run with the old
code on PYTHONPATH; MANIFEST.json lists its commands) for a tiny random Llama shipped beside it, so
every identity it recorded can be recomputed here. Each kind of file is loaded through the public
path a user takes, and greedy generation with the old skip configs / trained drafter / datastore
must equal plain greedy generation. Cache entries whose key changed by design must be ignored
cleanly and rebuilt; the test asserts which of the two happens for each kind.

tests/data/compat/shapes.json (scripts/record_compat_shapes.py, same old version) holds the key
structure of `generate --json` and of the server's responses; the current version must produce
the same structure, up to the differences listed (with their reason) in this file.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "compat"
PROMPT = "def fibonacci(n):\n    if n < 2:\n"
N = 12


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The fixture copied to a temp folder (so nothing here writes into the repo), the model under
    another folder name (so identities, not names, must match), and SELFSPEC_CACHE = the old cache."""
    root = tmp_path_factory.mktemp("compat")
    shutil.copytree(DATA, root / "data")
    (root / "data" / "model").rename(root / "data" / "tiny-llama")
    mp = pytest.MonkeyPatch()
    mp.setenv("SELFSPEC_CACHE", str(root / "data" / "cache"))
    yield root / "data"
    mp.undo()


@pytest.fixture(scope="module")
def model(env):
    from selfspec.models.loading import load_model

    return load_model(env / "tiny-llama", dtype="fp32", threads=1)


def _ids(model, drafter=None):
    from selfspec.generation import generate

    return list(generate(model, PROMPT, drafter=drafter, max_new_tokens=N, chat=False).token_ids)


@pytest.fixture(scope="module")
def plain(model):
    return _ids(model)


def _notice(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "older hash of the model folder" in r.getMessage()]


# ---------------------------------------------------------------------------- model identity
def test_old_hf_folder_hashes_are_legacy_identities(env, caplog, monkeypatch):
    """Both hashes the old version recorded for the folder (search's and train-drafter's) differ
    from today's `model_identity` and are accepted as legacy ones, each with one one-line notice
    (not repeated); a wrong hash is not accepted."""
    from selfspec.models import registry
    from selfspec.models.registry import identity_matches, model_identity

    monkeypatch.setattr(registry, "_NOTICED", set())

    search = json.loads((env / "skip.json").read_text())["model_sha256"]
    trained = json.loads((env / "medusa" / "drafter.json").read_text())["model_sha256"]
    path = env / "tiny-llama"
    assert model_identity(path) not in (search, trained)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert identity_matches(search, path) and identity_matches(trained, path)
        assert not identity_matches("0" * 64, path)
    notices = _notice(caplog)
    assert len(notices) == 2 and all("\n" not in n for n in notices)
    assert {search[:12], trained[:12]} == {n.split("(")[-1][:12] for n in notices}


# ---------------------------------------------------------------------------- skip configs
@pytest.mark.parametrize("name", ["skip.json", "online-skip.json"])
def test_old_skip_config_loads_and_is_lossless(env, model, plain, name, caplog):
    """`selfspec search` output and `--save-skip-config` of an online run: `--draft layer-skip
    --skip-config FILE` loads them (legacy hash: a one-line notice, no error) and decodes losslessly."""
    from selfspec.drafters.factory import build_drafter

    with caplog.at_level(logging.WARNING):
        drafter = build_drafter("layer-skip", model, skip_config=str(env / name))
    old = json.loads((env / name).read_text())
    assert sorted(drafter.config.attention) == old["attention"] and sorted(drafter.config.mlp) == old["mlp"]
    assert len(_notice(caplog)) <= 1  # one notice per (hash, folder) and process
    assert _ids(model, drafter) == plain


def test_skip_config_of_another_model_is_refused(env, model, tmp_path):
    """The compat check can fail: a config whose hash names no version of this model is refused."""
    from selfspec.drafters.factory import build_drafter
    from selfspec.errors import SelfspecError

    bad = json.loads((env / "skip.json").read_text())
    bad["model_sha256"] = "f" * 64
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SelfspecError, match="selfspec search"):
        build_drafter("layer-skip", model, skip_config=str(tmp_path / "bad.json"))
    bad["model"] = "tiny-llama"  # the folder's name, yet the recorded hash says another model
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SelfspecError, match="selfspec search"):
        build_drafter("layer-skip", model, skip_config=str(tmp_path / "bad.json"))


# ---------------------------------------------------------------------------- trained drafter
def test_old_trained_drafter_loads_and_is_lossless(env, model, plain):
    from selfspec.drafters.factory import build_drafter

    drafter = build_drafter("medusa", model, drafter_weights=str(env / "medusa"))
    assert _ids(model, drafter) == plain


def test_trained_drafter_of_another_model_is_refused(env, model, tmp_path):
    from selfspec.drafters.factory import build_drafter
    from selfspec.errors import SelfspecError

    shutil.copytree(env / "medusa", tmp_path / "medusa")
    meta = json.loads((tmp_path / "medusa" / "drafter.json").read_text())
    meta["model_sha256"] = meta["model_sha256"][::-1]
    (tmp_path / "medusa" / "drafter.json").write_text(json.dumps(meta))
    with pytest.raises(SelfspecError, match="trained for model"):
        build_drafter("medusa", model, drafter_weights=str(tmp_path / "medusa"))


# ---------------------------------------------------------------------------- datastore
def test_old_datastore_opens_and_is_lossless(env, model, plain):
    from selfspec.drafters.factory import build_drafter

    drafter = build_drafter("retrieval", model, datastore=str(env / "datastore"))
    assert drafter.store.tokens.size == json.loads((env / "datastore" / "meta.json").read_text())["tokens"]
    assert _ids(model, drafter) == plain


# ---------------------------------------------------------------------------- cache entries
def test_old_weight_cache_entry_is_replaced(env, model):
    """The entry's key holds the loader's code fingerprint, which the restructure changed: the
    load ignores it (cleanly: no error), writes its own and deletes the stale one of the same
    model and dtype. The old entry's model hash is today's identity of the folder (same prefix)."""
    from selfspec.models.registry import model_identity

    assert model.load_info["weight_cache"] == "written"
    entries = [p.name for p in (env / "cache" / "weights").iterdir() if not p.name.startswith(".")]
    old = next(iter((DATA / "cache" / "weights").iterdir())).name
    assert old not in entries and len(entries) == 1
    assert entries[0].split("-")[0] == old.split("-")[0] == model_identity(env / "tiny-llama")[:16]


def test_old_costs_entry_is_ignored(env, model, monkeypatch):
    """Costs are keyed by the effective ISA and the selfspec version since the exactness work:
    the old entry is never read (a new calibration is), and `selfspec cache prune` removes it."""
    from selfspec.drafters import costs as costs_module
    from selfspec.drafters.costs import cached_costs, calibrate

    monkeypatch.setattr(costs_module, "machine_busy", lambda: False)  # the suite's workers load the CPU

    old = next(iter((env / "cache" / "costs").iterdir()))
    assert cached_costs(model) is None
    costs = calibrate(model, repeats=1)
    assert costs.path != old and costs.path.is_file() and old.is_file()


def test_old_online_skip_cache_is_resumed_and_moved(env, model, plain, caplog):
    """The online-skip cache file is named and checked by the model's hash; the old version
    recorded its search hash for an HF folder. Today's drafter finds that file by the legacy hash
    (whatever the folder is called now), resumes its state with the one-line notice, moves it to
    today's name, and stays lossless."""
    from selfspec.drafters.factory import build_drafter

    online = env / "cache" / "online"
    old = {p.name for p in online.iterdir()}
    with caplog.at_level(logging.WARNING):
        drafter = build_drafter("layer-skip", model, skip_config="online:window=16")
    assert drafter.cached is True and drafter.cache_path.is_file()
    assert {p.name for p in online.iterdir()} == {drafter.cache_path.name} and drafter.cache_path.name not in old
    assert json.loads(drafter.cache_path.read_text())["model_sha256"] == drafter.sha
    assert _ids(model, drafter) == plain
    again = build_drafter("layer-skip", model, skip_config="online:window=16")
    assert again.cached is True  # from today's file now


# ---------------------------------------------------------------------------- JSON interfaces
def _recorder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("record_compat_shapes", Path(__file__).parents[1] / "scripts"
                                                  / "record_compat_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Keys the current version adds to the stats (of `generate --json` and the server's `selfspec`
# object), each on purpose. Any other new key, or a missing one, is a rename or a loss: it fails.
ADDED_STATS = {
    "isa": "instruction set the kernels ran with (exactness work: AVX2/AVX-512 differ)",
    "dtype_reason": "why --dtype auto chose the dtype (exactness work)",
}
# Keys removed on purpose: `seconds` was an undocumented alias of decode_seconds (restructure).
REMOVED_STATS = {"seconds": "undocumented alias of decode_seconds, dropped in the restructure"}


def _expected(old: list[str], prefix: str) -> set[str]:
    """The old paths, less the removed stats keys, plus the added ones, under `prefix`."""
    return ({p for p in old if p not in {f"{prefix}.{k}" for k in REMOVED_STATS}}
            | ({f"{prefix}.{k}" for k in ADDED_STATS} if f"{prefix}" in old else set()))


def _diff(now: set[str], expected: set[str]) -> str:
    return f"new: {sorted(now - expected)}, missing: {sorted(expected - now)}"


def test_generate_json_keys_match_the_old_version(env):
    import sys

    old = json.loads((DATA / "shapes.json").read_text())["generate"]
    now = _recorder().generate_shapes([sys.executable, "-m", "selfspec.cli.main"], env / "tiny-llama",
                                      cwd=Path(__file__).parents[1])
    assert set(now) == set(old)
    for draft in old:
        expected = _expected(old[draft], "stats")
        assert set(now[draft]) == expected, f"--draft {draft}: " + _diff(set(now[draft]), expected)


def test_server_response_keys_match_the_old_version(env, model):
    from selfspec.server.app import create_app

    old = json.loads((DATA / "shapes.json").read_text())["server"]
    now = _recorder().server_shapes(create_app, model)
    assert set(now) == set(old)
    for what, paths in old.items():
        if isinstance(paths, str):  # the SSE terminator
            assert now[what] == paths, what
            continue
        expected = _expected(paths, "selfspec")
        assert set(now[what]) == expected, f"{what}: " + _diff(set(now[what]), expected)
