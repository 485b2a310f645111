"""`selfspec` command line: the app and its commands, one module per command group; the options
they share are declared once in options.py. User mistakes print one line, `error: ...`, and exit
2; never a traceback. With --json, exactly one JSON object is printed on one line, the last line of
stdout; streamed text, progress and logs then go to stderr."""
from __future__ import annotations

import sys

import typer

from selfspec.cli import bench, cache, chat, datastore, generate, search, serve, train
from selfspec.errors import SelfspecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Lossless speculative decoding for local LLMs on CPU.")
for command in (cache.models, generate.generate, chat.chat, serve.serve, bench.bench):
    app.command()(command)
app.command("train-drafter")(train.train_drafter)
app.command()(search.search)
app.add_typer(datastore.app, name="datastore")
app.add_typer(cache.app, name="cache")


def main() -> None:
    try:
        app()
    except SelfspecError as e:  # errors raised outside a command body
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
