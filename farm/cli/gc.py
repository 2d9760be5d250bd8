"""`farm gc --older-than 7d [--dry-run]`: remove old run storage, stale temp checkpoints and unused
fetched adapters (farm.gc says what each rule keeps)."""

from __future__ import annotations

from typing import Annotated

import typer

from farm.cli._common import console, print_json


def gc(
    older_than: Annotated[str, typer.Option("--older-than", help="Age: 90m, 12h, 7d, 2w (s, m, h, d, w).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Remove run storage of jobs that ended longer ago than --older-than, and temp checkpoint and
    fetched adapter folders unused for that long. Never a queued, running or retrying job's run, never
    the catalog (see `farm adapters gc`)."""
    from farm.gc import collect, parse_age

    report = collect(parse_age(older_than), dry_run=dry_run)
    if json_out:
        print_json(report.to_json())
    else:
        verb = "would remove" if dry_run else "removed"
        for item in report.removed:
            console.print(f"{verb} {item.kind} {item.path} ({item.why}, {item.bytes / 2**20:.1f} MB)")
        total = sum(i.bytes for i in report.removed) / 2**20
        console.print(f"{verb} {len(report.removed)} item(s), {total:.1f} MB; kept {len(report.kept)} "
                      f"younger than {older_than} or in use")
        for err in report.errors:
            console.print(f"[red]could not remove[/] {err}")
    if report.errors:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(gc)
