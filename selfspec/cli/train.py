"""`selfspec train-drafter`: a drafter trained on the model's own generations."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfspec.cli.options import MODEL, PROMPTS, Json, command


@command(interrupted=lambda a: f"interrupted; continue with --resume (checkpoint in {a['out'] / 'checkpoint'})")
def train_drafter(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for drafter.safetensors + drafter.json (and checkpoint/).")],
    kind: Annotated[str, typer.Option(help="early-exit (Kangaroo: first L layers + a trained adapter; the old name early-exit-adapter still works) | lite (LITE: tuned exits at several intermediate layers, the model's own LM head) | medusa (K heads on the last hidden state) | hydra (heads that also see the drafted tokens).")],
    model=MODEL("model", "dtype", "threads", "ctx_size", dtype="fp32"),
    exit_layer: Annotated[Optional[int], typer.Option(help="early-exit: layers the draft runs (default about n_layers/6). lite: the tuned exit the drafter uses (default: the best by the agreement-vs-cost proxy at the end of training).")] = None,
    exit_layers: Annotated[Optional[str], typer.Option(help="lite: the exits tuned together, comma-separated (default: about 1/10, 1/6, 1/4 and 2/5 of the layers; 3,5,8,12 for SmolLM2).")] = None,
    heads: Annotated[Optional[int], typer.Option(help="medusa/hydra: heads, i.e. the longest draft (default 4).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="JSONL of {\"prompt\": ...} rows (continued by the model) and/or {\"text\": ...} rows (used as they are). Default: the shipped calibration and distillation prompts (48; never the bench suites).")] = None,
    self_distill: Annotated[Optional[int], typer.Option(help="Sequences the model generates from the prompts (cycled; the first pass greedy, later ones sampled). Default 48.")] = None,
    distill_tokens: Annotated[int, typer.Option(help="New tokens per self-distilled sequence.")] = 128,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default 300; lite 200: its steps cost one LM-head pass per exit).")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Windows per step (default 8; lite 4).")] = None,
    window: Annotated[int, typer.Option(help="Tokens per window.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; warm-up, then cosine to a tenth).")] = 1e-3,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints in OUT/checkpoint.")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint (same data and settings; --steps may grow).")] = False,
    seed: Annotated[int, typer.Option(help="Seeds initialisation, window sampling and the sampled distillation passes.")] = 0,
    text=PROMPTS("chat"),
    as_json: Json = False,
) -> None:
    """Train a drafter on the model's own generations (self-distillation; the backbone stays frozen)."""
    from selfspec.drafters.trained.kinds import RENAMED, default_schedule

    if kind in RENAMED:
        print(f"note: --kind {kind} is now called {RENAMED[kind]} (the --draft name); the old name still works",
              file=sys.stderr)
    from selfspec.train.loop import TrainSettings
    from selfspec.train.run import parse_layers, train_drafter as run

    default_steps, default_batch = default_schedule(kind)
    settings = TrainSettings(steps=default_steps if steps is None else steps, batch=default_batch if batch is None else batch,
                             window=window, lr=lr, seed=seed,
                             checkpoint_every=checkpoint_every)
    layers = None if exit_layers is None else parse_layers(exit_layers)
    result = run(kind=kind, out=out, exit_layer=exit_layer, exit_layers=layers, heads=heads, data=data,
                 self_distill=self_distill, distill_tokens=distill_tokens, settings=settings, resume=resume, **vars(text), **vars(model))
    d = result["distill"]
    print(f"{result['kind']}: {result['sequences']} sequences, {result['tokens']} tokens "
          f"(distilled in {d['seconds']:.1f} s{', cached' if d['cached'] else ''}); features {result['feature_seconds']:.1f} s; "
          f"{result['steps']} steps in {result['train_seconds']:.1f} s, loss {result['first_loss']:.3f} -> "
          f"{result['final_loss']:.3f}\nuse: {result['use']}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
