"""Trained drafters on tiny random models: training lowers the loss, saved weights reload to the
same drafts, resumed training equals uninterrupted training, every trained drafter is lossless
(greedy token for token, sampled in distribution), the early exit shares the target's KV, the
untrained LITE exit is the plain early exit, and misuse fails with a clear error."""
from __future__ import annotations

import json

import pytest
import torch

from selfspec.drafters.heads import HeadsDrafter
from selfspec.drafters.layerskip import AdaptiveExit
from selfspec.errors import DrafterError, InvalidParameterError, SelfspecError
from selfspec.generation import generate
from selfspec.drafters.early_exit import EarlyExitDrafter
from selfspec.drafters.factory import build_drafter, parse_method
from selfspec.sampling import SamplingParams
from selfspec.train.data import distill, read_data_file
from selfspec.drafters.trained.kinds import KINDS, make_kind, shifted
from selfspec.train.loop import TrainSettings, precompute, train
from selfspec.drafters.trained.store import load_drafter
from distributions import (N_SAMPLES, exact_second_token, llama, noise_floor, second_token_samples,  # noqa: F401 (llama: fixture)
                           total_variation)
from tiny import one_thread, tiny_model

PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 8, 9, 10, 11], [100, 3, 4, 50, 60, 3], [21, 22, 5, 17]]
PROMPT = [5, 17, 33, 2, 90, 41, 5, 17, 8]
SETTINGS = TrainSettings(steps=30, batch=4, window=16, lr=3e-3, warmup=5, checkpoint_every=10)


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))  # distillation data goes here
    yield from one_thread()


