"""`selfspec bench`: Spec-Bench-style suites, every method against our plain decoding in the same run.

Each method runs in a fresh worker process (peak RSS per method: ru_maxrss never goes down), with
the same threads, a warm-up generation first, and every prompt x repeat timed around decoding only
(prefill is reported separately). Workers stream one event per line on stdout; the parent drives
the progress bar, collects the runs, compares each method's greedy output with plain decoding and
writes DIR/results.json, DIR/report.md and PNG charts.

Methods are `selfspec.drafters.factory` specs: our drafters (`none`, `layer-skip`, `ngram`, `model`, with
options such as `layer-skip:skip=F`) and other engines (`hf`, `hf-lookup`: transformers `generate`
greedy and with prompt lookup; `llama-cpp`, `llama-cpp-lookup`: llama-cpp-python on the same GGUF;
`openvino`, `openvino-lookup`, `openvino-spec`: OpenVINO GenAI on the same GGUF, fed the same token
ids; `openai:url=...`: any OpenAI-compatible server, through streaming chat completions).
A missing optional engine is reported as "not installed", a model it cannot read as "not
supported", never as an error. Every run is compared with our plain decoding (`same_as_plain`) and
with its own engine's plain run (`same_as_own_plain`): a peer's speculation that changes its own
output is as much a failure of losslessness as ours would be.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Iterable

from pydantic import Field, model_validator

from selfspec.errors import InvalidParameterError, SelfspecError
from selfspec.jsonl import NonBlank, NonEmpty, Row, read_rows
from selfspec.paths import atomic_write_json
from selfspec.progress import Bar
from selfspec.drafters.factory import BENCH_DEFAULT, MethodSpec, parse_method

EVENT = "@@selfspec-bench "  # prefix of worker event lines (anything else on stdout is ignored)
SUITES = ("quick", "full", "code")
SUITE_DIR = Path(__file__).parents[1] / "data" / "suites"
WARMUP_PROMPT = "Say hello."


# ----------------------------------------------------------------------------------------- suites
@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    turns: tuple[str, ...]  # one turn, or several for multi-turn conversation


def load_suite(suite: str) -> list[Prompt]:
    """A shipped suite (`quick`, `full`) or a JSONL file: one `{"id", "category", "prompt"}` (or
    `"turns": [...]`) object a line."""
    if suite in SUITES:
        text = (SUITE_DIR / f"{suite}.jsonl").read_text()
        where = f"suite {suite!r}"
    else:
        path = Path(suite).expanduser()
        if not path.is_file():
            raise InvalidParameterError(f"--suite must be one of {', '.join(SUITES)} or a JSONL file; "
                                        f"{suite!r} is neither")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidParameterError(f"cannot read suite {path}: {e}") from None
        where = str(path)
    rows = read_rows(text, where, SuiteRow)
    ids = [row.id for row in rows]
    if dup := next((i for n, i in enumerate(ids) if i in ids[:n]), None):
        raise InvalidParameterError(f"{where}: duplicate id {dup!r}")
    return [Prompt(row.id, row.category, (row.prompt,) if row.prompt is not None else tuple(row.turns))
            for row in rows]


def limit_prompts(prompts: list[Prompt], limit: int | None) -> list[Prompt]:
    """The first `limit` prompts of each category, in suite order (None: all)."""
    if limit is None:
        return prompts
    seen: dict[str, int] = {}
    kept = []
    for p in prompts:
        seen[p.category] = seen.get(p.category, 0) + 1
        if seen[p.category] <= limit:
            kept.append(p)
    return kept


class SuiteRow(Row):
    """A bench prompt: `{"id", "category", "prompt"}`, or `"turns": [...]` for a conversation."""

    id: NonEmpty
    category: NonEmpty = "default"
    prompt: NonBlank | None = None
    turns: Annotated[list[NonBlank], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _prompt_or_turns(self):
        if (self.prompt is None) == (self.turns is None):
            raise ValueError('give exactly one of "prompt" (a string) or "turns" (a list)')
        return self


# -------------------------------------------------------------------------------------- settings
@dataclass
class BenchSettings:
    model: str = "smollm2-135m"
    suite: str = "quick"
    methods: list[str] = field(default_factory=lambda: BENCH_DEFAULT.split(","))
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    repeats: int = 1
    threads: int | None = None
    dtype: str = "auto"
    ctx_size: int | None = None
    chat: bool | None = None
    warmup: bool = True
    device: str = "auto"  # run_bench resolves it (cpu or cuda:N) before any worker starts
    limit: int | None = None  # the first N prompts of each category (a small first try)

    def sampling(self):
        from selfspec.sampling_params import SamplingParams

        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty, seed=self.seed)

    def check(self) -> list[MethodSpec]:
        """Validate everything a worker would trip over, before any process starts."""
        self.sampling()
        for name in ("max_new_tokens", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidParameterError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.threads is not None and self.threads < 1:
            raise InvalidParameterError(f"--threads must be >= 1, got {self.threads}")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise InvalidParameterError(f"--limit must be >= 1 (prompts per category), got {self.limit!r}")
        specs = [parse_method(m) for m in self.methods]
        labels = [s.text for s in specs]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise InvalidParameterError(f"method listed twice: {', '.join(sorted(dup))}")
        return specs


# --------------------------------------------------------------------------------------- runners
def _encode(tokenizer, turns: list[str], answers: list[str], chat: bool) -> list[int]:
    """Token ids of a conversation so far (earlier turns with this method's own answers). Without
    a chat template, turns and answers are joined as plain text."""
    if chat:
        messages = []
        for i, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    parts = []
    for i, turn in enumerate(turns):
        parts.append(turn)
        if i < len(answers):
            parts.append(answers[i])
    return list(tokenizer("\n\n".join(parts) + "\n").input_ids)


@dataclass
class TurnResult:
    token_ids: list[int]
    text: str
    prefill_seconds: float
    decode_seconds: float
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    extras: dict = field(default_factory=dict)
    new_tokens: int | None = None  # when token_ids are a stand-in (a server's text re-tokenised)


class Runner:
    """One method, loaded once: generates one turn from prompt token ids."""

    tokenizer = None
    chat = False
    load_seconds = 0.0
    info: dict = {}  # which engine build runs the method (version, instruction set, precision...)

    def generate(self, prompt_ids: list[int], settings: BenchSettings) -> TurnResult:
        raise NotImplementedError

    def turn(self, turns: list[str], answers: list[str], settings: BenchSettings) -> tuple[int, TurnResult]:
        """One turn of a conversation: (prompt tokens, result). Engines fed text override this."""
        prompt_ids = _encode(self.tokenizer, turns, answers, self.chat)
        return len(prompt_ids), self.generate(prompt_ids, settings)

    def warm_up(self, settings: BenchSettings) -> None:
        warm = BenchSettings(**{**asdict(settings), "max_new_tokens": min(8, settings.max_new_tokens)})
        self.turn([WARMUP_PROMPT], [], warm)

    def run(self, prompt: Prompt, settings: BenchSettings) -> dict:
        """All turns of a prompt: one run record of results.json (without method/repeat/rss)."""
        answers, ids, turns = [], [], []
        for i in range(len(prompt.turns)):
            n_prompt, turn = self.turn(list(prompt.turns[: i + 1]), answers, settings)
            turns.append((n_prompt, turn))
            answers.append(turn.text)
            ids.extend(turn.token_ids)
        new = sum(len(t.token_ids) if t.new_tokens is None else t.new_tokens for _, t in turns)
        decode = sum(t.decode_seconds for _, t in turns)
        rounds = sum(t.rounds for _, t in turns)
        drafted = sum(t.drafted for _, t in turns)
        accepted = sum(t.accepted for _, t in turns)
        return {"category": prompt.category, "prompt_id": prompt.id, "prompt_tokens": turns[0][0],
                "text": "".join(t.text for _, t in turns),
                "new_tokens": new, "prefill_seconds": sum(t.prefill_seconds for _, t in turns),
                "decode_seconds": decode, "tokens_per_s": new / decode if decode > 0 else 0.0,
                "rounds": rounds, "drafted": drafted, "accepted": accepted,
                "mean_accepted_tokens": new / rounds if rounds else None,
                "acceptance_rate": accepted / drafted if drafted else None,
                "token_ids": ids, **_mean_extras([t for _, t in turns])}


def _mean_extras(turns: list[TurnResult]) -> dict:
    """Drafter numbers worth a column (auto's predicted and realised speedup), averaged over turns."""
    keys = {k for t in turns for k, v in t.extras.items() if v is not None}
    return {k: statistics.mean(t.extras[k] for t in turns if t.extras.get(k) is not None) for k in sorted(keys)}


# Drafter stats a run records (means over its turns): auto's speedups, hypothesis reduction's
# node budget (docs/tree-verification.md).
RECORDED_EXTRAS = ("predicted_speedup", "realised_speedup", "tree_nodes_proposed", "tree_nodes_verified",
                   "tree_expected_tokens")


class OursRunner(Runner):
    """Our engine with one of our drafters (or none)."""

    def __init__(self, spec: MethodSpec, settings: BenchSettings, model=None) -> None:
        from selfspec.drafters.factory import build_drafter
        from selfspec.models.loading import load_model

        opts = dict(spec.options)
        dtype = opts.pop("dtype", settings.dtype)
        t0 = time.perf_counter()
        self.model = model or load_model(settings.model, dtype=dtype, ctx_size=settings.ctx_size,
                                         threads=settings.threads, device=settings.device)
        self.drafter = build_drafter(spec.kind, self.model, dtype=dtype, threads=settings.threads, **opts)
        self.load_seconds = time.perf_counter() - t0
        self.tokenizer = self.model.tokenizer
        self.chat = self.model.has_chat_template if settings.chat is None else settings.chat

    def generate(self, prompt_ids, settings):
        from selfspec.generation import generate

        r = generate(self.model, prompt_ids, drafter=self.drafter, sampling=settings.sampling(),
                     max_new_tokens=settings.max_new_tokens)
        s = r.stats
        extras = {k: v for k, v in s.extras.items() if k in RECORDED_EXTRAS}
        return TurnResult(r.token_ids, r.text, s.prefill_seconds, s.decode_seconds, s.rounds, s.drafted,
                          s.accepted, extras)


def _model_path(spec: str) -> Path:
    from selfspec.models.loading import model_path

    return model_path(spec)[0]


def _tokenizer(path: Path):
    from selfspec.models.loading import tokenizer_at

    return tokenizer_at(path)


class HFRunner(Runner):
    """transformers `generate` on the same weights (its GGUF reader dequantises to the same floats),
    greedy or with prompt lookup (`prompt_lookup_num_tokens`)."""

    def __init__(self, spec: MethodSpec, settings: BenchSettings) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from selfspec.hardware import set_threads

        set_threads(settings.threads or None)
        t0 = time.perf_counter()
        path = _model_path(settings.model)
        dtype = {"bf16": torch.bfloat16}.get(spec.options.get("dtype", settings.dtype), torch.float32)
        kw = dict(dtype=dtype)
        if path.is_dir():
            self.hf = AutoModelForCausalLM.from_pretrained(str(path), **kw)
        else:
            self.hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kw)
        self.hf.eval()
        from selfspec.hardware import resolve_device

        self.device = resolve_device(settings.device)
        self.hf.to(self.device)
        self.tokenizer = _tokenizer(path)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) if settings.chat is None else settings.chat
        self.lookup = spec.kind == "hf-lookup"
        self.load_seconds = time.perf_counter() - t0

    def generate(self, prompt_ids, settings):
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):  # first put() is the prompt, the next one the first new token
            def __init__(self):
                self.calls, self.first = 0, None

            def put(self, value):
                self.calls += 1
                if self.calls == 2:
                    self.first = time.perf_counter()

            def end(self):
                pass

        kw = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id or 0)
        if settings.temperature > 0:
            kw.update(do_sample=True, temperature=settings.temperature, top_k=settings.top_k or None,
                      top_p=settings.top_p, min_p=settings.min_p or None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if settings.repetition_penalty != 1.0:
            kw["repetition_penalty"] = settings.repetition_penalty
        if self.lookup:
            kw["prompt_lookup_num_tokens"] = 10
        clock = Clock()
        x = torch.tensor([prompt_ids], device=self.device)
        t0 = time.perf_counter()
        seeded = kw.get("do_sample") and settings.seed is not None
        # HF samples from the global generator: seed it in a fork, leaving the process's own alone
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [],
                                   enabled=bool(seeded)), torch.inference_mode():
            if seeded:
                torch.manual_seed(settings.seed)
            out = self.hf.generate(x, attention_mask=torch.ones_like(x), streamer=clock, **kw)
        t1 = time.perf_counter()
        ids = out[0, len(prompt_ids):].tolist()
        eos = self.hf.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        while ids and ids[-1] in eos:
            ids.pop()
        first = clock.first or t1
        return TurnResult(ids, self.tokenizer.decode(ids, skip_special_tokens=True), first - t0, t1 - first)


