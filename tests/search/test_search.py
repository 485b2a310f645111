"""Skip-set search on tiny random models: a valid, lossless config; resume after a kill;
two workers on one SQLite study; bad input refused before anything is written."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from lossless import assert_lossless
from tiny import one_thread, tiny_model
from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig, shipped_config
from selfspec.errors import InvalidParameterError
from selfspec.generation import generate
from selfspec.models.registry import REGISTRY
from selfspec.models.transformer import SkipSet
from selfspec.search.study import (Calibration, SearchError, SearchSettings, calibration_prompts, open_storage,
                             run_search)
from selfspec.sampling import SamplingParams

TESTS = Path(__file__).parents[1]  # the helpers (tiny.py, ...) live at the top of tests/
PROMPTS = [[(7 * i + 3 * j) % 160 for j in range(10)] for i in range(3)]
FAST = dict(max_new_tokens=12, max_draft=4)

_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("llama"), ctx_size=96)


def complete(url: str, name: str) -> list:
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url))  # retries a race on creation
    except KeyError:  # not created yet
        return []
    return study.get_trials(states=(TrialState.COMPLETE,))


def test_search_writes_a_valid_lossless_config(llama, tmp_path):
    url, out = f"sqlite:///{tmp_path}/s.db", tmp_path / "skip.json"
    events = []
    r = run_search(llama, PROMPTS, SearchSettings(trials=6, seed=3, **FAST), out=out, storage=url,
                   study_name="s", on_progress=events.append)
    config = SkipConfig.load(out)
    assert config == r.config and config.found_by == "search" and config.n_layers == 4
    assert config.objective["name"] == "tokens_per_s" and config.objective["value"] > 0
    assert config.baseline_tokens_per_s > 0 and config.search["trials"] == 6 == r.trials == r.ran
    assert set(config.attention) | set(config.mlp) <= {1, 2}  # keep-first/last 1 by default
    assert len(complete(url, "s")) == 6 and events[-1].done == 6
    assert {"start", "trial"} <= {e.event for e in events}
    drafter = LayerSkipDrafter.for_model(llama, out, max_draft=4)
    for ids in PROMPTS:
        plain = generate(llama, ids, max_new_tokens=16)
        spec = generate(llama, ids, max_new_tokens=16, drafter=drafter)
        assert_lossless(plain.token_ids, spec.token_ids, "searched config")


def test_match_rate_scores_agreement_at_a_fixed_skip_fraction(llama, tmp_path):
    calib = Calibration(llama, PROMPTS, SamplingParams(), SearchSettings(**FAST))
    calib.baseline()
    assert calib.match_rate(SkipSet())[0] == pytest.approx(1.0)  # the draft is the full model
    assert calib.match_rate(SkipSet.of([0, 1, 2, 3], [0, 1, 2, 3]))[0] < 0.5
    url = f"sqlite:///{tmp_path}/s.db"
    settings = SearchSettings(trials=5, objective="match_rate", skip_fraction=0.25, **FAST)
    r = run_search(llama, PROMPTS, settings, out=tmp_path / "m.json", storage=url, study_name="m")
    assert r.config.objective["name"] == "match_rate" and 0 < r.config.objective["value"] <= 1
    for t in complete(url, "m"):
        skipped = sum(t.params.values())
        assert t.user_attrs["feasible"] == (2 <= skipped <= 4)  # 25% .. 50% of 8 sub-layers


def test_quantized_search_records_draft_bits_and_stays_lossless(llama, tmp_path):
    """`search --draft quantized`: trials draft with the int4 copy (built once), the config says
    draft_bits 4, and `--draft quantized --skip-config` with it is lossless."""
    from selfspec.drafters.quantized import QuantizedSelfDrafter

    calib = Calibration(llama, PROMPTS, SamplingParams(), SearchSettings(draft_bits=4, **FAST))
    calib.baseline()
    rate = calib.match_rate(SkipSet())[0]
    assert 0.3 < rate < 1.0  # int4 weights on random Gaussian weights: close, not equal
    assert calib.drafter(SkipSet()).draft_transformer(llama.transformer) is calib.draft_tr
    url, out = f"sqlite:///{tmp_path}/q.db", tmp_path / "q.json"
    r = run_search(llama, PROMPTS, SearchSettings(trials=3, draft_bits=4, **FAST), out=out, storage=url,
                   study_name="q")
    assert SkipConfig.load(out).draft_bits == 4 == r.config.draft_bits
    drafter = QuantizedSelfDrafter.for_model(llama, out, max_draft=4)
    assert drafter.config.draft_bits == 4
    for ids in PROMPTS:
        plain = generate(llama, ids, max_new_tokens=16)
        spec = generate(llama, ids, max_new_tokens=16, drafter=drafter)
        assert_lossless(plain.token_ids, spec.token_ids, "searched quantized config")
    with pytest.raises(InvalidParameterError, match="--draft-bits"):
        SearchSettings(draft_bits=3).check()


WORKER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from tiny import FakeTokenizer
    from selfspec.models.loading import Model, load_transformer
    from selfspec.search.study import SearchSettings, run_search
    tr = load_transformer(Path({folder!r}), torch.float32, 96)
    model = Model(name="llama", path=Path({folder!r}), config=tr.config, transformer=tr,
                  tokenizer=FakeTokenizer(tr.config.vocab_size), dtype="fp32", ctx_size=96, load_seconds=0.0)
    Path({tmp!r}, "ready-" + sys.argv[1]).touch()
    while not Path({tmp!r}, "go").exists():
        time.sleep(0.05)
    run_search(model, {prompts!r}, SearchSettings(trials=int(sys.argv[2]), max_new_tokens=16, max_draft=4),
               out=Path({tmp!r}) / ("out-" + sys.argv[1] + ".json"), storage={url!r}, study_name="w",
               heartbeat_seconds=1, poll_seconds=0.2)
""")


