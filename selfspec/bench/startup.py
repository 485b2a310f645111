"""`selfspec bench --startup`: the two waits users feel besides decode speed.

1. Load time, cold vs warm. Each load runs in a fresh process (`python -m selfspec.bench.startup`):
   cold with this model's weight-cache entries deleted first (the process dequantises, builds and
   writes the entry), warm with the entry present (it reads it). The model file itself is in the
   OS page cache both times: cold means "no weight cache", not "cold disk". Reported: the
   process's wall time until the model is ready (Python start, imports, load), `load_seconds`
   of `load_model`, and its breakdown (weights, then the tokenizer, and which tokenizer it was:
   "light" or "transformers", selfspec/models/light_tokenizer.py).
2. Time to first token of turn N (default 5) of a multi-turn chat, with and without prompt-prefix
   reuse: turns 1..N-1 run as a chat session does (greedy, the model's own answers), then turn N's
   time from its message to its first streamed token, once with the session's KV (only the new
   message is processed) and once cold (the whole conversation is processed). Both turn-N outputs
   must be identical.

Writes DIR/startup.json and DIR/startup.md.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from selfspec.errors import InvalidParameterError, SelfspecError
from selfspec.paths import atomic_write_json, atomic_write_text

EVENT = "@@selfspec-startup "
# A conversation whose turns build on each other, as a chat does (N <= 8).
CONVERSATION = (
    "I am planning a weekend trip to a city by the sea. What should I pack?",
    "Now shorten that list to the five most important items.",
    "Which of those five items could I buy at the destination instead?",
    "Suggest a plan for Saturday, from breakfast to dinner.",
    "Rewrite the Saturday plan for a rainy day.",
    "What would you change for travelling with a small child?",
    "Summarise the whole trip plan in three sentences.",
    "Give the trip a short, catchy title.",
)


@dataclass
class StartupSettings:
    model: str = "smollm2-135m"
    dtype: str = "auto"
    threads: int | None = None
    ctx_size: int | None = None
    max_new_tokens: int = 64  # per answer
    repeats: int = 3  # warm loads, and runs of the conversation
    turn: int = 5

    def check(self) -> None:
        for name in ("max_new_tokens", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidParameterError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if not 2 <= self.turn <= len(CONVERSATION):
            raise InvalidParameterError(f"the measured turn must be in 2..{len(CONVERSATION)}, got {self.turn}")


# ------------------------------------------------------------------------------- one fresh process
def _child(job: dict) -> dict:
    """In a fresh process: load the model and report; with `"ttft": true`, then time turn N."""
    t_start = time.time()
    from selfspec.models.loading import load_model

    s = StartupSettings(**job["settings"])
    model = load_model(s.model, dtype=s.dtype, ctx_size=s.ctx_size, threads=s.threads)
    ready = time.time()
    out = {"ready_at": ready, "in_process_seconds": ready - t_start, "load_seconds": model.load_seconds,
           **model.load_info, "kernel": model.kernel, "dtype": model.dtype}
    if job.get("ttft"):
        out["ttft"] = measure_ttft(model, s)
    return out


def measure_ttft(model, s: StartupSettings) -> dict:
    """Turn `s.turn` of CONVERSATION: time to first token with the session's KV, then cold."""
    from selfspec.chat import ChatSession
    from selfspec.generation import stream

    for _ in stream(model, model.encode("Say hello."), max_new_tokens=4):  # one-off kernel set-up
        pass
    warm_runs, cold_runs = [], []
    for _ in range(s.repeats):
        session = ChatSession(model, None, max_new_tokens=s.max_new_tokens)
        for message in CONVERSATION[: s.turn - 1]:
            for _ in session.ask(message):
                pass
        message = CONVERSATION[s.turn - 1]
        # Warm first: a generation without the session's prefix cache resets the model's cache.
        warm = _first_token(model, lambda: session.prompt_ids(message), s, session.prefix)
        cold = _first_token(model, lambda: session.prompt_ids(message), s, None)
        warm["same_output"] = warm.pop("ids") == cold.pop("ids")
        warm_runs.append(warm)
        cold_runs.append(cold)
    w = statistics.median(r["ttft_seconds"] for r in warm_runs)
    c = statistics.median(r["ttft_seconds"] for r in cold_runs)
    return {"turn": s.turn, "warm": warm_runs, "cold": cold_runs, "warm_ttft_seconds": w, "cold_ttft_seconds": c,
            "speedup": c / w if w > 0 else None, "same_output": all(r["same_output"] for r in warm_runs)}


def _first_token(model, make_ids, s: StartupSettings, prefix) -> dict:
    """Seconds from the message (rendering and tokenising the conversation included) to the first
    streamed token, and the turn's token ids."""
    from selfspec.generation import stream

    t0 = time.perf_counter()
    ids = make_ids()
    gen = stream(model, ids, max_new_tokens=s.max_new_tokens, prefix=prefix)
    chunks = iter(gen)
    out = list(next(chunks).token_ids)
    ttft = time.perf_counter() - t0
    for chunk in chunks:
        out += chunk.token_ids
    x = gen.stats.extras
    return {"ttft_seconds": ttft, "prefill_seconds": gen.stats.prefill_seconds, "prompt_tokens": len(ids),
            "cached_prompt_tokens": x["cached_prompt_tokens"], "prefill_tokens": x["prefill_tokens"], "ids": out}