class LlamaCppRunner(Runner):
    """llama-cpp-python on the same GGUF, plain or with its prompt-lookup drafter."""

    def __init__(self, spec: MethodSpec, settings: BenchSettings) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise Unavailable("llama-cpp-python is not installed (make extras)", "not installed") from None
        path = _model_path(settings.model)
        if path.is_dir():
            raise Unavailable("llama.cpp needs a GGUF file; the model is a Hugging Face folder")
        t0 = time.perf_counter()
        draft = None
        if spec.kind == "llama-cpp-lookup":
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=10)
        threads = settings.threads or os.cpu_count()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=settings.ctx_size or 4096, n_threads=threads,
                                   n_threads_batch=threads, draft_model=draft, verbose=False)
        self.tokenizer = _tokenizer(path)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) if settings.chat is None else settings.chat
        self.stop = {self.llm.token_eos(), getattr(self.tokenizer, "eos_token_id", None)} - {None}
        self.load_seconds = time.perf_counter() - t0
        from selfspec.bench.extras import build_info
        from selfspec.hardware import isa

        system = llama_cpp.llama_print_system_info()
        self.info = {"engine": "llama-cpp-python", "version": getattr(llama_cpp, "__version__", None),
                     "machine_isa": isa(), "build": build_info(),  # None: not built by `make extras` here
                     "system_info": system.decode() if isinstance(system, bytes) else str(system)}

    def generate(self, prompt_ids, settings):
        kw = dict(temp=settings.temperature, top_k=settings.top_k if settings.temperature > 0 else 1,
                  top_p=settings.top_p, min_p=settings.min_p, repeat_penalty=settings.repetition_penalty)
        if settings.seed is not None:
            self.llm.set_seed(settings.seed)
        ids, first = [], None
        t0 = time.perf_counter()
        for tok in self.llm.generate(prompt_ids, reset=True, **kw):
            if first is None:
                first = time.perf_counter()
            if tok in self.stop:
                break
            ids.append(tok)
            if len(ids) >= settings.max_new_tokens:
                break
        t1 = time.perf_counter()
        first = first or t1
        return TurnResult(ids, self.tokenizer.decode(ids, skip_special_tokens=True), first - t0, t1 - first)


