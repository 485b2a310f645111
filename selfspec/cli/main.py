"""`selfspec` command line. User mistakes print one line, `error: ...`, and exit 2; never a traceback.
With --json, exactly one JSON object is printed on one line, the last line of stdout; streamed
text, progress and logs then go to stderr."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfspec.errors import SelfspecError
from selfspec.drafters.factory import BENCH_DEFAULT, DRAFTS, build_drafter, default_draft

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Lossless speculative decoding for local LLMs on CPU.")


# Options shared by every command that generates (CONVENTIONS.md: same flags everywhere).
Model_ = Annotated[str, typer.Option("--model", "-m", help="Registry alias (see `selfspec models`), .gguf file or HF folder.")]
Temperature = Annotated[float, typer.Option(help="0 = greedy.")]
TopK = Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 = off.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling, 0 < p <= 1.")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability; 0 = off.")]
RepPenalty = Annotated[float, typer.Option("--repetition-penalty", help="> 0; 1 = off.")]
Seed = Annotated[Optional[int], typer.Option(
    help="Makes a run reproducible for a given drafter. Under sampling, different drafters may give "
         "different (equally distributed) text for the same seed.")]
Dtype = Annotated[str, typer.Option(help="auto|fp32|bf16|int8|int4 (auto: fp32, the model at full precision, the same answer on every machine; bf16 and int8/int4 weight-only quantised linears change the output and are opt-in).")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads (default: PyTorch's choice).")]
CtxSize = Annotated[Optional[int], typer.Option("--ctx-size", help="KV cache length (default min(model context, 4096)).")]
Device = Annotated[str, typer.Option(help="auto|cpu|cuda (auto: CUDA when PyTorch sees a GPU, else the CPU; on CUDA --dtype auto is bf16 and int8/int4 are not available). See docs/gpu.md.")]
NgramMode = Annotated[str, typer.Option(help="ngram: lookup (prompt lookup: copy what followed the latest match) | adaptive (an n-gram model of prompt + output built online, confident matches only; docs/drafters-training-free.md).")]
Datastore_ = Annotated[Optional[str], typer.Option(help="Token datastore (`selfspec datastore build`) for --draft retrieval; with auto, an extra drafter.")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """List the embedded models."""
    from selfspec.paths import cache_dir
    from selfspec.models.registry import REGISTRY

    rows = []
    for e in REGISTRY.values():
        parts = e.part_paths()
        assembled = cache_dir() / "models" / e.file_name
        path = (str(parts[0]) if len(parts) == 1 else str(assembled) if assembled.is_file()
                else f"{len(parts)} parts, assembled on first use") if parts else "-"
        rows.append({"alias": e.alias, "arch": e.arch, "layers": e.n_layers, "params": e.params,
                     "installed": parts is not None, "path": path,
                     "install": None if parts else e.install_hint})
    if as_json:
        typer.echo(json.dumps({"models": rows}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("alias", "arch", "layers", "params", "installed", "file")
    for r in rows:
        table.add_row(r["alias"], r["arch"], str(r["layers"]), r["params"], "yes" if r["installed"] else "no",
                      r["path"] if r["installed"] else f"install: {r['install']}")
    Console().print(table)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        _fail("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            return prompt_file.read_text()
        except OSError as e:
            _fail(f"cannot read --prompt-file {prompt_file}: {e.strerror}")
    if prompt is not None:
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        _fail("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
    return sys.stdin.read()


@app.command()
def generate(
    model: Model_ = "smollm2-135m",
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text (else --prompt-file or stdin).")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from a file.")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Apply the model's chat template (default: when it has one).")] = None,
    system: Annotated[Optional[str], typer.Option(help="System message (none unless given).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 256,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string; repeat for several.")] = None,
    dtype: Dtype = "auto",
    threads: Threads = None,
    ctx_size: CtxSize = None,
    device: Device = "auto",
    draft: Annotated[Optional[str], typer.Option(help="auto|none|layer-skip|ngram|model|quantized|retrieval|early-exit|medusa|hydra (the last three: trained, need --drafter-weights). auto (the default) picks the drafter and draft length per round from costs measured on this machine, and decodes plainly when no drafter pays.")] = None,
    skip_config: Annotated[Optional[str], typer.Option("--skip-config", "--draft-skip-config", help="Skip-config JSON for --draft layer-skip (default: the shipped one) or quantized (default: skip nothing); `online` searches the skip set while generating (SWIFT; options as online:ratio=0.45:window=50, see docs/online-skip.md).")] = None,
    save_skip_config: Annotated[Optional[Path], typer.Option(help="After generating, write the layer-skip drafter's skip config here (with --skip-config online: the set found so far).")] = None,
    draft_bits: Annotated[Optional[int], typer.Option(help="--draft quantized (and auto's precision draft): 8 (int8 copy, +25% of fp32 weights) or 4 (int4, +12.5%; less memory, slightly lower agreement). Default 8.")] = None,
    max_draft: Annotated[Optional[int], typer.Option(help="Most draft tokens per round.")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="Initial draft-exit threshold (layer-skip).")] = None,
    alpha: Annotated[float, typer.Option(help="Target acceptance rate of the adaptive exit.")] = 0.9,
    epsilon: Annotated[float, typer.Option(help="Step of the adaptive exit.")] = 0.01,
    beta1: Annotated[float, typer.Option(help="Smoothing of the acceptance rate.")] = 0.5,
    beta2: Annotated[float, typer.Option(help="Smoothing of gamma.")] = 0.9,
    adaptive: Annotated[bool, typer.Option("--adaptive/--no-adaptive", help="Adapt gamma to the acceptance rate.")] = True,
    ngram_max: Annotated[Optional[int], typer.Option(help="Longest n-gram looked up (ngram; default 3 for lookup, 4 for adaptive).")] = None,
    ngram_min: Annotated[Optional[int], typer.Option(help="Shortest n-gram looked up (ngram; default 2).")] = None,
    ngram_mode: NgramMode = "lookup",
    tree: Annotated[Optional[int], typer.Option(help="Token-tree drafts (docs/tree-verification.md). ngram lookup: the continuations of the N most recent distinct matches; retrieval: the N most frequent continuation prefixes (trie nodes). 1 (default) = one chain.")] = None,
    datastore: Datastore_ = None,
    draft_model: Annotated[Optional[str], typer.Option(help="Draft model for --draft model (same tokenizer).")] = None,
    draft_vocab: Annotated[Optional[int], typer.Option(help="layer-skip: draft only from the context's tokens plus N frequent ones (cheaper draft LM head); 0 = all; default 32768 for vocabularies over 65536 tokens, else all.")] = None,
    drafter_weights: Annotated[Optional[Path], typer.Option(help="--draft early-exit|medusa|hydra: the folder `selfspec train-drafter --out` wrote.")] = None,
    compare: Annotated[bool, typer.Option(help="Also run plain decoding and report the speedup and whether the output is identical.")] = False,
    show_drafts: Annotated[bool, typer.Option("--show-drafts", help="Colour the streamed text: accepted draft tokens green, the target's own tokens magenta (underlined where a draft was rejected); then a summary line (tau, acceptance, speedup vs the cost model's estimate of plain decoding) on stderr. Colour only when stdout is a terminal; with --json or a pipe the text is plain and the JSON gets each token's origin.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="Experimental, GPU only: torch.compile the decode/draft/verify forward. On the CPU it runs eagerly (compiled CPU graphs are not row-invariant, so output could change; they were also slower).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (last line of stdout).")] = False,
) -> None:
    """Generate text, streaming it as it is decoded."""
    try:
        _generate(**locals())
    except SelfspecError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130)


def _generate(*, model, prompt, prompt_file, chat, system, max_new_tokens, temperature, top_k, top_p,
              min_p, repetition_penalty, seed, stop, dtype, threads, ctx_size, draft, skip_config,
              max_draft, gamma, alpha, epsilon, beta1, beta2, adaptive, ngram_max, ngram_min,
              draft_model, draft_vocab, compare, as_json, compile=False, draft_bits=None,
              show_drafts=False, save_skip_config=None, device="auto", tree=None, ngram_mode="lookup",
              datastore=None, drafter_weights=None) -> None:
    from selfspec.generation import stream
    from selfspec.models.loading import load_model
    from selfspec.sampling import SamplingParams

    text = _read_prompt(prompt, prompt_file)
    if not text.strip():
        raise SelfspecError("the prompt is empty; give some text")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    draft = draft or default_draft(model)
    if draft not in DRAFTS:
        raise SelfspecError(f"--draft must be one of {', '.join(DRAFTS)}, got {draft!r}")
    if datastore is not None and draft not in ("retrieval", "auto"):
        raise SelfspecError(f"--datastore is for --draft retrieval (or auto), not {draft!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SelfspecError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")
    out = sys.stderr if as_json else sys.stdout
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    m = load_model(model, dtype=dtype, ctx_size=ctx_size, threads=threads, compile=compile, device=device)
    if compile:
        print(f"--compile: {m.transformer.compile_status}", file=sys.stderr)
    from selfspec.generation import check_request

    # A prompt too long for the context is refused now, before a drafter is built (auto's cost
    # calibration takes minutes on a new context size).
    check_request(m, m.encode(text, chat=chat, system=system), max_new_tokens)
    drafter = build_drafter(draft, m, skip_config=skip_config, max_draft=max_draft, gamma=gamma, alpha=alpha,
                            epsilon=epsilon, beta1=beta1, beta2=beta2, adaptive=adaptive, ngram_max=ngram_max,
                            ngram_min=ngram_min, draft_model=draft_model, draft_vocab=draft_vocab,
                            dtype=dtype, threads=threads, draft_bits=draft_bits, ngram_mode=ngram_mode,
                            datastore=datastore, tree=tree, drafter_weights=drafter_weights)
    if save_skip_config is not None:
        _check_save_skip_config(drafter, save_skip_config)
    kwargs = dict(sampling=sampling, max_new_tokens=max_new_tokens, stop=stop or (), chat=chat, system=system)
    if compare:  # the first forward passes pay one-off kernel set-up; keep it out of both timings
        for _ in stream(m, text, max_new_tokens=2, chat=chat, system=system):
            pass
    gen = stream(m, text, drafter=drafter, **kwargs)
    painter = None
    if show_drafts:
        from selfspec import draftview as show

        colour = not as_json and out.isatty()  # never into a pipe or a file
        painter = show.TerminalPainter(out, show.DraftView(m.tokenizer), colour=colour)
    for chunk in gen:
        if painter is not None:
            painter.write(chunk)
            continue
        out.write(chunk.text)
        out.flush()
    out.write("\n")
    result = gen.result
    report = result.to_dict()
    line = _summary(result.stats)
    if painter is not None:
        painter.legend()
        step = show.plain_step_seconds(m, drafter)
        report["show_drafts"] = {"origins": painter.view.origins[: len(result.token_ids)],
                                 **show.estimate(result.stats, step)}
        drafts_line = show.summary_line(result.stats, step)
    if compare:
        plain = stream(m, text, drafter=None, **kwargs)
        for _ in plain:
            pass
        base = plain.result
        speedup = result.stats.tokens_per_s / base.stats.tokens_per_s if base.stats.tokens_per_s else 0.0
        same = base.token_ids == result.token_ids
        report["compare"] = {"plain_tokens_per_s": base.stats.tokens_per_s, "speedup": speedup,
                             "same_as_plain": same}
        line += f" | plain {base.stats.tokens_per_s:.1f} tok/s -> speedup {speedup:.2f}x, " + (
            "output identical to plain decoding" if same else "OUTPUT DIFFERS from plain decoding")
    print(line, file=sys.stderr)
    if painter is not None:
        print(drafts_line, file=sys.stderr)
    if save_skip_config is not None:
        drafter.config.save(save_skip_config)
        report["skip_config"] = str(save_skip_config)
        print(f"wrote the skip config to {save_skip_config}", file=sys.stderr)
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")


def _check_save_skip_config(drafter, path: Path) -> None:
    """Before generating: --save-skip-config needs a layer-skip drafter and a writable file."""
    from selfspec.drafters.layerskip import SkipConfig
    from selfspec.search.study import check_out

    if not isinstance(getattr(drafter, "config", None), SkipConfig) or drafter.name != "layer-skip":
        raise SelfspecError("--save-skip-config needs --draft layer-skip (e.g. with --skip-config online)")
    check_out(path, flag="--save-skip-config")


def _summary(s) -> str:
    parts = [f"{s.new_tokens} tokens", f"{s.tokens_per_s:.1f} tok/s (decode)", f"prefill {s.prefill_seconds:.2f}s",
             f"load {s.load_seconds:.1f}s", f"draft {s.drafter}", f"dtype {s.dtype}"]
    if s.drafter != "none":
        parts += [f"tau {s.mean_accepted_tokens:.2f}", f"accepted {100 * s.acceptance_rate:.0f}%"]
    if "compile_seconds" in s.extras:
        parts.append(f"compile {s.extras['compile_seconds']:.1f}s")
    return "[" + ", ".join(parts) + "]"


@app.command()
def chat(
    model: Model_ = "smollm2-135m",
    system: Annotated[Optional[str], typer.Option(help="System message (none unless given).")] = None,
    chat_template: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Use the model's chat template (default: when it has one; a model without one chats in raw text, continuing the conversation's text).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens per answer.")] = 512,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = None,
    dtype: Dtype = "auto",
    threads: Threads = None,
    ctx_size: CtxSize = None,
    device: Device = "auto",
    draft: Annotated[Optional[str], typer.Option(help="auto|none|layer-skip|ngram|model|quantized, as for generate (default: auto).")] = None,
    skip_config: Annotated[Optional[str], typer.Option("--skip-config", "--draft-skip-config", help="Skip-config JSON for --draft layer-skip or quantized.")] = None,
    draft_bits: Annotated[Optional[int], typer.Option(help="--draft quantized (and auto's precision draft): 8 or 4, as for generate.")] = None,
    max_draft: Annotated[Optional[int], typer.Option(help="Most draft tokens per round.")] = None,
    draft_model: Annotated[Optional[str], typer.Option(help="Draft model for --draft model (same tokenizer).")] = None,
) -> None:
    """Chat in the terminal: multi-turn, streamed; each turn processes only the new message (the
    conversation's KV is kept). /reset, /stats, /exit; Ctrl-D quits, Ctrl-C stops an answer."""
    from selfspec.cli import chat as chat_mod
    from selfspec.models.loading import load_model
    from selfspec.sampling import SamplingParams

    try:
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        draft = draft or default_draft(model)
        if draft not in DRAFTS:
            raise SelfspecError(f"--draft must be one of {', '.join(DRAFTS)}, got {draft!r}")
        if max_new_tokens < 1:
            raise SelfspecError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        print(f"loading {model} ...", file=sys.stderr, flush=True)
        m = load_model(model, dtype=dtype, ctx_size=ctx_size, threads=threads, device=device)
        drafter = build_drafter(draft, m, skip_config=skip_config, max_draft=max_draft, draft_model=draft_model,
                                dtype=dtype, threads=threads, draft_bits=draft_bits)
        session = chat_mod.ChatSession(m, drafter, sampling, max_new_tokens=max_new_tokens, system=system,
                                       chat=chat_template)
    except SelfspecError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130)
    raise typer.Exit(chat_mod.run(session))


