"""`selfspec search`: the skip set of self-speculative decoding (Bayesian search, Optuna), and
--report on a study."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfspec.cli.options import DRAFTER, MODEL, PROMPTS, SAMPLING, Json, command, load, sampling_params
from selfspec.errors import SelfspecError, plural
from selfspec.models.registry import check_spec
from selfspec.progress import Bar


@command(interrupted="interrupted: finished trials are kept in the study; run the same command again to resume")
def search(
    model=MODEL,
    out: Annotated[Optional[Path], typer.Option(help="Write the skip-config JSON here (atomically).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Calibration prompts, JSONL with a \"prompt\" per line (default: the shipped calibration set).")] = None,
    calibration=PROMPTS("suite", "max_new_tokens", suite=None, max_new_tokens=32),
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
    draft: Annotated[str, typer.Option(help="layer-skip (full-precision draft) | quantized (the skip set of a precision self-draft: int8/int4 weights and skipped sub-layers; the config records draft_bits).")] = "layer-skip",
    drafter=DRAFTER("draft_bits", "max_draft", "draft_vocab", max_draft=8),
    sampling=SAMPLING,
    report: Annotated[bool, typer.Option("--report", help="Print the study's best trials and write PNG charts; no search.")] = False,
    report_dir: Annotated[Optional[Path], typer.Option(help="Folder for the --report charts (default: next to --out, else the current folder).")] = None,
    as_json: Json = False,
) -> None:
    """Find the skip set of self-speculative decoding for a model (Bayesian search), resumable and
    shareable between worker processes; writes the skip-config JSON for --draft layer-skip."""
    import optuna

    from selfspec.search import study as ss

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or ss.default_storage()
    if report:
        from selfspec.search.report import show

        return show(url, study_name, report_dir or (out.parent if out is not None else Path(".")), as_json)
    settings = ss.SearchSettings(trials=trials, objective=objective, sampler=sampler, keep_first=keep_first,
                                 keep_last=keep_last, max_skip_fraction=max_skip_fraction,
                                 skip_fraction=skip_fraction, seed=sampling.seed or 0, timeout_minutes=timeout,
                                 max_new_tokens=calibration.max_new_tokens, max_draft=drafter.max_draft,
                                 draft_vocab=drafter.draft_vocab, draft_bits=_search_bits(draft, drafter.draft_bits))
    settings.check()
    params = sampling_params(sampling)
    if out is None:
        raise SelfspecError("give --out FILE.json, where the skip config will be written")
    check_spec(model.model)
    ss.check_out(out)
    texts, source = ss.calibration_prompts(prompts, calibration.suite)
    ss.check_spec_study(ss.open_storage(url), study_name, model.model)  # before minutes of loading
    m = load(model)
    # no trial count until the baseline is measured (the first event sets it)
    with Bar(f"measuring plain decoding on {plural(len(texts), 'calibration prompt')} ({source})",
             fields="last {last}, best {best}, skip {skip} {note}", last="-", best="-", skip="-", note="") as bar:
        result = ss.run_search(m, texts, settings, params, out=out, storage=url, study_name=study_name,
                               prompts_source=source, on_progress=lambda p: _show(bar, p))
    c = result.config
    line = (f"best of {plural(result.trials, 'trial')} ({result.ran} run now), study {result.study_name!r}: {objective} "
            f"{c.objective['value']:.4g}; skips {len(c.attention)} attention + {len(c.mlp)} MLP sub-layers; "
            f"{result.tokens_per_s:.1f} tok/s vs plain {result.baseline_tokens_per_s:.1f} "
            f"({c.search['speedup']:.2f}x, tau {c.search['tau']:.2f}); wrote {out}")
    print(line, file=sys.stderr)
    if result.warning:
        print(f"WARNING: {result.warning}", file=sys.stderr)
    if as_json:
        sys.stdout.write(json.dumps({"config": json.loads(c.to_json()), "out": str(out),
                                     "warning": result.warning}) + "\n")


def _search_bits(draft: str, draft_bits: int | None) -> int | None:
    if draft not in ("layer-skip", "quantized"):
        raise SelfspecError(f"search --draft must be layer-skip or quantized, got {draft!r}")
    if draft == "layer-skip" and draft_bits is not None:
        raise SelfspecError("--draft-bits is for search --draft quantized")
    return (draft_bits or 8) if draft == "quantized" else None


def _show(bar, p) -> None:
    """One search event on the progress bar."""
    if p.event == "baseline":
        bar.note(f"plain decoding: {p.value:.2f} tok/s; {p.done} of {p.total} trials done before")
    fields = {"best": "-" if p.best is None else f"{p.best:.4g}", "label": "search",
              "note": "(waiting for other workers)" if p.event == "wait" else ""}
    if p.event == "trial" and p.value is not None:
        fields["last"] = f"{p.value:.4g}"
    if p.skip_fraction is not None:
        fields["skip"] = f"{100 * p.skip_fraction:.0f}%"
    bar.update(completed=p.done, total=p.total, **fields)