@pytest.fixture(scope="module")
def sequences(llama):
    return [p + generate(llama, p, max_new_tokens=40).token_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def trained(llama, sequences, tmp_path_factory):
    """kind name -> (kind, module, summary, out folder): each kind trained SETTINGS.steps steps."""
    out = {}
    for name in KINDS:
        kind = make_kind(name, llama)
        folder = tmp_path_factory.mktemp(name)
        module, summary = train(kind, llama, precompute(kind, llama, sequences), SETTINGS, folder)
        out[name] = (kind, module, summary, folder)
    return out


def _greedy_exit():
    return AdaptiveExit(gamma=0.0, adaptive=False)  # draft to the limit: every code path runs


@pytest.mark.parametrize("name", list(KINDS))
def test_training_lowers_the_loss(llama, sequences, trained, name):
    kind, module, summary, folder = trained[name]
    feats = precompute(kind, llama, sequences)
    n = min(len(s) for s in sequences)
    batch = {k: torch.stack([f[k][:n] for f in feats]) for k in feats[0]}  # every sequence, fixed
    torch.manual_seed(SETTINGS.seed)
    with torch.no_grad():
        before, after = float(kind.loss(kind.build(llama), llama, batch)), float(kind.loss(module, llama, batch))
    assert after < 0.9 * before, (before, after)
    meta = json.loads((folder / "drafter.json").read_text())
    assert meta["kind"] == name and meta["steps"] == SETTINGS.steps and meta["model_sha256"]


class Recorder:
    """Wraps a drafter and records every proposal."""

    def __init__(self, drafter):
        self.inner, self.drafts = drafter, []
        self.name = drafter.name
        self.wants_hidden = getattr(drafter, "wants_hidden", False)

    def propose(self, ctx, max_tokens):
        d = self.inner.propose(ctx, max_tokens)
        self.drafts.append(d.tokens.tolist())
        return d

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("name", list(KINDS))
def test_trained_drafters_are_lossless_and_reload_to_identical_drafts(llama, trained, name):
    kind, module, _, folder = trained[name]
    plain = generate(llama, PROMPT, max_new_tokens=40)
    fresh = Recorder(kind.drafter(module, llama, exit=_greedy_exit()))
    reloaded = Recorder(load_drafter(llama, folder, kind.drafter_name, exit=_greedy_exit()))
    runs = [generate(llama, PROMPT, max_new_tokens=40, drafter=d) for d in (fresh, reloaded)]
    for r in runs:
        assert r.token_ids == plain.token_ids
    assert fresh.drafts == reloaded.drafts and sum(map(len, fresh.drafts)) > 0
    # Trained on this model's own continuations: it must get some drafts right.
    assert runs[0].stats.accepted >= 3
    if isinstance(fresh.inner, HeadsDrafter):
        assert fresh.inner.missing_hidden == 0  # the loop handed over the hidden state every round


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return tiny_model("gemma3", tmp_path_factory.mktemp("gemma3"), ctx_size=128)


@pytest.mark.parametrize("name", list(KINDS))
def test_lossless_on_gemma3_random_modules(gemma3, name):
    """Sliding windows, soft-capping, qk-norm and embedding scale; random (untrained) modules."""
    model = gemma3
    kind = make_kind(name, model, **({"exit_layer": 2} if name == "early-exit" else {}))
    torch.manual_seed(0)
    module = kind.build(model)
    for p in module.parameters():  # not the zero init: drafts differ from the target's
        p.data.add_(0.05 * torch.randn(p.shape))
    plain = generate(model, PROMPT, max_new_tokens=30)
    spec = generate(model, PROMPT, max_new_tokens=30, drafter=kind.drafter(module, model, exit=_greedy_exit()))
    assert spec.token_ids == plain.token_ids and spec.stats.drafted > 0


@pytest.mark.parametrize("name,options", [("hydra", {"heads": 2}), ("lite", {"exit_layers": [1, 2, 3]})])
def test_resume_equals_uninterrupted(llama, sequences, tmp_path, name, options):
    kind = make_kind(name, llama, **options)
    feats = precompute(kind, llama, sequences)
    settings = TrainSettings(steps=8, batch=2, window=12, lr=3e-3, warmup=3, checkpoint_every=3)
    whole, _ = train(kind, llama, feats, settings, tmp_path / "whole")

    class Interrupted(KeyboardInterrupt):
        pass

    calls = {"n": 0}
    real_loss = kind.loss

    def dying_loss(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 3, in step 5
            raise Interrupted
        return real_loss(*args)

    kind.loss = dying_loss
    with pytest.raises(Interrupted):
        train(kind, llama, feats, settings, tmp_path / "split")
    kind.loss = real_loss
    assert json.loads((tmp_path / "split" / "checkpoint" / "checkpoint.json").read_text())["step"] == 3
    resumed, summary = train(kind, llama, feats, settings, tmp_path / "split", resume=True)
    assert summary["steps"] == 8
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # Another setting than the checkpoint's is refused, not silently mixed.
    with pytest.raises(SelfspecError, match="another settings"):
        train(kind, llama, feats, TrainSettings(steps=8, batch=3, window=12), tmp_path / "split", resume=True)


def test_early_exit_writes_the_targets_kv_and_keeps_verified_kv(llama):
    tr = llama.transformer
    L = 2
    tokens = torch.tensor(PROMPT)
    full, early = tr.new_cache(64), tr.new_cache(64)
    tr.forward(tokens, 0, full)
    tr.forward(tokens, 0, early, exit_layer=L)
    assert early.length == len(PROMPT)
    assert torch.equal(early.k[:L, :, : len(PROMPT)], full.k[:L, :, : len(PROMPT)])
    assert torch.equal(early.v[:L, :, : len(PROMPT)], full.v[:L, :, : len(PROMPT)])
    assert not early.k[L:].any()  # deeper layers untouched
    # A proposal (catch-up over the whole prompt, then drafts) leaves every verified position as it was.
    from selfspec.drafters.base import DraftContext

    kind = make_kind("early-exit", llama, exit_layer=L)
    drafter = kind.drafter(kind.build(llama), llama, exit=_greedy_exit(), max_draft=4)
    cache = llama.fresh_cache()
    tr.forward(tokens[:-1], 0, cache)
    k_before, v_before = cache.k[:, :, : len(PROMPT) - 1].clone(), cache.v[:, :, : len(PROMPT) - 1].clone()
    ctx = DraftContext(model=llama, cache=cache, tokens=list(PROMPT), sampling=SamplingParams(),
                       generator=torch.Generator())
    assert len(drafter.propose(ctx, 8)) == 4
    assert torch.equal(cache.k[:, :, : len(PROMPT) - 1], k_before)
    assert torch.equal(cache.v[:, :, : len(PROMPT) - 1], v_before)


@pytest.mark.parametrize("name", list(KINDS))
def test_sampled_distribution_matches_target(llama, trained, name):
    kind, module, _, _ = trained[name]
    params = SamplingParams(temperature=1.0, top_k=20)
    prompt = PROMPT[:5]
    p = exact_second_token(llama, prompt, params)
    floor = noise_floor(p, N_SAMPLES)
    drafter = kind.drafter(module, llama, exit=_greedy_exit())
    counts = second_token_samples(llama, prompt, params, drafter, N_SAMPLES, memo_drafts=True)
    tv = total_variation(counts, p)
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f}"


def test_clear_errors(llama, gemma3, trained, tmp_path):
    _, _, _, medusa_dir = trained["medusa"]
    with pytest.raises(SelfspecError, match="needs --drafter-weights"):
        build_drafter("medusa", llama)
    with pytest.raises(DrafterError, match="holds a medusa drafter"):
        build_drafter("hydra", llama, drafter_weights=medusa_dir)
    with pytest.raises(DrafterError, match="no trained drafter"):
        build_drafter("early-exit", llama, drafter_weights=tmp_path)
    # A server started with --drafter-weights builds other drafters with the same options.
    assert build_drafter("ngram", llama, drafter_weights=medusa_dir).name == "ngram"
    with pytest.raises(DrafterError, match="trained for model 'llama'"):
        build_drafter("medusa", gemma3, drafter_weights=medusa_dir)
    with pytest.raises(InvalidParameterError, match="--exit-layer must be in 1..3"):
        make_kind("early-exit", llama, exit_layer=4)
    with pytest.raises(InvalidParameterError, match="unknown drafter kind"):
        make_kind("eagle", llama)
    assert parse_method("medusa:weights=/x").options == {"drafter_weights": "/x"}
    drafter = build_drafter("medusa", llama, drafter_weights=medusa_dir, max_draft=2)
    assert drafter.name == "medusa" and drafter.max_draft == 2


def test_distillation_is_cached_and_data_files_are_checked(llama, tmp_path):
    seqs, info = distill(llama, PROMPTS[:2], 3, 10, progress=False)
    assert not info["cached"] and len(seqs) == 3
    assert seqs[0] == PROMPTS[0] + generate(llama, PROMPTS[0], max_new_tokens=10).token_ids  # greedy first pass
    assert seqs[2][: len(PROMPTS[0])] == PROMPTS[0]  # prompts cycle; the second pass is sampled
    again, info = distill(llama, PROMPTS[:2], 3, 10, progress=False)
    assert info["cached"] and again == seqs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"other": 1}\n')
    with pytest.raises(InvalidParameterError, match="line 2"):
        read_data_file(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi"}\n\n{"text": "some text"}\n')
    assert read_data_file(good) == (["hi"], ["some text"])


def test_shifted_labels():
    assert shifted(torch.tensor([1, 2, 3, 4]), 2).tolist() == [[2, 3], [3, 4], [4, -100], [-100, -100]]


@pytest.mark.slow
def test_cli_trains_resumes_and_generates(tmp_path):
    """The commands as a user runs them, on a tiny model with SmolLM2's tokenizer and chat template
    (slow: five fresh processes, ~4 min on a busy 2-core machine)."""
    import os
    import subprocess
    import sys

    from selfspec.models.registry import REGISTRY
    from tiny import build_tiny_chat

    if not REGISTRY["smollm2-135m"].installed:
        pytest.skip("needs SmolLM2's tokenizer (smollm2-135m is not installed; `make test` installs it)")
    folder = build_tiny_chat(tmp_path)
    env = {**os.environ, "SELFSPEC_CACHE": str(tmp_path / "cache")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "selfspec.cli.main", *args], capture_output=True, text=True,
                              timeout=300, env=env)

    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Say hello."}\n{"text": "The quick brown fox jumps over the lazy dog again and again."}\n')
    out = tmp_path / "hydra"
    common = ["train-drafter", "--model", str(folder), "--kind", "hydra", "--heads", "2", "--data", str(data),
              "--self-distill", "2", "--distill-tokens", "12", "--batch", "2", "--window", "8",
              "--checkpoint-every", "2", "--out", str(out), "--json"]
    first = cli(*common, "--steps", "2")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert report["steps"] == 2 and report["sequences"] == 3 and not report["distill"]["cached"]
    more = cli(*common, "--steps", "4", "--resume")  # continues; the distilled data comes from the cache
    assert more.returncode == 0, more.stderr
    report = json.loads(more.stdout.strip().splitlines()[-1])
    assert report["steps"] == 4 and report["distill"]["cached"]
    gen = cli("generate", "--model", str(folder), "--prompt", "Hi", "-n", "8", "--draft", "hydra",
              "--drafter-weights", str(out), "--compare", "--json")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout.strip().splitlines()[-1])["compare"]["same_as_plain"]
    wrong = cli("generate", "--model", str(folder), "--prompt", "Hi", "-n", "4", "--draft", "medusa",
                "--drafter-weights", str(out))
    assert wrong.returncode == 2 and "holds a hydra drafter" in wrong.stderr and "Traceback" not in wrong.stderr
    bad = cli("train-drafter", "--model", str(folder), "--kind", "medusa", "--exit-layer", "2", "--out", str(out))
    assert bad.returncode == 2 and "--exit-layer is for --kind early-exit" in bad.stderr