@app.command()
def serve(
    model: Model_ = "smollm2-135m",
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="SELFSPEC_API_KEY", show_envvar=True,
                                                   help="Require 'Authorization: Bearer KEY' under /v1 (/health and /metrics stay open).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the one generation worker; more get 429.")] = 8,
    request_timeout: Annotated[float, typer.Option(help="Seconds from arrival to the last token, queueing included; then 504 (or an error event mid-stream).")] = 300.0,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes; more gets 413.")] = 1 << 20,
    prefix_cache_mb: Annotated[int, typer.Option(help="Memory for the KV of recent sequences: a request sharing a prompt prefix with one of them (a conversation's next turn, a common system prompt) processes only the rest. 0 = off.")] = 512,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = None,
    dtype: Dtype = "auto",
    threads: Threads = None,
    ctx_size: CtxSize = None,
    device: Device = "auto",
    draft: Annotated[Optional[str], typer.Option(help="auto|none|layer-skip|ngram|model|quantized|retrieval|early-exit|medusa|hydra (default: auto, which keeps learning this machine's costs and each drafter's acceptance across requests).")] = None,
    skip_config: Annotated[Optional[str], typer.Option("--skip-config", "--draft-skip-config", help="Skip-config JSON for --draft layer-skip (default: the shipped one) or quantized (default: skip nothing).")] = None,
    draft_bits: Annotated[Optional[int], typer.Option(help="--draft quantized (and auto's precision draft): 8 (int8 copy, +25% of fp32 weights) or 4 (int4, +12.5%; less memory, slightly lower agreement). Default 8.")] = None,
    max_draft: Annotated[Optional[int], typer.Option(help="Most draft tokens per round.")] = None,
    draft_model: Annotated[Optional[str], typer.Option(help="Draft model for --draft model or auto (same tokenizer).")] = None,
    ngram_mode: NgramMode = "lookup",
    datastore: Datastore_ = None,
    drafter_weights: Annotated[Optional[Path], typer.Option(help="--draft early-exit|medusa|hydra: the folder `selfspec train-drafter --out` wrote.")] = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics). The sampling flags set the defaults of requests that omit them."""
    try:
        from selfspec.sampling import SamplingParams
        from selfspec.server.app import ServerSettings, choosable_drafts, run, warm_up

        defaults = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        draft = draft or default_draft(model)
        if draft not in DRAFTS:
            raise SelfspecError(f"--draft must be one of {', '.join(DRAFTS)}, got {draft!r}")
        settings = ServerSettings(model_id=model, api_key=api_key or None, max_queue=max_queue,
                                  request_timeout=request_timeout, max_body=max_body, defaults=defaults,
                                  prefix_cache_mb=prefix_cache_mb)
        print(f"loading {model} ...", file=sys.stderr, flush=True)
        from dataclasses import replace

        from selfspec.models.loading import load_model

        m = load_model(model, dtype=dtype, ctx_size=ctx_size, threads=threads, device=device)
        options = dict(skip_config=skip_config, max_draft=max_draft, draft_model=draft_model, dtype=dtype,
                       threads=threads, draft_bits=draft_bits, ngram_mode=ngram_mode, datastore=datastore,
                       drafter_weights=drafter_weights)
        # model_id: what clients pass as "model"; draft_choices: what a request (the playground) may pick
        settings = replace(settings, model_id=m.name, draft_choices=choosable_drafts(m, skip_config),
                           draft_options=options)
        drafter = build_drafter(draft, m, **options)
        warm_up(m, drafter)
        run(m, drafter, settings, host=host, port=port)
    except SelfspecError as e:
        _fail(str(e))


@app.command()
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.json, report.md and the charts.")],
    model: Model_ = "smollm2-135m",
    suite: Annotated[str, typer.Option(help="quick | full | code | a JSONL file of {id, category, prompt|turns}.")] = "quick",
    methods: Annotated[str, typer.Option(help="Comma-separated methods: ar (= none), auto, layer-skip, ngram, draft-model "
                                              "(= model), quantized, hf, hf-lookup, llama-cpp, llama-cpp-lookup; options as "
                                              "layer-skip:skip=F.json, model:draft=ALIAS, none:dtype=bf16, "
                                              "quantized:bits=4,skip=F.json, ngram:mode=adaptive, retrieval:store=DIR; "
                                              "trained drafters as medusa:weights=DIR (also early-exit, hydra).")] = BENCH_DEFAULT,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Per turn.")] = 64,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = None,
    repeats: Annotated[int, typer.Option(help="Runs per prompt; the median time counts.")] = 1,
    threads: Threads = None,
    dtype: Dtype = "auto",
    ctx_size: CtxSize = None,
    device: Device = "auto",
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Chat template (default: when the model has one).")] = None,
    startup: Annotated[bool, typer.Option("--startup", help="Instead of methods on a suite: load time cold vs warm (weight cache emptied / present, fresh processes; --repeats warm loads, at least 3) and time to first token of turn 5 of a chat with and without prompt-prefix reuse (-n tokens per answer). Writes startup.json and startup.md.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary object (last line of stdout).")] = False,
) -> None:
    """Benchmark methods against our plain decoding on a prompt suite; every method in a fresh process."""
    if startup:
        return _bench_startup(out, model, dtype, threads, ctx_size, max_new_tokens, repeats, as_json)
    from selfspec.bench.run import BenchSettings, run_bench
    from selfspec.bench.report import ALL, summarise
    from selfspec.drafters.factory import ENGINES, parse_methods

    try:
        specs = parse_methods(methods)
        settings = BenchSettings(model=model, suite=suite, methods=[s.text for s in specs],
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, repeats=repeats,
                                 threads=threads, dtype=dtype, ctx_size=ctx_size, chat=chat, device=device)
        _check_model_spec(model)
        results = run_bench(settings, out, command="selfspec " + " ".join(sys.argv[1:]))
    except SelfspecError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130)
    s = summarise(results)
    status = {m["method"]: m for m in results["methods"]}
    lines = []
    for m in s["methods"]:
        row = s["table"].get(m, {}).get(ALL)
        if row is None:
            lines.append(f"{m:24s} {status[m]['status']}: {status[m]['reason']}")
            continue
        engine = status[m]["kind"] in ENGINES
        flag = {True: "same as plain", None: "",
                False: "differs from plain (another engine's numerics)" if engine else "OUTPUT DIFFERS FROM PLAIN"}[row["same"]]
        lines.append(f"{m:24s} {row['tokens_per_s']:7.1f} tok/s  {row['speedup']:.2f}x  {flag}")
    print("\n".join(lines) + f"\nreport: {Path(out) / 'report.md'}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        sys.stdout.write(json.dumps({"out": str(out), "summary": {m: s["table"][m].get(ALL) for m in s["methods"]
                                                                  if s["table"].get(m)},
                                     "methods": results["methods"]}) + "\n")


def _bench_startup(out, model, dtype, threads, ctx_size, max_new_tokens, repeats, as_json) -> None:
    from selfspec.bench.startup import StartupSettings, run_startup

    try:
        _check_model_spec(model)
        settings = StartupSettings(model=model, dtype=dtype, threads=threads, ctx_size=ctx_size,
                                   max_new_tokens=max_new_tokens, repeats=max(repeats, 3))
        results = run_startup(settings, out, command="selfspec " + " ".join(sys.argv[1:]),
                              progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except SelfspecError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130)
    text = (Path(out) / "startup.md").read_text()
    print(text + f"report: {Path(out) / 'startup.md'}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        t = results["ttft"]
        sys.stdout.write(json.dumps({"out": str(out), "cold_load_seconds": results["cold_load"]["load_seconds"],
                                     "warm_load_seconds": results["warm_load_seconds"],
                                     "ttft_cold_seconds": t["cold_ttft_seconds"], "ttft_warm_seconds": t["warm_ttft_seconds"],
                                     "ttft_speedup": t["speedup"], "same_output": t["same_output"]}) + "\n")


def _check_model_spec(model: str) -> None:
    """Fail before starting workers when the model can be neither found nor installed."""
    from selfspec.errors import ModelLoadError
    from selfspec.models.registry import REGISTRY

    if model in REGISTRY:
        if REGISTRY[model].part_paths() is None:
            raise ModelLoadError(f"model {model!r} is not installed; install: {REGISTRY[model].install_hint}")
    elif not Path(model).expanduser().exists():
        raise ModelLoadError(f"model {model!r} is neither a known alias ({', '.join(REGISTRY)}) nor an existing path")


@app.command("train-drafter")
def train_drafter(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for drafter.safetensors + drafter.json (and checkpoint/).")],
    kind: Annotated[str, typer.Option(help="early-exit-adapter (Kangaroo: first L layers + a trained adapter) | medusa (K heads on the last hidden state) | hydra (heads that also see the drafted tokens).")],
    model: Model_ = "smollm2-135m",
    exit_layer: Annotated[Optional[int], typer.Option(help="early-exit-adapter: layers the draft runs (default about n_layers/6).")] = None,
    heads: Annotated[Optional[int], typer.Option(help="medusa/hydra: heads, i.e. the longest draft (default 4).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="JSONL of {\"prompt\": ...} rows (continued by the model) and/or {\"text\": ...} rows (used as they are). Default: the shipped calibration and distillation prompts (48; never the bench suites).")] = None,
    self_distill: Annotated[Optional[int], typer.Option(help="Sequences the model generates from the prompts (cycled; the first pass greedy, later ones sampled). Default 48.")] = None,
    distill_tokens: Annotated[int, typer.Option(help="New tokens per self-distilled sequence.")] = 128,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 300,
    batch: Annotated[int, typer.Option(help="Windows per step.")] = 8,
    window: Annotated[int, typer.Option(help="Tokens per window.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; warm-up, then cosine to a tenth).")] = 1e-3,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints in OUT/checkpoint.")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint (same data and settings; --steps may grow).")] = False,
    seed: Annotated[int, typer.Option(help="Seeds initialisation, window sampling and the sampled distillation passes.")] = 0,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Chat template on the prompts (default: when the model has one).")] = None,
    dtype: Dtype = "fp32",
    threads: Threads = None,
    ctx_size: CtxSize = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object (last line of stdout).")] = False,
) -> None:
    """Train a drafter on the model's own generations (self-distillation; the backbone stays frozen)."""
    from selfspec.train.loop import TrainSettings
    from selfspec.train.run import train_drafter as run

    try:
        settings = TrainSettings(steps=steps, batch=batch, window=window, lr=lr, seed=seed,
                                 checkpoint_every=checkpoint_every)
        result = run(model=model, kind=kind, out=out, exit_layer=exit_layer, heads=heads, data=data,
                     self_distill=self_distill, distill_tokens=distill_tokens, settings=settings, resume=resume,
                     dtype=dtype, threads=threads, ctx_size=ctx_size, chat=chat)
    except SelfspecError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; continue with --resume (checkpoint in {out / 'checkpoint'})", err=True)
        raise typer.Exit(130)
    d = result["distill"]
    print(f"{result['kind']}: {result['sequences']} sequences, {result['tokens']} tokens "
          f"(distilled in {d['seconds']:.1f} s{', cached' if d['cached'] else ''}); features {result['feature_seconds']:.1f} s; "
          f"{result['steps']} steps in {result['train_seconds']:.1f} s, loss {result['first_loss']:.3f} -> "
          f"{result['final_loss']:.3f}\nuse: {result['use']}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")