OV_GGUF_ARCHS = ("llama", "qwen2", "qwen3")  # what OpenVINO GenAI's GGUF reader converts (2026.4)


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` of a GGUF file: read from the header (it is the first key in files
    written by llama.cpp's tools), else through gguf's full reader."""
    import struct

    try:
        with open(path, "rb") as f:
            magic, _version, _n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
            if magic == b"GGUF" and n_kv:
                (n,) = struct.unpack("<Q", f.read(8))
                key = f.read(n).decode("utf-8", "replace")
                (vtype,) = struct.unpack("<I", f.read(4))
                if key == "general.architecture" and vtype == 8:  # 8 = string
                    (n,) = struct.unpack("<Q", f.read(8))
                    return f.read(n).decode("utf-8", "replace")
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("general.architecture")
        return field.contents() if field is not None else None
    except (OSError, struct.error, ValueError):
        return None


def ov_model_dir(gguf: Path) -> Path:
    """An OpenVINO IR folder of a GGUF file, written once by OpenVINO GenAI's own GGUF reader
    (`enable_save_ov_model`) into the cache folder (`openvino/`), in a separate process so that
    the conversion's memory does not count in the method's peak RSS. Every openvino method loads
    this same converted model (its draft_model() reads IR folders only)."""
    import hashlib
    import shutil
    import tempfile

    import openvino_genai as og

    from selfspec.paths import cache_dir

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()};{st.st_size};{st.st_mtime_ns};{og.__version__}".encode()).hexdigest()[:12]
    out = cache_dir() / "openvino" / f"{gguf.stem}-{key}"
    if (out / "openvino_model.xml").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        (tmp / "model.gguf").symlink_to(gguf.resolve())
        code = ("import sys, openvino_genai as og; "
                "og.LLMPipeline(sys.argv[1], 'CPU', enable_save_ov_model=True)")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp / "model.gguf")], capture_output=True, text=True)
        if proc.returncode != 0 or not (tmp / "openvino_model.xml").is_file():
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Check")]
            reason = next((ln for ln in reversed(lines) if "Error" in ln or "failed" in ln), lines[-1] if lines else "?")
            raise Unavailable(f"OpenVINO GenAI could not read {gguf.name}: {reason}", "not supported")
        (tmp / "model.gguf").unlink()
        try:
            tmp.rename(out)
        except OSError:  # another process converted it first
            pass
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OpenVINORunner(Runner):
    """OpenVINO GenAI's `LLMPipeline` reading the same GGUF, fed the same prompt token ids (an
    `ov.Tensor`; the chat template is applied once, by us), greedy or sampled with its own
    sampler. `openvino-lookup` is its prompt-lookup decoding (10 tokens a draft, n-grams up to 3),
    `openvino-spec:draft=ALIAS` its draft-model speculative decoding. `precision=f32|bf16|f16`
    sets its inference precision hint and KV cache precision (default: its own choice, bf16
    compute with a u8 KV cache on CPUs with AVX-512 BF16/AMX). Token times come from its
    streamer: prefill is until the first token, decode from the first to the last."""

    LOOKUP_TOKENS, LOOKUP_NGRAM = 10, 3

    def __init__(self, spec: MethodSpec, settings: BenchSettings) -> None:
        try:
            import openvino_genai as og
        except ImportError:
            raise Unavailable("openvino-genai is not installed (make extras)", "not installed") from None
        self.og = og
        path = _model_path(settings.model)
        if path.is_dir():
            raise Unavailable("OpenVINO GenAI reads a GGUF file (or an exported OpenVINO IR folder); "
                              "the model is a Hugging Face folder", "not supported")
        arch = gguf_architecture(path)
        if arch not in OV_GGUF_ARCHS:
            raise Unavailable(f"OpenVINO GenAI's GGUF reader does not read architecture {arch!r} "
                              f"(it reads {', '.join(OV_GGUF_ARCHS)})", "not supported")
        if settings.temperature > 0 and settings.min_p > 0:
            raise Unavailable("OpenVINO GenAI has no min-p sampling", "not supported")
        props: dict = {}
        if settings.threads:
            props["INFERENCE_NUM_THREADS"] = settings.threads
        if precision := spec.options.get("precision"):
            props.update(INFERENCE_PRECISION_HINT=precision, KV_CACHE_PRECISION=precision)
        self.kind = spec.kind
        t0 = time.perf_counter()
        kw = dict(props)
        ir = ov_model_dir(path)  # its own GGUF reader's model, converted once and cached
        if spec.kind == "openvino-lookup":
            kw["prompt_lookup"] = True
        elif spec.kind == "openvino-spec":  # draft_model() opens an IR folder only: convert the draft too
            draft = _model_path(spec.options["draft_model"])
            if not draft.is_dir() and gguf_architecture(draft) not in OV_GGUF_ARCHS:
                raise Unavailable(f"OpenVINO GenAI's GGUF reader does not read the draft {draft.name}", "not supported")
            kw["draft_model"] = og.draft_model(str(draft if draft.is_dir() else ov_model_dir(draft)), "CPU", **props)
        self.pipe = og.LLMPipeline(str(ir), "CPU", **kw)
        self.tokenizer = _tokenizer(path)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) if settings.chat is None else settings.chat
        self.eos = {getattr(self.tokenizer, "eos_token_id", None)} - {None}
        self.load_seconds = time.perf_counter() - t0
        import openvino as ov

        from selfspec.hardware import isa

        core = ov.Core()
        self.info = {"engine": "openvino-genai", "version": getattr(og, "__version__", None),
                     "openvino": ov.get_version(), "architecture": arch, "machine_isa": isa(),
                     "precision": precision or "default",
                     "inference_precision": _ov_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
                     "cpu_capabilities": [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]}

    def generate(self, prompt_ids, settings):
        import numpy as np
        import openvino as ov

        og = self.og
        cfg = og.GenerationConfig()
        cfg.max_new_tokens = settings.max_new_tokens
        if self.eos:  # with prompt lookup its pipeline forgets the GGUF's EOS: say it every time
            cfg.eos_token_id = min(self.eos)
            cfg.stop_token_ids = set(self.eos)
        if settings.temperature > 0:
            cfg.do_sample = True
            cfg.temperature = settings.temperature
            cfg.top_k = settings.top_k or 0
            cfg.top_p = settings.top_p
            if settings.seed is not None:
                cfg.rng_seed = settings.seed
        else:
            cfg.do_sample = False
        if settings.repetition_penalty != 1.0:
            cfg.repetition_penalty = settings.repetition_penalty
        if self.kind == "openvino-lookup":
            cfg.num_assistant_tokens = self.LOOKUP_TOKENS
            cfg.max_ngram_size = self.LOOKUP_NGRAM
        elif self.kind == "openvino-spec":
            cfg.num_assistant_tokens = 5
        times: list[float] = []
        ids: list[int] = []

        class Clock(og.StreamerBase):  # write() gets each new token (or several, after a verify)
            def write(self, token):
                times.append(time.perf_counter())
                ids.extend(token if isinstance(token, list) else [token])
                return og.StreamingStatus.RUNNING

            def end(self):
                pass

        x = ov.Tensor(np.array([prompt_ids], dtype=np.int64))
        t0 = time.perf_counter()
        out = self.pipe.generate(x, cfg, Clock())
        t1 = time.perf_counter()
        result = [int(t) for t in out.tokens[0]] if getattr(out, "tokens", None) else ids
        while result and result[-1] in self.eos:
            result.pop()
        first, last = (times[0], times[-1]) if times else (t1, t1)
        # a speculative pipeline's streamer gets each verify step's accepted tokens at once: its
        # calls stand in for rounds (τ); plain decoding has no rounds to count
        return TurnResult(result, self.tokenizer.decode(result, skip_special_tokens=True), first - t0,
                          max(last - first, 1e-9), rounds=len(times) if self.kind != "openvino" else 0)


def _ov_name(value) -> str:
    return value.to_string() if hasattr(value, "to_string") else str(value)


class OpenAIRunner(Runner):
    """Any OpenAI-compatible server that is already running (llama-server, vLLM, Ollama, OpenVINO
    Model Server, another `selfspec serve`), measured through streaming chat completions: the
    prompt goes as chat messages (the server applies its own template), prefill_seconds is the
    time to the first content chunk, decode the first to the last content chunk. The answer's
    tokens are the server's `usage.completion_tokens` when it reports them, else the text
    re-tokenised with the model's tokenizer; the text is compared with ours."""

    def __init__(self, spec: MethodSpec, settings: BenchSettings) -> None:
        self.url = spec.options["url"].rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model = spec.options.get("model") or settings.model
        self.key = None
        if var := spec.options.get("key_env"):
            self.key = os.environ.get(var)
            if not self.key:
                raise Unavailable(f"environment variable {var} (key_env) is not set", "unavailable")
        try:
            self.tokenizer = _tokenizer(_model_path(settings.model))
        except Exception:  # a model name only the server knows: no local tokenizer to count with
            self.tokenizer = None
        self.chat = True

    def _post(self, body: dict):
        import urllib.request

        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        return urllib.request.urlopen(req, timeout=600)

    def turn(self, turns, answers, settings):
        import urllib.error

        messages = []
        for i, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        body = {"model": self.model, "messages": messages, "stream": True, "max_tokens": settings.max_new_tokens,
                "temperature": settings.temperature, "top_p": settings.top_p,
                "stream_options": {"include_usage": True}}
        if settings.seed is not None:
            body["seed"] = settings.seed
        pieces, times, usage = [], [], None
        t0 = time.perf_counter()
        try:
            with self._post(body) as resp:
                for raw in resp:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            times.append(time.perf_counter())
                            pieces.append(content)
        except urllib.error.HTTPError as e:
            raise SelfspecError(f"{self.url} answered {e.code}: {e.read()[:300].decode('utf-8', 'replace')}") from None
        except (urllib.error.URLError, OSError) as e:
            raise SelfspecError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None
        t1 = time.perf_counter()
        text = "".join(pieces)
        ids = list(self.tokenizer(text, add_special_tokens=False).input_ids) if self.tokenizer else []
        n = (usage or {}).get("completion_tokens") or len(ids) or len(pieces)
        prompt_tokens = (usage or {}).get("prompt_tokens") or 0
        first, last = (times[0], times[-1]) if times else (t1, t1)
        return prompt_tokens, TurnResult(ids, text, first - t0, max(last - first, 1e-9), new_tokens=n,
                                         extras={"chunks": len(times)})

    def generate(self, prompt_ids, settings):  # the server is fed text: see turn()
        raise NotImplementedError


class Unavailable(Exception):
    """An optional engine that is not installed or cannot run this model: reported, not failed."""

    def __init__(self, reason: str, status: str = "unavailable") -> None:
        super().__init__(reason)
        self.status = status


def make_runner(spec: MethodSpec, settings: BenchSettings, model=None) -> Runner:
    if spec.kind in ("hf", "hf-lookup"):
        return HFRunner(spec, settings)
    if spec.kind in ("llama-cpp", "llama-cpp-lookup"):
        return LlamaCppRunner(spec, settings)
    if spec.kind in ("openvino", "openvino-lookup", "openvino-spec"):
        return OpenVINORunner(spec, settings)
    if spec.kind == "openai":
        return OpenAIRunner(spec, settings)
    return OursRunner(spec, settings, model=model)


# ---------------------------------------------------------------------------------------- worker
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_method(spec: MethodSpec, settings: BenchSettings, prompts: list[Prompt],
               emit: Callable[[dict], None], runner_factory: Callable | None = None) -> None:
    """Load one method, warm it up, run every prompt x repeat; report through `emit`."""
    try:
        runner = (runner_factory or make_runner)(spec, settings)
    except Unavailable as e:
        emit({"event": "unavailable", "reason": str(e), "status": e.status})
        return
    emit({"event": "loaded", "load_seconds": runner.load_seconds, "engine": runner.info})
    if settings.warmup:  # first forward passes pay one-off kernel and allocator set-up
        runner.warm_up(settings)
    for prompt in prompts:
        for repeat in range(settings.repeats):
            run = runner.run(prompt, settings)
            run.update(method=spec.text, repeat=repeat, peak_rss_mb=peak_rss_mb())
            emit({"event": "run", "run": run})
    emit({"event": "done", "peak_rss_mb": peak_rss_mb()})


def _worker_main() -> None:
    """`python -m selfspec.bench.run` reads one job (JSON) on stdin and prints events on stdout."""
    from selfspec.hardware import set_threads

    job = json.loads(sys.stdin.read())
    settings = BenchSettings(**job["settings"])
    prompts = [Prompt(p["id"], p["category"], tuple(p["turns"])) for p in job["prompts"]]
    out = sys.stdout

    def emit(event: dict) -> None:
        out.write(EVENT + json.dumps(event) + "\n")
        out.flush()

    try:
        set_threads(settings.threads or None)  # this worker process's own threads
        run_method(parse_method(job["method"]), settings, prompts, emit)
    except SelfspecError as e:
        emit({"event": "error", "message": str(e)})
    except Exception as e:  # a method that crashes must not take the benchmark down
        import traceback

        traceback.print_exc()
        emit({"event": "error", "message": f"{type(e).__name__}: {e}"})


# ---------------------------------------------------------------------------------------- parent
def _subprocess_events(spec: MethodSpec, settings: BenchSettings, prompts: list[Prompt],
                       log: Path) -> Iterable[dict]:
    job = {"method": spec.text, "settings": asdict(settings),
           "prompts": [{"id": p.id, "category": p.category, "turns": list(p.turns)} for p in prompts]}
    with open(log, "a") as err:
        proc = subprocess.Popen([sys.executable, "-m", "selfspec.bench.run"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        try:
            for line in proc.stdout:
                if line.startswith(EVENT):
                    yield json.loads(line[len(EVENT):])
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if proc.returncode not in (0, None):
        yield {"event": "error", "message": f"worker exited with status {proc.returncode}; see {log}"}


def run_bench(settings: BenchSettings, out_dir: Path, *, isolate: bool = True,
              extra_methods: dict[str, Callable] | None = None, progress: bool = True,
              command: str | None = None) -> dict:
    """Run the benchmark and write results.json, report.md and charts into `out_dir`.

    `isolate=False` runs every method in this process (tests; peak RSS is then the process's).
    `extra_methods` maps a method label to `factory(spec, settings) -> Runner` (tests)."""
    extra_methods = extra_methods or {}
    labels = list(settings.methods)
    settings.methods = [m for m in labels if m not in extra_methods]
    specs = settings.check()
    specs += [MethodSpec(text=m, kind="none") for m in labels if m in extra_methods]
    specs.sort(key=lambda s: labels.index(s.text))
    if not any(s.kind == "none" and not s.options for s in specs):
        specs.insert(0, parse_method("none"))  # the baseline every ratio is against
    else:  # the baseline runs first: it is what the others are compared with
        base = next(s for s in specs if s.kind == "none" and not s.options)
        specs.remove(base)
        specs.insert(0, base)
    settings.methods = [s.text for s in specs]
    prompts = limit_prompts(load_suite(settings.suite), settings.limit)
    out_dir = Path(out_dir)
    _prepare_out(out_dir)
    if settings.threads is None:
        import torch

        settings.threads = torch.get_num_threads()
    from selfspec.hardware import device_info, resolve_device
    from selfspec.hardware import cpu_info

    device = resolve_device(settings.device)  # `cuda` without a GPU fails here, before any worker
    settings.device = str(device)
    machine = {**cpu_info(), "threads": settings.threads, **device_info(device)}
    log = out_dir / "workers.log"
    log.write_text("")
    runs, methods = [], []
    bar = Bar("bench", len(specs) * len(prompts) * settings.repeats, enabled=progress)
    with bar:
        for spec in specs:
            bar.update(label=f"{spec.text} · loading")
            status = {"method": spec.text, "kind": spec.kind, "status": "ok", "reason": None,
                      "load_seconds": None, "peak_rss_mb": None}
            if spec.text in extra_methods:
                events = _inprocess_events(spec, settings, prompts, extra_methods[spec.text])
            elif isolate:
                events = _subprocess_events(spec, settings, prompts, log)
            else:
                events = _inprocess_events(spec, settings, prompts, None)
            done = 0
            for ev in events:
                kind = ev["event"]
                if kind == "loaded":
                    status["load_seconds"] = ev["load_seconds"]
                    if ev.get("engine"):
                        status["engine"] = ev["engine"]
                elif kind == "run":
                    runs.append(ev["run"])
                    done += 1
                    bar.update(1, label=f"{spec.text} · {ev['run']['prompt_id']}")
                elif kind == "done":
                    status["peak_rss_mb"] = ev["peak_rss_mb"]
                elif kind == "unavailable":
                    status.update(status=ev.get("status", "unavailable"), reason=ev["reason"])
                elif kind == "error":
                    status.update(status="failed", reason=ev["message"])
            bar.advance(len(prompts) * settings.repeats - done)
            methods.append(status)
    _mark_same_as_plain(runs, specs, settings)
    results = {"command": command, "machine": machine, "settings": {**asdict(settings), "prompts": len(prompts)},
               "methods": methods, "runs": runs}
    atomic_write_json(out_dir / "results.json", results)
    from selfspec.bench.report import write_report

    write_report(results, out_dir)
    return results


def _inprocess_events(spec, settings, prompts, factory) -> list[dict]:
    events: list[dict] = []
    try:
        run_method(spec, settings, prompts, events.append, runner_factory=factory)
    except SelfspecError as e:
        events.append({"event": "error", "message": str(e)})
    return events


def _prepare_out(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InvalidParameterError(f"cannot write to --out {out_dir}: {e.strerror}") from None


def _own_plain_key(spec: MethodSpec, settings: BenchSettings) -> tuple:
    """Which plain run a method's output must equal: ours (`none`) at the same dtype for our
    drafters, the same engine's plain method with the same options for a peer's speculation."""
    from selfspec.drafters.factory import ENGINES, OWN_PLAIN

    if spec.kind in ENGINES:
        opts = {k: v for k, v in spec.options.items() if k != "draft_model"}
        return (OWN_PLAIN.get(spec.kind, spec.kind), tuple(sorted(opts.items())))
    return ("none", (("dtype", spec.options.get("dtype", settings.dtype)),))


def _mark_same_as_plain(runs: list[dict], specs: list[MethodSpec], settings: BenchSettings) -> None:
    """Greedy output of each method vs our plain decoding at the same dtype (`same_as_plain`) and
    vs its own engine's plain run with the same options (`same_as_own_plain`), at the same prompt
    and repeat 0. A server's answer (`openai`) is compared as text. Under sampling there is
    nothing to compare token by token: None; so is a comparison whose plain run is missing."""
    by_label = {s.text: s for s in specs}
    plain: dict[tuple[str, str], dict] = {}
    own: dict[tuple, dict] = {}
    for r in runs:
        spec = by_label[r["method"]]
        if r["repeat"] != 0:
            continue
        if spec.kind == "none":
            plain.setdefault((spec.options.get("dtype", settings.dtype), r["prompt_id"]), r)
        if spec.kind == "none" or spec.kind in ("hf", "llama-cpp", "openvino", "openai"):
            own.setdefault((_own_plain_key(spec, settings), r["prompt_id"]), r)

    def same(r: dict, ref: dict | None):
        if settings.temperature > 0 or ref is None:
            return None
        if "openai" in (by_label[r["method"]].kind, by_label[ref["method"]].kind):
            return r.get("text") == ref.get("text")
        return r["token_ids"] == ref["token_ids"]

    for r in runs:
        spec = by_label[r["method"]]
        r["same_as_plain"] = same(r, plain.get((spec.options.get("dtype", settings.dtype), r["prompt_id"])))
        r["same_as_own_plain"] = same(r, own.get((_own_plain_key(spec, settings), r["prompt_id"])))


if __name__ == "__main__":
    _worker_main()