def test_drafter_stored_under_the_old_kind_name_still_loads(llama, trained, tmp_path):
    """Issue 25: --kind early-exit-adapter became early-exit (the --draft name); folders written
    before the rename say "early-exit-adapter" in drafter.json and must keep loading."""
    import shutil

    _, _, _, folder = trained["early-exit"]
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    meta = json.loads((old / "drafter.json").read_text())
    assert meta["kind"] == "early-exit"
    (old / "drafter.json").write_text(json.dumps({**meta, "kind": "early-exit-adapter"}))
    drafter = build_drafter("early-exit", llama, drafter_weights=old)
    assert isinstance(drafter, EarlyExitDrafter)


def test_untrained_lite_is_the_plain_early_exit(llama):
    """Before training, every LITE exit gives the plain early exit's logits bit for bit (the
    target's final norm and head on layer L's state), so its drafts are the untrained Kangaroo
    adapter's drafts at the same layer."""
    tr = llama.transformer
    kind = make_kind("lite", llama, exit_layers=[1, 2, 3])
    exits = kind.build(llama)
    tokens = torch.tensor(PROMPT)
    for e, L in enumerate(kind.options["exit_layers"]):
        x = tr.forward(tokens, 0, tr.new_cache(64), exit_layer=L)
        with torch.inference_mode():
            assert torch.equal(tr.logits(exits(x.float(), e).to(tr.dtype)), tr.logits(tr.final_hidden(x))), L
    ee = make_kind("early-exit", llama, exit_layer=2)
    lite = Recorder(kind.drafter(exits, llama, exit_layer=2, exit=_greedy_exit(), max_draft=4))
    kangaroo = Recorder(ee.drafter(ee.build(llama), llama, exit=_greedy_exit(), max_draft=4))
    runs = [generate(llama, PROMPT, max_new_tokens=30, drafter=d) for d in (lite, kangaroo)]
    assert runs[0].token_ids == runs[1].token_ids == generate(llama, PROMPT, max_new_tokens=30).token_ids
    assert lite.drafts == kangaroo.drafts and sum(map(len, lite.drafts)) > 0
    assert lite.extra_stats()["exit_layer"] == 2