def _child_main() -> None:
    job = json.loads(sys.stdin.read())
    result = _child(job)
    sys.stdout.write(EVENT + json.dumps(result) + "\n")
    sys.stdout.flush()


def _fresh(settings: StartupSettings, ttft: bool = False, log: Path | None = None) -> dict:
    job = {"settings": asdict(settings), "ttft": ttft}
    t0 = time.time()
    err = open(log, "a") if log else subprocess.DEVNULL
    try:
        proc = subprocess.run([sys.executable, "-m", "selfspec.bench.startup"], input=json.dumps(job),
                              stdout=subprocess.PIPE, stderr=err, text=True)
    finally:
        if log:
            err.close()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(EVENT)]
    if proc.returncode != 0 or not lines:
        raise SelfspecError(f"the start-up worker failed (exit status {proc.returncode}); see {log}")
    out = json.loads(lines[-1][len(EVENT):])
    out["process_seconds"] = out.pop("ready_at") - t0
    return out


# ---------------------------------------------------------------------------------------- parent
def clear_weight_cache(settings: StartupSettings) -> int:
    """Delete this model's weight-cache entries of this dtype; returns how many."""
    from selfspec.hardware import resolve_dtype
    from selfspec.paths import cache_dir
    from selfspec.models.loading import model_path
    from selfspec.models.registry import model_identity
    from selfspec.models.weightcache import FOLDER

    path = model_path(settings.model)[0]
    dtype = resolve_dtype(settings.dtype)[1]
    n = 0
    for entry in (cache_dir() / FOLDER).glob(f"{model_identity(path)[:16]}-{dtype}-*"):
        shutil.rmtree(entry, ignore_errors=True)
        n += 1
    return n


def run_startup(settings: StartupSettings, out_dir: Path, command: str | None = None,
                progress=lambda msg: None) -> dict:
    settings.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "startup-workers.log"
    log.write_text("")
    from selfspec.hardware import cpu_info

    progress("cold load (weight cache emptied) ...")
    clear_weight_cache(settings)
    cold = _fresh(settings, log=log)
    warm = []
    for i in range(settings.repeats):
        progress(f"warm load {i + 1}/{settings.repeats} ...")
        warm.append(_fresh(settings, ttft=(i == settings.repeats - 1), log=log))
    ttft = warm[-1].pop("ttft")
    results = {"command": command, "machine": {**cpu_info(), "threads": settings.threads or cpu_info()["threads"]},
               "settings": asdict(settings), "cold_load": cold, "warm_loads": warm,
               "warm_load_seconds": statistics.median(w["load_seconds"] for w in warm),
               "warm_process_seconds": statistics.median(w["process_seconds"] for w in warm),
               "ttft": ttft}
    atomic_write_json(out_dir / "startup.json", results)
    atomic_write_text(out_dir / "startup.md", report(results))
    return results


def report(r: dict) -> str:
    s, c, ttft = r["settings"], r["cold_load"], r["ttft"]
    w = min(r["warm_loads"], key=lambda x: x["load_seconds"])
    med = r["warm_load_seconds"]

    def row(name, x):
        return (f"| {name} | {x['process_seconds']:.2f} | {x['load_seconds']:.2f} | {x['weights_seconds']:.2f} | "
                f"{x['tokenizer_seconds']:.2f} ({x.get('tokenizer', 'transformers')}) | {x['weight_cache']} |")

    lines = [f"## Start-up: {s['model']} ({c['dtype']}, {c['kernel']})", "",
             "| load | process start to ready, s | load_model, s | weights, s | tokenizer, s | weight cache |",
             "|---|---|---|---|---|---|", row("cold", c), row(f"warm (fastest of {len(r['warm_loads'])})", w), "",
             f"Warm `load_model` median {med:.2f} s; cold/warm {c['load_seconds'] / med:.1f}x.", "",
             f"Turn {ttft['turn']} of a chat ({ttft['cold'][0]['prompt_tokens']} prompt tokens, "
             f"{s['max_new_tokens']} tokens per answer), time to first token, median of {len(ttft['warm'])}:", "",
             "| | time to first token, s | prompt tokens processed |", "|---|---|---|",
             f"| without prefix reuse | {ttft['cold_ttft_seconds']:.3f} | {ttft['cold'][0]['prompt_tokens']} |",
             f"| with prefix reuse | {ttft['warm_ttft_seconds']:.3f} | {ttft['warm'][0]['prefill_tokens']} |", "",
             f"Speedup {ttft['speedup']:.1f}x; output identical: {ttft['same_output']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    _child_main()


def summary(r: dict) -> dict:
    """The headline numbers of `run_startup`'s results (`selfspec bench --startup --json`)."""
    t = r["ttft"]
    return {"cold_load_seconds": r["cold_load"]["load_seconds"], "warm_load_seconds": r["warm_load_seconds"],
            "ttft_cold_seconds": t["cold_ttft_seconds"], "ttft_warm_seconds": t["warm_ttft_seconds"],
            "ttft_speedup": t["speedup"], "same_output": t["same_output"]}
