"""Render what `selfspec generate --show-drafts` shows in a terminal to an SVG for the README
(docs/img/show-drafts.svg): the coloured answer, the legend and the summary lines.

    .venv/bin/python scripts/show_drafts_svg.py [--model smollm2-135m] [--draft auto] [--threads N] [--out FILE]
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from selfspec.drafters.costs import calibrate
from selfspec.drafters.auto import AutoDrafter
from selfspec.generation import stream
from selfspec.drafters.factory import build_drafter
from selfspec.models.loading import load_model
from selfspec.draftview import STYLES, DraftView, legend_text, plain_step_seconds, summary_line

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("Summarise in two sentences: The city council met on Tuesday to discuss the new park on the old "
          "railway depot. Residents asked for more trees, a playground and longer opening hours in summer. "
          "Shop owners worried about parking. The council agreed to plant forty trees, to build the "
          "playground first and to study parking before the next meeting in May.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft", default="auto")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "show-drafts.svg")
    args = ap.parse_args()
    model = load_model(args.model, threads=args.threads)
    if args.draft == "auto":  # costs measured now, under the same load as the run they are compared with
        drafter = AutoDrafter.for_model(model, costs=calibrate(model, use_cache=False))
    else:
        drafter = build_drafter(args.draft, model)
    for _ in stream(model, "Hello", max_new_tokens=4, drafter=drafter):  # one-off kernel set-up
        pass
    gen = stream(model, PROMPT, drafter=drafter, max_new_tokens=args.max_new_tokens)
    view = DraftView(model.tokenizer, gen.stats)
    answer = Text()
    for chunk in gen:
        for span in view.push(chunk):
            answer.append(span.text, style=STYLES[span.origin])
    console = Console(record=True, file=io.StringIO(), width=100, force_terminal=True, highlight=False)
    threads = f" --threads {args.threads}" if args.threads else ""
    console.print(Text(f'$ selfspec generate --draft {args.draft}{threads} --show-drafts -n {args.max_new_tokens} '
                       f'--prompt "Summarise in two sentences: The city council met ..."', style="bold"))
    console.print(answer)
    console.print(legend_text())
    console.print(Text(summary_line(gen.result.stats, plain_step_seconds(model, drafter)), style="dim"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(str(args.out), title="selfspec generate --show-drafts")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