def test_lite_picks_an_exit_and_refuses_misuse(llama, trained, tmp_path):
    kind, module, summary, folder = trained["lite"]
    meta = json.loads((folder / "drafter.json").read_text())
    layers = meta["options"]["exit_layers"]
    assert layers == [1, 2]  # the default exits of a 4-layer model
    assert meta["options"]["exit_layer"] in layers  # chosen at the end of training
    assert set(meta["exit_agreement"]) == {str(layer) for layer in layers}
    assert all(0.0 <= a <= 1.0 for a in meta["exit_agreement"].values())
    drafter = build_drafter("lite", llama, drafter_weights=folder)
    assert drafter.name == "lite" and drafter.exit_layer == meta["options"]["exit_layer"]
    other = load_drafter(llama, folder, "lite", exit_layer=1)
    assert (other.exit_layer, other.index) == (1, 0)
    with pytest.raises(InvalidParameterError, match="exit layer 3 was not tuned"):
        load_drafter(llama, folder, "lite", exit_layer=3)
    with pytest.raises(DrafterError, match="holds a lite drafter"):
        build_drafter("early-exit", llama, drafter_weights=folder)
    _, _, _, ee_dir = trained["early-exit"]
    with pytest.raises(DrafterError, match="holds a early-exit drafter"):
        build_drafter("lite", llama, drafter_weights=ee_dir)
    with pytest.raises(InvalidParameterError, match="--exit-layers must be in 1..3"):
        make_kind("lite", llama, exit_layers=[1, 4])
    with pytest.raises(InvalidParameterError, match="--exit-layer 3 is not one of the tuned --exit-layers 1,2"):
        make_kind("lite", llama, exit_layers=[1, 2], exit_layer=3)
    assert parse_method("lite:weights=/x").options == {"drafter_weights": "/x"}


