"""`farm validate` and `farm plan`: manifest checks that load no weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from farm.cli._common import console, err_console, print_json
from farm.errors import ManifestError


def validate(
    files: Annotated[list[Path], typer.Argument(help="Job manifest YAML files.")],
) -> None:
    """Check job manifests; print every problem of every file, or a one-line summary per valid file."""
    from farm.manifest import load_manifest

    failed = 0
    for f in files:
        try:
            m = load_manifest(f)
        except ManifestError as exc:
            failed += 1
            err_console.print(f"[red]✗[/] {exc}", markup=True, highlight=False)
        else:
            console.print(f"[green]✓[/] {f}: {m.summary()}")
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(validate)