@app.command()
def search(
    model: Model_ = "smollm2-135m",
    out: Annotated[Optional[Path], typer.Option(help="Write the skip-config JSON here (atomically).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Calibration prompts, JSONL with a \"prompt\" per line (default: the shipped calibration set).")] = None,
    suite: Annotated[Optional[str], typer.Option(help="Use the bench suite NAME as calibration prompts instead.")] = None,
    trials: Annotated[int, typer.Option(help="Finished trials wanted in the study, counting those of earlier runs and other workers.")] = 40,
    timeout: Annotated[Optional[float], typer.Option(help="Stop starting trials after this many minutes.")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna RDB URL (default sqlite:///<cache>/studies.db). SQLite for one machine; a postgresql:// or mysql:// URL lets workers on many machines share a study.")] = None,
    study_name: Annotated[Optional[str], typer.Option(help="Default: derived from the model, objective and settings, so the same command resumes.")] = None,
    objective: Annotated[str, typer.Option(help="tokens_per_s (measured self-speculative decoding) | match_rate (SWIFT proxy: draft top-1 == full model's, at a fixed skip fraction).")] = "tokens_per_s",
    sampler: Annotated[str, typer.Option(help="gp | tpe.")] = "gp",
    keep_first: Annotated[int, typer.Option(help="Never skip sub-layers of the first N layers.")] = 1,
    keep_last: Annotated[int, typer.Option(help="Never skip sub-layers of the last N layers.")] = 1,
    max_skip_fraction: Annotated[float, typer.Option(help="Most sub-layers a set may skip, as a fraction of all of them.")] = 0.5,
    skip_fraction: Annotated[float, typer.Option(help="match_rate: the fraction every set skips (at least); also the size of the seeded starting sets.")] = 0.25,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="New tokens per calibration prompt and trial.")] = 32,
    max_draft: Annotated[int, typer.Option(help="Most draft tokens per round.")] = 8,
    draft_vocab: Annotated[Optional[int], typer.Option(help="As in generate: draft head over the context's tokens plus N frequent ones.")] = None,
    draft: Annotated[str, typer.Option(help="layer-skip (full-precision draft) | quantized (the skip set of a precision self-draft: int8/int4 weights and skipped sub-layers; the config records draft_bits).")] = "layer-skip",
    draft_bits: Annotated[Optional[int], typer.Option(help="--draft quantized: 8 or 4 (default 8).")] = None,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = None,
    dtype: Dtype = "auto",
    threads: Threads = None,
    ctx_size: CtxSize = None,
    device: Device = "auto",
    report: Annotated[bool, typer.Option("--report", help="Print the study's best trials and write PNG charts; no search.")] = False,
    report_dir: Annotated[Optional[Path], typer.Option(help="Folder for the --report charts (default: next to --out, else the current folder).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (last line of stdout).")] = False,
) -> None:
    """Find the skip set of self-speculative decoding for a model (Bayesian search), resumable and
    shareable between worker processes; writes the skip-config JSON for --draft layer-skip."""
    try:
        _search(**locals())
    except SelfspecError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: finished trials are kept in the study; run the same command again to resume",
                   err=True)
        raise typer.Exit(130)


