"""`selfspec generate`: one prompt, the answer streamed as it is decoded."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfspec.cli.options import DRAFTER, MODEL, PROMPTS, SAMPLING, Json, command, load, sampling_params, split_drafter
from selfspec.errors import SelfspecError
from selfspec.paths import check_writable

# --compare: each side decodes for at least this long (repeating short answers, at most
# COMPARE_MAX_RUNS times), so the speedup is not one short run's noise
COMPARE_SECONDS = 1.0
COMPARE_MAX_RUNS = 10


@command(interrupted="interrupted")
def generate(
    model=MODEL,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text (else --prompt-file or stdin).")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from a file.")] = None,
    text=PROMPTS("max_new_tokens", "chat", "system"),
    sampling=SAMPLING,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string; repeat for several.")] = None,
    drafter=DRAFTER,
    save_skip_config: Annotated[Optional[Path], typer.Option(help="After generating, write the layer-skip drafter's skip config here (with --skip-config online: the set found so far).")] = None,
    compare: Annotated[bool, typer.Option(help="Also run plain decoding and report the speedup and whether the output is identical.")] = False,
    show_drafts: Annotated[bool, typer.Option("--show-drafts", help="Colour the streamed text: accepted draft tokens green, the target's own tokens magenta (underlined where a draft was rejected); then a summary line (tau, acceptance, speedup vs the cost model's estimate of plain decoding) on stderr. Colour only when stdout is a terminal; with --json or a pipe the text is plain and the JSON gets each token's origin.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="Experimental, GPU only: torch.compile the decode/draft/verify forward. On the CPU it runs eagerly (compiled CPU graphs are not row-invariant, so output could change; they were also slower).")] = False,
    as_json: Json = False,
) -> None:
    """Generate text, streaming it as it is decoded."""
    sampling = sampling_params(sampling)
    draft, options = split_drafter(drafter, model.model)
    if save_skip_config is not None:
        if draft != "layer-skip":
            raise SelfspecError("--save-skip-config needs --draft layer-skip (e.g. with --skip-config online)")
        check_writable(save_skip_config, "--save-skip-config")
    prompt = _read_prompt(prompt, prompt_file)
    if not prompt.strip():
        raise SelfspecError("the prompt is empty; give some text")
    # Every argument is checked; now torch and the model.
    from selfspec.drafters.factory import build_drafter
    from selfspec.generation import check_request, stream

    out = sys.stderr if as_json else sys.stdout
    m = load(model, compile=compile)
    if compile:
        print(f"--compile: {m.transformer.compile_status}", file=sys.stderr)
    # A prompt too long for the context is refused now, before a drafter is built (auto's cost
    # calibration takes minutes on a new context size).
    ids = m.encode(prompt, chat=text.chat, system=text.system)  # tokenised once, for every run below
    check_request(m, ids, text.max_new_tokens)
    drafter = build_drafter(draft, m, dtype=model.dtype, threads=model.threads, **options)
    kwargs = dict(sampling=sampling, max_new_tokens=text.max_new_tokens, stop=stop or ())
    if compare:  # the first forward passes pay one-off kernel set-up; keep it out of both timings
        from selfspec.hardware import comparison_caveat, load_average

        for _ in stream(m, ids, max_new_tokens=2):
            pass
        loads = [load_average()]
    gen = stream(m, ids, drafter=drafter, **kwargs)
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
    s = result.stats
    line = f"[{s.summary()}, load {s.load_seconds:.1f} s, dtype {s.dtype}" + (
        f", compile {s.extras['compile_seconds']:.1f} s]" if "compile_seconds" in s.extras else "]")
    if painter is not None:
        painter.legend()
        step = show.plain_step_seconds(m, drafter)
        report["show_drafts"] = {"origins": painter.view.origins[: len(result.token_ids)],
                                 **show.estimate(result.stats, step)}
        drafts_line = show.summary_line(result.stats, step)
    if compare:
        loads.append(load_average())
        # A short answer decodes in a fraction of a second, where a timing is mostly noise: a side
        # that has decoded for less than COMPARE_SECONDS runs again (silently, the two sides
        # alternating), and each side's speed is its total tokens over its total time.
        runs = {"spec": [result], "plain": []}
        drafters = {"spec": drafter, "plain": None}

        def decoded(side: str) -> float:
            return sum(r.stats.decode_seconds for r in runs[side])

        while True:
            short = [k for k in ("spec", "plain")
                     if not runs[k] or (decoded(k) < COMPARE_SECONDS and len(runs[k]) < COMPARE_MAX_RUNS)]
            if not short:
                break
            for k in short:
                again = stream(m, ids, drafter=drafters[k], **kwargs)
                for _ in again:
                    pass
                runs[k].append(again.result)
        loads.append(load_average())
        base = runs["plain"][0]
        seconds = {k: decoded(k) for k in runs}
        rate = {k: sum(r.stats.new_tokens for r in side) / seconds[k] if seconds[k] else 0.0
                for k, side in runs.items()}
        caveat = comparison_caveat(loads, list(seconds.values()), min_seconds=COMPARE_SECONDS)
        speedup = rate["spec"] / rate["plain"] if rate["plain"] else 0.0
        same = result.token_ids == base.token_ids  # greedy: every repeat too (sampling may differ by run)
        if sampling.greedy:
            same = same and all(r.token_ids == base.token_ids for r in runs["spec"] + runs["plain"])
        n = {k: len(v) for k, v in runs.items()}
        report["compare"] = {"plain_tokens_per_s": rate["plain"], "tokens_per_s": rate["spec"], "speedup": speedup,
                             "runs": n, "same_as_plain": same, "warning": caveat}
        line += (f" | plain {rate['plain']:.1f} tok/s -> speedup {speedup:.2f}x"
                 + (f" (over {n['spec']} and {n['plain']} runs: {rate['spec']:.1f} against {rate['plain']:.1f} tok/s)"
                    if max(n.values()) > 1 else "")
                 + ", " + ("output identical to plain decoding" if same else "OUTPUT DIFFERS from plain decoding"))
    print(line, file=sys.stderr)
    if compare and caveat:
        print(f"warning: {caveat}", file=sys.stderr)
    if painter is not None:
        print(drafts_line, file=sys.stderr)
    if save_skip_config is not None:
        drafter.config.save(save_skip_config)
        report["skip_config"] = str(save_skip_config)
        print(f"wrote the skip config to {save_skip_config}", file=sys.stderr)
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise SelfspecError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            return _utf8(prompt_file.read_bytes(), f"--prompt-file {prompt_file}")
        except OSError as e:
            raise SelfspecError(f"cannot read --prompt-file {prompt_file}: {e.strerror}") from None
    if prompt is not None:
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise SelfspecError("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
    return _utf8(sys.stdin.buffer.read(), "the prompt on stdin")


def _utf8(raw: bytes, what: str) -> str:
    """Bytes read as a prompt, decoded; bytes that are not UTF-8 are a user error naming where."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SelfspecError(f"{what} is not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                            f"({e.reason}); convert it, e.g. with iconv -t UTF-8") from None

