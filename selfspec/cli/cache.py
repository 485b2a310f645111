"""`selfspec models` (the embedded models) and `selfspec cache list|clear|prune` (the cache folder)."""
from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer

from selfspec.cli.options import Json, command, table
from selfspec.errors import SelfspecError

app = typer.Typer(no_args_is_help=True, help="List, prune or clear the cache folder (SELFSPEC_CACHE, default ~/.cache/selfspec).")


def models(as_json: Json = False) -> None:
    """List the embedded models."""
    from selfspec.models.registry import REGISTRY

    rows = [e.describe() for e in REGISTRY.values()]
    if as_json:
        return typer.echo(json.dumps({"models": rows}))
    table("alias", "arch", "layers", "params", "installed", "file",
           rows=[(r["alias"], r["arch"], str(r["layers"]), r["params"], "yes" if r["installed"] else "no",
                  r["path"] if r["installed"] else f"install: {r['install']}") for r in rows])


@app.command("list")
def cache_list(as_json: Json = False) -> None:
    """What the cache folder holds, by kind."""
    from selfspec.paths import cache_dir, entries

    rows = entries()
    if as_json:
        return typer.echo(json.dumps({"cache_dir": str(cache_dir()), "kinds": rows}))
    table("kind", "size", "entries", "what", title=str(cache_dir()),
           rows=[(r["kind"], f"{r['bytes'] / 2**20:.1f} MiB", str(r["entries"]), r["what"]) for r in rows])


@app.command("clear")
@command()
def cache_clear(
    kinds: Annotated[Optional[list[str]], typer.Argument(help="Kinds to delete (see `selfspec cache list`); all when none given.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete cached files; each kind is rebuilt on next use."""
    from selfspec.paths import KINDS, clear

    kinds = kinds or []
    for k in kinds:
        if k not in KINDS:
            raise SelfspecError(f"unknown cache kind {k!r}; kinds: {', '.join(KINDS)}")
    if not yes and not typer.confirm(f"delete {', '.join(kinds) or 'everything'} from the cache?", err=True):
        raise typer.Exit(1)
    freed = clear(kinds)
    typer.echo(f"freed {freed / 2**20:.1f} MiB")


@app.command("prune")
@command()
def cache_prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go and its size; delete nothing.")] = False,
    as_json: Json = False,
) -> None:
    """Delete only entries this selfspec can never use (older formats, versions or kernel sources,
    leftovers of interrupted writes); usable entries stay."""
    from selfspec.paths import cache_dir
    from selfspec.prune import as_dict, prune

    stale, freed = prune(dry_run)
    if as_json:
        return typer.echo(json.dumps({"cache_dir": str(cache_dir()), "dry_run": dry_run,
                                      "entries": [as_dict(s) for s in stale], "bytes": freed}))
    if stale:
        table("kind", "size", "path", "why", title=str(cache_dir()),
              rows=[(s.kind, f"{s.bytes / 2**20:.2f} MiB", os.path.relpath(s.path, cache_dir()), s.reason)
                    for s in stale])
    typer.echo(f"{'would free' if dry_run else 'freed'} {freed / 2**20:.1f} MiB")