def _search_bits(draft: str, draft_bits: int | None) -> int | None:
    if draft not in ("layer-skip", "quantized"):
        raise SelfspecError(f"search --draft must be layer-skip or quantized, got {draft!r}")
    if draft == "layer-skip" and draft_bits is not None:
        raise SelfspecError("--draft-bits is for search --draft quantized")
    return (draft_bits or 8) if draft == "quantized" else None


def _search(*, model, out, prompts, suite, trials, timeout, storage, study_name, objective, sampler,
            keep_first, keep_last, max_skip_fraction, skip_fraction, max_new_tokens, max_draft, draft_vocab,
            draft, draft_bits, temperature, top_k, top_p, min_p, repetition_penalty, seed, dtype, threads, ctx_size, report,
            report_dir, as_json, device="auto") -> None:
    import optuna

    from selfspec.search import study as ss

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or ss.default_storage()
    if report:
        return _search_report(url, study_name, out, report_dir, as_json)
    from selfspec.models.loading import load_model
    from selfspec.sampling import SamplingParams

    settings = ss.SearchSettings(trials=trials, objective=objective, sampler=sampler, keep_first=keep_first,
                                 keep_last=keep_last, max_skip_fraction=max_skip_fraction,
                                 skip_fraction=skip_fraction, seed=seed or 0, max_new_tokens=max_new_tokens,
                                 max_draft=max_draft, draft_vocab=draft_vocab, timeout_minutes=timeout,
                                 draft_bits=_search_bits(draft, draft_bits))
    settings.check()
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    if out is None:
        raise SelfspecError("give --out FILE.json, where the skip config will be written")
    _check_model_spec(model)
    ss.check_out(out)
    texts, source = ss.calibration_prompts(prompts, suite)
    ss.check_spec_study(ss.open_storage(url), study_name, model)  # before minutes of loading
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    m = load_model(model, dtype=dtype, ctx_size=ctx_size, threads=threads, device=device)
    print(f"measuring plain decoding on {len(texts)} calibration prompts ({source}) ...", file=sys.stderr, flush=True)
    on_progress, bar = _search_progress(objective)
    try:
        result = ss.run_search(m, texts, settings, sampling, out=out, storage=url, study_name=study_name,
                               prompts_source=source, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.stop()
    c = result.config
    line = (f"best of {result.trials} trials ({result.ran} run now), study {result.study_name!r}: {objective} "
            f"{c.objective['value']:.4g}; skips {len(c.attention)} attention + {len(c.mlp)} MLP sub-layers; "
            f"{result.tokens_per_s:.1f} tok/s vs plain {result.baseline_tokens_per_s:.1f} "
            f"({c.search['speedup']:.2f}x, tau {c.search['tau']:.2f}); wrote {out}")
    print(line, file=sys.stderr)
    if as_json:
        sys.stdout.write(json.dumps({"config": json.loads(c.to_json()), "out": str(out)}) + "\n")


def _search_progress(objective: str):
    """(callback, rich bar or None): a live bar on a terminal (trial k/N, best so far, skip
    fraction of the trial running, ETA); one line per trial into a log file."""
    if not sys.stderr.isatty():
        def lines(p) -> None:
            if p.event == "baseline":
                print(f"plain decoding: {p.value:.2f} tok/s; {p.done} of {p.total} trials done before",
                      file=sys.stderr, flush=True)
            if p.event == "trial":
                value = "-" if p.value is None else f"{p.value:.4g}"
                best = "-" if p.best is None else f"{p.best:.4g}"
                print(f"trial {p.done}/{p.total}: {objective} {value}, best {best}", file=sys.stderr, flush=True)
        return lines, None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("trial {task.completed}/{task.total}"), BarColumn(),
                   TextColumn("best {task.fields[best]}"), TextColumn("skip {task.fields[skip]}"),
                   TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=Console(stderr=True))
    task = None

    def update(p) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("search", total=p.total, best="-", skip="-", note="")
        if p.event == "baseline":
            bar.console.print(f"plain decoding: {p.value:.2f} tok/s")
        fields = {"best": "-" if p.best is None else f"{p.best:.4g}",
                  "note": "waiting for other workers" if p.event == "wait" else ""}
        if p.skip_fraction is not None:
            fields["skip"] = f"{100 * p.skip_fraction:.0f}%"
        bar.update(task, completed=p.done, **fields)

    return update, bar


