"""The `farm` command: a thin typer app. Each submodule registers its commands; heavy imports
happen inside command bodies so `farm --help` and `farm validate` stay instant."""

from __future__ import annotations

import sys

import typer

from farm.cli import adapters, gc, jobs, manifest_cmds, serve, train
from farm.cli._common import console, err_console
from farm.errors import FarmError

app = typer.Typer(
    name="farm",
    help="A multi-tenant QLoRA adapter farm on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)



@app.callback()
def _root() -> None:
    """A multi-tenant QLoRA adapter farm on Ray. FARM_HOME, FARM_CATALOG and RAY_ADDRESS configure it."""


for _module in (manifest_cmds, train, jobs, adapters, serve, gc):
    _module.register(app)


def main() -> None:
    """Console entry point: user errors print as one clear message, never a traceback."""
    try:
        app()
    except FarmError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


__all__ = ["app", "console", "main"]
