"""`selfspec bench`: methods against our plain decoding on a prompt suite, or --startup."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfspec.cli.options import MODEL, PROMPTS, SAMPLING, Json, command
from selfspec.drafters.factory import ALIASES, BENCH_DEFAULT, DRAFTS, ENGINES
from selfspec.models.registry import check_spec


@command(interrupted="interrupted")
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.json, report.md and the charts.")],
    model=MODEL,
    prompts=PROMPTS("suite", "max_new_tokens", "chat", max_new_tokens=64),
    methods: Annotated[str, typer.Option(help=f"Comma-separated methods: {', '.join(DRAFTS + ENGINES)} (aliases: "
                                              f"{', '.join(f'{a} = {b}' for a, b in ALIASES.items())}; peers need make extras: openvino-spec:draft=ALIAS, "
                                              "openai:url=URL[,model=NAME,key_env=VAR]); options as openvino:precision=f32, "
                                              "layer-skip:skip=F.json, model:draft=ALIAS, none:dtype=bf16, "
                                              "quantized:bits=4,skip=F.json, ngram:mode=adaptive, retrieval:store=DIR; "
                                              "trained drafters as medusa:weights=DIR (also early-exit, lite, hydra).")] = BENCH_DEFAULT,
    sampling=SAMPLING,
    repeats: Annotated[int, typer.Option(help="Runs per prompt; the median time counts.")] = 1,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N prompts of each category of the suite (a quick first try: --limit 1).")] = None,
    startup: Annotated[bool, typer.Option("--startup", help="Instead of methods on a suite: load time cold vs warm (weight cache emptied / present, fresh processes; --repeats warm loads, at least 3) and time to first token of turn 5 of a chat with and without prompt-prefix reuse (-n tokens per answer). Writes startup.json and startup.md.")] = False,
    as_json: Json = False,
) -> None:
    """Benchmark methods against our plain decoding on a prompt suite; every method in a fresh process."""
    if startup:
        del model.device  # --startup loads on the default device
        return _startup(out, prompts.max_new_tokens, repeats, as_json, **vars(model))
    from selfspec.bench.report import ALL, console_summary, summarise
    from selfspec.bench.run import BenchSettings, run_bench
    from selfspec.drafters.factory import parse_methods

    specs = parse_methods(methods)
    settings = BenchSettings(methods=[s.text for s in specs], repeats=repeats, limit=limit,
                             **vars(prompts), **vars(sampling), **vars(model))
    settings.check()
    check_spec(model.model)
    results = run_bench(settings, out, command="selfspec " + " ".join(sys.argv[1:]))
    print(console_summary(results) + f"\nreport: {Path(out) / 'report.md'}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        s = summarise(results)
        sys.stdout.write(json.dumps({"out": str(out), "summary": {m: s["table"][m].get(ALL) for m in s["methods"]
                                                                  if s["table"].get(m)},
                                     "methods": results["methods"]}) + "\n")


def _startup(out, max_new_tokens, repeats, as_json, *, model, dtype, threads, ctx_size) -> None:
    from selfspec.bench.startup import StartupSettings, run_startup, summary

    check_spec(model)
    settings = StartupSettings(model=model, dtype=dtype, threads=threads, ctx_size=ctx_size,
                               max_new_tokens=max_new_tokens, repeats=max(repeats, 3))
    results = run_startup(settings, out, command="selfspec " + " ".join(sys.argv[1:]),
                          progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    text = (Path(out) / "startup.md").read_text()
    print(text + f"report: {Path(out) / 'startup.md'}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        sys.stdout.write(json.dumps({"out": str(out), **summary(results)}) + "\n")
