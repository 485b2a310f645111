"""selfspec/models/light_tokenizer.py and tokenizer_check.py: the light tokenizer (tokenizers +
jinja2, no transformers) gives exactly transformers' ids, text and chat prompts on the real models'
tokenizers; a warm load never imports transformers; any difference keeps transformers' tokenizer."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfspec.models import tokenizer_check
from selfspec.models.tokenizer_check import outcome
from selfspec.models.light_tokenizer import LightTokenizer
from selfspec.models.loading import file_key, gguf_tokenizer_folder, load_gguf_tokenizer
from selfspec.models.registry import REGISTRY

ROOT = Path(__file__).parents[2]


def _gguf(alias: str) -> Path:
    entry = REGISTRY[alias]
    if not entry.installed:
        pytest.skip(f"{alias} is not installed ({entry.install_hint})")
    return entry.path()


def _pair(alias: str):
    """(transformers' tokenizer, the light tokenizer) of a registry model's converted folder."""
    from transformers import AutoTokenizer

    path = _gguf(alias)
    light = load_gguf_tokenizer(path)  # runs the check if this cache folder has no current marker
    folder = gguf_tokenizer_folder(path)
    assert isinstance(light, LightTokenizer), json.loads((folder / tokenizer_check.MARKER).read_text())
    return AutoTokenizer.from_pretrained(str(folder)), light


def _suite_prompts() -> list[tuple[str, ...]]:
    rows = []
    for suite in sorted((ROOT / "selfspec" / "data" / "suites").glob("*.jsonl")):
        rows += [json.loads(line) for line in suite.read_text().splitlines()]
    return [(r["prompt"],) if "prompt" in r else tuple(r["turns"]) for r in rows]


def _conversations(turns: tuple[str, ...]) -> list[list[dict]]:
    """The conversations selfspec renders for a suite prompt: the user's turns (earlier ones with
    an answer, as the bench does), without and with a system message."""
    messages = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(turns) - 1:
            messages.append({"role": "assistant", "content": f"Answer {i}: ok 😀"})
    return [messages, [{"role": "system", "content": "Be brief."}, *messages]]


# Qwen2's tokenizer exercises the saved live backend (transformers adds an NFC normalizer on load).
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_light_tokenizer_equals_transformers_on_suites_and_probes(alias):
    ref, light = _pair(alias)
    texts = tokenizer_check.probe_texts(ref)
    seqs = tokenizer_check.probe_ids(ref, texts)
    assert tokenizer_check.differences(tokenizer_check.probe(ref, texts, seqs),
                                       tokenizer_check.probe(light, texts, seqs)) == []
    assert bool(light.chat_template) == (alias != "gemma3-270m")  # Gemma-3 270m is a base model
    for turns in _suite_prompts():
        for text in turns:  # raw text, as for a model without a template
            for special in (True, False):
                ids = list(ref(text, add_special_tokens=special).input_ids)
                assert light(text, add_special_tokens=special).input_ids == ids
                assert light.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        if not ref.chat_template:
            continue
        for messages in _conversations(turns):
            for gen in (True, False):
                want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                got = light.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                assert got == want
                ids = list(ref(want, add_special_tokens=False).input_ids)
                assert light(got, add_special_tokens=False).input_ids == ids
                assert light.decode(ids) == ref.decode(ids)


# Every feature of transformers' template environment that a Hub template may use.
FEATURE_TEMPLATE = """{%- set ns = namespace(count=0, seen=dict(a=1)) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'tool' %}{{ raise_exception('no tools: ' ~ m['content']) }}{% endif -%}
  {%- if loop.index > 3 %}{% break %}{% endif -%}
  {%- if m['content'] == 'skip' %}{% continue %}{% endif %}
  {% set ns.count = ns.count + 1 %}
<{{ m['role'] }}>{{ m['content'] | tojson }} {{ {'k': m['content'], 'n': [1, 2]} | tojson(indent=2) }}
{% generation %}{{ m['content'] | trim }}{% endgeneration %}{{ eos_token }}
{%- endfor %}
{{ ns.count }} {{ dict.fromkeys(['x', 'y'], 0) | tojson }} {{ bos_token ~ pad_token ~ unk_token }} {{ strftime_now('%Y') }}
{%- if add_generation_prompt %}<assistant>{% endif %}"""


def test_template_environment_matches_transformers():
    ref, light = _pair("smollm2-135m")
    ref.chat_template = light.chat_template = FEATURE_TEMPLATE
    chats = [[{"role": "user", "content": " Ünï <b>\"q\"</b> 😀 "}, {"role": "assistant", "content": "skip"},
              {"role": "user", "content": "c", "name": None}, {"role": "user", "content": "past the break"}],
             [{"role": "tool", "content": "x"}]]
    def render(tok, messages, gen=False):
        return outcome(lambda: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))

    for messages in chats:
        for gen in (True, False):
            assert render(light, messages, gen) == render(ref, messages, gen)
    assert render(light, chats[-1]) == "raised TemplateError"  # raise_exception on the tool message
    for bad in ("{{ ''.__class__ }}", "{% set ns = namespace(_x=1) %}{{ 1 }}", "{% set x = [] %}{{ x.append(1) }}"):
        ref.chat_template = light.chat_template = bad
        chat = [{"role": "user", "content": "hi"}]
        assert render(light, chat) == render(ref, chat)


def test_warm_load_and_generate_do_not_import_transformers():
    _pair("smollm2-135m")  # the folder's check has run: the load below is a warm one
    code = """
