"""`selfspec datastore build`: token datastores for --draft retrieval."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from selfspec.cli.options import MODEL, Json, command

app = typer.Typer(no_args_is_help=True, help="Token datastores for --draft retrieval (REST): a corpus indexed by suffix array.")


@app.command("build")
@command()
def build(
    corpus: Annotated[list[Path], typer.Option(help="Text files or folders (read recursively); repeat for several.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the store.")],
    model=MODEL("model"),
    as_json: Json = False,
) -> None:
    """Tokenize a corpus (code, docs) with the model's tokenizer and index it for retrieval drafts."""
    from selfspec.drafters.datastore import build_command

    report = build_command(model.model, corpus, out)
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