def _search_report(url, study_name, out, report_dir, as_json) -> None:
    from selfspec.search.report import best_rows, load_study, write_charts

    study = load_study(url, study_name)
    rows = best_rows(study)
    folder = report_dir or (out.parent if out is not None else Path("."))
    charts = write_charts(study, folder)
    if as_json:
        sys.stdout.write(json.dumps({"study": study.study_name, "best": rows, "charts": [str(p) for p in charts]}) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    objective = study.user_attrs.get("objective", "value")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    table = Table("trial", objective, "skip", "tau", "accepted", "attention", "mlp",
                  title=f"{study.study_name} ({study.user_attrs.get('model')}, {len(done)} finished trials)")
    for r in rows:
        table.add_row(str(r["trial"]), f"{r['value']:.4g}", f"{100 * (r['skip_fraction'] or 0):.0f}%",
                      "-" if r["tau"] is None else f"{r['tau']:.2f}",
                      "-" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f}%",
                      " ".join(map(str, r["attention"])), " ".join(map(str, r["mlp"])))
    Console().print(table)
    for p in charts:
        print(f"wrote {p}", file=sys.stderr)


datastore_app = typer.Typer(no_args_is_help=True, help="Token datastores for --draft retrieval (REST): a corpus indexed by suffix array.")
app.add_typer(datastore_app, name="datastore")