import json, sys
from selfspec.models.loading import load_model
m = load_model("smollm2-135m")
ids = m.encode("Say hello.")
loaded = {"load": "transformers" in sys.modules, "tokenizer": m.load_info["tokenizer"], "text": m.decode(ids)}
sys.argv = ["selfspec", "generate", "--model", "smollm2-135m", "-n", "4", "--json", "-p", "Say hello."]
from selfspec.cli.main import main
try:
    main()
except SystemExit as e:
    loaded["exit"] = e.code
loaded["generate"] = "transformers" in sys.modules
print(json.dumps(loaded))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"load": False, "tokenizer": "light", "text": out["text"], "exit": 0, "generate": False}, out
    assert "Say hello." in out["text"]


@pytest.fixture
def cache_copy(tmp_path, monkeypatch):
    """A cache folder holding a copy of SmolLM2's converted tokenizer, without a marker."""
    path = _gguf("smollm2-135m")
    source = gguf_tokenizer_folder(path)
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))  # before the key: it depends on the cache's stamps
    folder = tmp_path / "tokenizers" / file_key(path)
    shutil.copytree(source, folder)
    for name in (tokenizer_check.MARKER, tokenizer_check.LIVE_BACKEND):
        (folder / name).unlink(missing_ok=True)
    return path, folder


def _marker(folder: Path) -> dict:
    return json.loads((folder / tokenizer_check.MARKER).read_text())


def test_a_probe_that_differs_keeps_transformers(cache_copy, monkeypatch):
    path, folder = cache_copy
    decode = LightTokenizer.decode
    with monkeypatch.context() as m:
        m.setattr(LightTokenizer, "decode", lambda self, ids, **kw: decode(self, ids, **kw).replace("é", "e"))
        assert not isinstance(load_gguf_tokenizer(path), LightTokenizer)
    marker = _marker(folder)
    assert marker["match"] is False and any(d.startswith("decode[") for d in marker["differences"]), marker
    assert not isinstance(load_gguf_tokenizer(path), LightTokenizer)  # the marker is kept: no check at every load
    (folder / tokenizer_check.MARKER).write_text(json.dumps({**marker, "check": 0}))  # a check of an older version
    assert isinstance(load_gguf_tokenizer(path), LightTokenizer)
    assert _marker(folder)["match"] is True


def test_a_marker_that_says_it_differed_keeps_transformers(cache_copy):
    path, folder = cache_copy
    assert isinstance(load_gguf_tokenizer(path), LightTokenizer)
    (folder / tokenizer_check.MARKER).write_text(json.dumps({**_marker(folder), "match": False}))
    assert not isinstance(load_gguf_tokenizer(path), LightTokenizer)
    marker = _marker(folder)
    (folder / tokenizer_check.MARKER).write_text(json.dumps({**marker, "match": True, "versions": {"transformers": "0"}}))
    assert isinstance(load_gguf_tokenizer(path), LightTokenizer)  # another transformers: checked again


def test_what_the_light_tokenizer_does_not_reproduce_keeps_transformers(cache_copy):
    path, folder = cache_copy
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    assert not isinstance(load_gguf_tokenizer(path), LightTokenizer)
    assert _marker(folder)["differences"] == ["unsupported: clean_up_tokenization_spaces is set"]


def test_a_check_that_fails_keeps_transformers(cache_copy, monkeypatch):
    path, folder = cache_copy

    def broken(reference):
        raise RuntimeError("probe set unreadable")

    monkeypatch.setattr(tokenizer_check, "probe_texts", broken)
    assert not isinstance(load_gguf_tokenizer(path), LightTokenizer)
    assert _marker(folder)["differences"] == ["the check failed: RuntimeError: probe set unreadable"]


def test_concurrent_conversions_publish_one_complete_folder(monkeypatch, tmp_path):
    """Two processes converting one GGUF's tokenizer at once: each writes a folder of its own and
    publishes it with one rename; the one that finds the other's folder already in place keeps
    that one and removes its own, leaving no temporary folder behind."""
    import transformers

    from selfspec.models import loading

    monkeypatch.setattr(loading, "cache_dir", lambda: tmp_path)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    cached = tmp_path / "tokenizers" / file_key(gguf)
    seen = []

    class Converted:
        def save_pretrained(self, folder):
            seen.append(folder)
            Path(folder, "tokenizer_config.json").write_text('{"mine": %d}' % len(seen))
            if len(seen) == 1:  # the other process finishes while this one is still writing
                assert loading.gguf_tokenizer_folder(gguf) == cached

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Converted())
    assert loading.gguf_tokenizer_folder(gguf) == cached
    assert len(seen) == 2 and seen[0] != seen[1]  # two folders of their own, never one shared
    assert json.loads((cached / "tokenizer_config.json").read_text()) == {"mine": 2}  # the first to finish
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # no temporary folder left


def test_a_hashed_file_keys_its_caches_by_content(monkeypatch, tmp_path):
    """A file whose SHA-256 this machine remembers (a verified registry GGUF) keys its caches by
    that hash: a reinstalled copy at another path shares the converted tokenizer; an unhashed
    file keeps the (path, size, mtime) key, which differs between copies."""
    from selfspec.models import registry

    monkeypatch.setattr(registry, "cache_dir", lambda: tmp_path)
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(b"GGUF same bytes")
    assert file_key(a) != file_key(b)  # not hashed: path, size and mtime
    sha = registry.sha256_file(a)
    registry._remember_verified(a, sha)
    registry._remember_verified(b, sha)
    assert file_key(a) == file_key(b) == sha[:20]