def start_workers(model, tmp_path, url, *args):
    """Worker processes over `model`'s folder, released together once all have loaded it."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS), folder=str(model.path), tmp=str(tmp_path), prompts=PROMPTS,
                                    url=url))
    procs = [subprocess.Popen([sys.executable, str(script), name, str(trials)], stderr=subprocess.PIPE, text=True)
             for name, trials in args]
    deadline = time.time() + 60
    while not all((tmp_path / f"ready-{name}").exists() for name, _ in args):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    return procs


def test_resume_after_a_kill_keeps_every_finished_trial(llama, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    [proc] = start_workers(llama, tmp_path, url, ("a", 50))
    deadline = time.time() + 60
    while len(done := (complete(url, "w") if (tmp_path / "s.db").exists() else [])) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.value for t in complete(url, "w")}
    assert len(before) >= 3
    r = run_search(llama, PROMPTS, SearchSettings(trials=len(before) + 2, max_new_tokens=16, max_draft=4),
                   out=tmp_path / "skip.json", storage=url, study_name="w", heartbeat_seconds=1, poll_seconds=0.2)
    after = {t.number: t.value for t in complete(url, "w")}
    assert r.ran == 2 and len(after) == len(before) + 2 == r.trials
    assert all(after[n] == v for n, v in before.items())  # nothing lost or redone
    study = optuna.load_study(study_name="w", storage=url)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]  # the killed trial: FAIL


def test_two_workers_share_one_study(llama, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    procs = start_workers(llama, tmp_path, url, ("a", 8), ("b", 8))
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    trials = complete(url, "w")
    assert 8 <= len(trials) <= 9  # a worker may start the last trial while the other does too
    assert {t.user_attrs["worker"] for t in trials}.__len__() == 2  # both did work
    fresh = [t for t in trials if t.user_attrs["feasible"] and "repeat_of" not in t.user_attrs]
    keys = [tuple(sorted(t.params.items())) for t in fresh]
    assert len(keys) == len(set(keys))  # no set measured twice
    a, b = (json.loads((tmp_path / f"out-{n}.json").read_text()) for n in "ab")
    assert (a["attention"], a["mlp"], a["search"]["best_trial"]) == (b["attention"], b["mlp"], b["search"]["best_trial"])


def test_a_study_still_being_recorded_is_not_refused(tmp_path):
    """Two workers start at once: the first creates the study and records its settings one
    attribute at a time, "key" last. The second, reading in between, must wait for them, not
    compare against a half-written record (which read as "made for model ... sha256 None")."""
    from selfspec.search.study import check_study

    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="w", storage=url)
    study.set_user_attr("model", "llama")  # ...and nothing else yet
    assert check_study(url, "w", "llama", "ab" * 32, {"objective": "tokens_per_s"}) is not None
    for k, v in {"model_sha256": "cd" * 32, "key": {"objective": "tokens_per_s"}}.items():
        study.set_user_attr(k, v)
    with pytest.raises(SearchError, match="made for model 'llama'"):  # recorded: another model's
        check_study(url, "w", "llama", "ab" * 32, {"objective": "tokens_per_s"})


def test_bad_input_writes_nothing(llama, tmp_path):
    out, db = tmp_path / "skip.json", tmp_path / "s.db"
    url = f"sqlite:///{db}"
    with pytest.raises(InvalidParameterError, match="--trials"):
        run_search(llama, PROMPTS, SearchSettings(trials=0), out=out, storage=url)
    with pytest.raises(SearchError, match="cannot write --out"):
        run_search(llama, PROMPTS, SearchSettings(trials=1), out=tmp_path / "no" / "skip.json", storage=url)
    with pytest.raises(SearchError, match="is a folder"):
        run_search(llama, PROMPTS, SearchSettings(trials=1), out=tmp_path, storage=url)
    for bad in ("sqlite:////nonexistent-dir/s.db", "nosuchdb://host/x"):
        with pytest.raises(SearchError, match="cannot open --storage"):
            run_search(llama, PROMPTS, SearchSettings(trials=1), out=out, storage=bad)
    assert not out.exists() and not db.exists()
    run_search(llama, PROMPTS, SearchSettings(trials=1, **FAST), storage=url, study_name="x")
    other = tiny_model("qwen2", tmp_path / "qwen2", ctx_size=96)
    with pytest.raises(SearchError, match="made for model 'llama'"):
        run_search(other, PROMPTS, SearchSettings(trials=2, **FAST), out=out, storage=url, study_name="x")
    with pytest.raises(SearchError, match="other settings"):
        run_search(llama, PROMPTS, SearchSettings(trials=2, objective="match_rate", **FAST), out=out,
                   storage=url, study_name="x")
    assert not out.exists() and len(complete(url, "x")) == 1


def cli(*args):
    """The `search` command in-process (a subprocess per case would mostly measure imports)."""
    from typer.testing import CliRunner

    from selfspec.cli.main import app

    return CliRunner().invoke(app, ["search", *args])


def test_cli_refuses_bad_input_before_loading(tmp_path):
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    study = optuna.create_study(study_name="other", storage=url)
    study.set_user_attr("model", "someone-else")
    study.set_user_attr("model_sha256", "0" * 64)
    out = tmp_path / "skip.json"
    cases = [(["--trials", "0", "--out", str(out)], "--trials"),
             (["--out", str(tmp_path / "no" / "x.json")], "cannot write --out"),
             (["--storage", "nosuchdb://x", "--out", str(out)], "cannot open --storage"),
             (["--storage", url, "--study-name", "other", "--out", str(out)], "made for model 'someone-else'")]
    for args, needle in cases:
        proc = cli(*args)
        assert proc.exit_code == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last and "Traceback" not in proc.stderr
    assert not out.exists()


def test_report_prints_best_trials_and_writes_charts(llama, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    run_search(llama, PROMPTS, SearchSettings(trials=4, **FAST), storage=url, study_name="r")
    proc = cli("--report", "--storage", url, "--study-name", "r", "--report-dir", str(tmp_path / "charts"), "--json")
    assert proc.exit_code == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    values = [row["value"] for row in report["best"]]
    assert values == sorted(values, reverse=True) and values
    for png in report["charts"]:
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
    proc = cli("--report", "--storage", url, "--study-name", "nope")
    assert proc.exit_code == 2 and "no study 'nope'" in proc.stderr


def test_calibration_prompts_ship_and_parse(tmp_path):
    prompts, source = calibration_prompts()
    assert source == "calibration" and len(prompts) >= 8
    from prompts import PROMPTS as LOSSLESS_PROMPTS

    assert not set(prompts) & set(LOSSLESS_PROMPTS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(InvalidParameterError, match="prompt"):
        calibration_prompts(bad)
    with pytest.raises(InvalidParameterError, match="not both"):
        calibration_prompts(bad, suite="x")


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_shipped_configs_fit_their_models(alias):
    config = shipped_config(alias)
    assert config is not None
    entry = REGISTRY[alias]
    assert config.n_layers == entry.n_layers and config.model_sha256 == entry.sha256
    if config.found_by == "search":
        assert config.baseline_tokens_per_s and config.search["trials"] >= 1
    # losslessness of the shipped configs on the real models: tests/test_lossless_real.py


def test_a_result_no_better_than_plain_decoding_carries_a_loud_warning(llama, tmp_path):
    """Issue 25: one match_rate trial on a random model scores (near) 0 and the config was written
    silently. It is still written, with a warning that the CLI prints and --json carries."""
    settings = SearchSettings(trials=1, objective="match_rate", **FAST)
    r = run_search(llama, PROMPTS[:1], settings, out=tmp_path / "m.json", storage=f"sqlite:///{tmp_path}/s.db",
                   study_name="one")
    assert (tmp_path / "m.json").exists()
    speedup = r.tokens_per_s / r.baseline_tokens_per_s
    if speedup <= 1.0 or r.config.objective["value"] == 0:
        assert r.warning and "NO BETTER THAN PLAIN DECODING" in r.warning and "--trials" in r.warning
    from dataclasses import replace

    slow = replace(r, tokens_per_s=r.baseline_tokens_per_s * 0.7)
    assert "0.70x" in slow.warning
    fast = replace(r, tokens_per_s=r.baseline_tokens_per_s * 2, stats={**r.stats, "tau": 2.5},
                   config=replace(r.config, objective={"name": "match_rate", "value": 0.8}))
    assert fast.warning is None