def test_lite_exit_choice_weighs_agreement_against_cost(smollm):
    """The proxy prefers a deeper exit only when its agreement pays for the layers it costs."""
    from selfspec.drafters.lite import chain_value, default_exit_layers

    c = smollm.config
    assert default_exit_layers(c.n_layers) == [3, 5, 8, 12]
    assert chain_value(0.5, 3, c) > chain_value(0.5, 12, c)  # same agreement: the shallow exit is cheaper
    assert chain_value(0.9, 12, c) > chain_value(0.5, 3, c)  # much better agreement pays for 9 layers
    assert chain_value(0.0, 3, c) < 1 < chain_value(1.0, 3, c)  # drafts that always fail never pay


def test_lite_is_lossless_on_smollm2(smollm):
    """The real model, exits perturbed away from the plain early exit, every prompt token for token."""
    from prompts import PROMPTS

    kind = make_kind("lite", smollm)
    torch.manual_seed(0)
    exits = kind.build(smollm)
    with torch.no_grad():
        exits.up.add_(0.02 * torch.randn(exits.up.shape))
    drafter = kind.drafter(exits, smollm, exit_layer=5, exit=_greedy_exit(), max_draft=4)
    for prompt in PROMPTS[:3]:
        plain = generate(smollm, prompt, max_new_tokens=16)
        spec = generate(smollm, prompt, max_new_tokens=16, drafter=drafter)
        assert spec.token_ids == plain.token_ids and spec.stats.drafted > 0


def test_cli_lite_options(tmp_path):
    from typer.testing import CliRunner

    from selfspec.cli.main import app

    def cli(*args):
        return CliRunner().invoke(app, ["train-drafter", *args, "--out", str(tmp_path / "d")], env={"COLUMNS": "400"})

    help_text = cli("--help").output
    assert "| lite (LITE" in help_text and "--exit-layers" in help_text
    wrong_kind = cli("--kind", "medusa", "--exit-layers", "3,5")
    assert wrong_kind.exit_code == 2 and "--exit-layers is for --kind lite" in wrong_kind.output
    bad_list = cli("--kind", "lite", "--exit-layers", "3,x")
    assert bad_list.exit_code == 2 and "--exit-layers must be comma-separated layer numbers" in bad_list.output


def test_lite_trains_on_a_shorter_default_schedule():
    """lite's steps run the LM head once per exit, so its defaults are smaller (the whole SmolLM2
    run within 15 minutes); the other kinds keep 300 x 8, and so does an unknown name (refused
    later, with the list of kinds)."""
    from selfspec.drafters.trained.kinds import default_schedule

    assert default_schedule("lite") == (200, 4)
    assert default_schedule("medusa") == default_schedule("early-exit-adapter") == default_schedule("nope") == (300, 8)
