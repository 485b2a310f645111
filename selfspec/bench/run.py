"""`selfspec bench`: Spec-Bench-style suites, every method against our plain decoding in the same run.

Each method runs in a fresh worker process (peak RSS per method: ru_maxrss never goes down), with
the same threads, a warm-up generation first, and every prompt x repeat timed around decoding only
(prefill is reported separately). Workers stream one event per line on stdout; the parent drives
the progress bar, collects the runs, compares each method's greedy output with plain decoding and
writes DIR/results.json, DIR/report.md and PNG charts.

Methods are `selfspec.drafters.factory` specs: our drafters (`none`, `layer-skip`, `ngram`, `model`, with
options such as `layer-skip:skip=F`) and other engines (`hf`, `hf-lookup`: transformers `generate`
greedy and with prompt lookup; `llama-cpp`, `llama-cpp-lookup`: llama-cpp-python on the same GGUF).
A missing optional engine is reported as "not installed", never as an error.
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


class Runner:
    """One method, loaded once: generates one turn from prompt token ids."""

    tokenizer = None
    chat = False
    load_seconds = 0.0

    def generate(self, prompt_ids: list[int], settings: BenchSettings) -> TurnResult:
        raise NotImplementedError

    def run(self, prompt: Prompt, settings: BenchSettings) -> dict:
        """All turns of a prompt: one run record of results.json (without method/repeat/rss)."""
        answers, ids, turns = [], [], []
        for i in range(len(prompt.turns)):
            prompt_ids = _encode(self.tokenizer, list(prompt.turns[: i + 1]), answers, self.chat)
            turn = self.generate(prompt_ids, settings)
            turns.append((len(prompt_ids), turn))
            answers.append(turn.text)
            ids.extend(turn.token_ids)
        new = len(ids)
        decode = sum(t.decode_seconds for _, t in turns)
        rounds = sum(t.rounds for _, t in turns)
        drafted = sum(t.drafted for _, t in turns)
        accepted = sum(t.accepted for _, t in turns)
        return {"category": prompt.category, "prompt_id": prompt.id, "prompt_tokens": turns[0][0],
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
        extras = {k: v for k, v in s.extras.items() if k in ("predicted_speedup", "realised_speedup")}
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
    emit({"event": "loaded", "load_seconds": runner.load_seconds})
    if settings.warmup:  # first forward passes pay one-off kernel and allocator set-up
        warm = BenchSettings(**{**asdict(settings), "max_new_tokens": min(8, settings.max_new_tokens)})
        runner.generate(_encode(runner.tokenizer, [WARMUP_PROMPT], [], runner.chat), warm)
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


def _mark_same_as_plain(runs: list[dict], specs: list[MethodSpec], settings: BenchSettings) -> None:
    """Greedy output of each method vs plain decoding at the same dtype, prompt and repeat 0.
    Under sampling there is nothing to compare token by token: None."""
    by_label = {s.text: s for s in specs}
    plain: dict[tuple[str, str], list[int]] = {}
    for r in runs:
        spec = by_label[r["method"]]
        if spec.kind == "none" and r["repeat"] == 0:
            plain.setdefault((spec.options.get("dtype", settings.dtype), r["prompt_id"]), r["token_ids"])
    for r in runs:
        spec = by_label[r["method"]]
        ref = plain.get((spec.options.get("dtype", settings.dtype), r["prompt_id"]))
        if settings.temperature > 0 or ref is None:
            r["same_as_plain"] = None
        else:
            r["same_as_plain"] = r["token_ids"] == ref


if __name__ == "__main__":
    _worker_main()