@datastore_app.command("build")
def datastore_build(
    corpus: Annotated[list[Path], typer.Option(help="Text files or folders (read recursively); repeat for several.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the store.")],
    model: Model_ = "smollm2-135m",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (last line of stdout).")] = False,
) -> None:
    """Tokenize a corpus (code, docs) with the model's tokenizer and index it for retrieval drafts."""
    from selfspec.drafters.datastore import build_command

    try:
        report = build_command(model, corpus, out)
    except SelfspecError as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")


cache_app = typer.Typer(no_args_is_help=True, help="List or clear the cache folder (SELFSPEC_CACHE, default ~/.cache/selfspec).")
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list(as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """What the cache folder holds, by kind."""
    from selfspec.paths import entries
    from selfspec.paths import cache_dir

    rows = entries()
    if as_json:
        typer.echo(json.dumps({"cache_dir": str(cache_dir()), "kinds": rows}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("kind", "size", "entries", "what", title=str(cache_dir()))
    for r in rows:
        table.add_row(r["kind"], f"{r['bytes'] / 2**20:.1f} MiB", str(r["entries"]), r["what"])
    Console().print(table)


@cache_app.command("clear")
def cache_clear(
    kinds: Annotated[Optional[list[str]], typer.Argument(help="Kinds to delete (see `selfspec cache list`); all when none given.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete cached files; each kind is rebuilt on next use."""
    from selfspec.paths import KINDS, clear

    kinds = kinds or []
    for k in kinds:
        if k not in KINDS:
            _fail(f"unknown cache kind {k!r}; kinds: {', '.join(KINDS)}")
    if not yes and not typer.confirm(f"delete {', '.join(kinds) or 'everything'} from the cache?", err=True):
        raise typer.Exit(1)
    freed = clear(kinds)
    typer.echo(f"freed {freed / 2**20:.1f} MiB")


def main() -> None:
    try:
        app()
    except SelfspecError as e:  # errors raised outside a command body
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
