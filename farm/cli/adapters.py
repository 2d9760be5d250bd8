"""`farm adapters ...`: list, show, import, fetch, delete, alias and gc over the adapter catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from farm.cli._common import console, print_json

adapters_app = typer.Typer(name="adapters", help="The adapter catalog (FARM_CATALOG, default $FARM_HOME/catalog).",
                           no_args_is_help=True)

CatalogOpt = Annotated[str | None, typer.Option("--catalog", help="Catalog URL (overrides FARM_CATALOG).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _catalog(url: str | None):
    from farm.catalog import Catalog

    return Catalog(url)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _metrics(m: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()) if isinstance(v, (int, float)))


@adapters_app.command("list")
def list_(
    customer: Annotated[str | None, typer.Option(help="Only this customer (reads only its prefix).")] = None,
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the latest version of every adapter."""
    from rich.table import Table

    found = _catalog(catalog).list(customer)
    if json_out:
        print_json([v.to_json() for v in found])
        return
    if not found:
        console.print("no adapters" + (f" for customer {customer}" if customer else ""))
        return
    table = Table("ref", "created", "size", "metrics", box=None)
    for v in sorted(found, key=lambda v: v.ref):
        table.add_row(v.ref, v.created[:19].replace("T", " "), _size(v.size), _metrics(v.metrics))
    console.print(table)


@adapters_app.command()
def show(
    ref: Annotated[str, typer.Argument(help="customer/adapter[@vN|@alias]")],
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one version: where it is, its files and hashes, metrics and aliases."""
    cat = _catalog(catalog)
    v = cat.resolve(ref)
    aliases = sorted(a for a, n in cat.aliases(v.name).items() if n == v.version)
    if json_out:
        print_json({**v.to_json(), "aliases": aliases})
        return
    console.print(f"[bold]{v.ref}[/]" + (f"  (aliases: {', '.join(aliases)})" if aliases else ""))
    console.print(f"  id       {v.id}\n  uri      {v.uri}\n  created  {v.created}")
    if v.metrics:
        console.print(f"  metrics  {_metrics(v.metrics)}")
    for name, digest in sorted(v.files.items()):
        console.print(f"  {name:<32} {_size(v.sizes.get(name, 0)):>9}  sha256 {digest[:16]}")


@adapters_app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="A PEFT adapter folder (adapter_config.json + safetensors).")],
    name: Annotated[str, typer.Argument(help="customer/adapter to publish it as.")],
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Publish an existing PEFT LoRA adapter folder as a new version (pickle weights are refused)."""
    v = _catalog(catalog).import_adapter(path, name)
    if json_out:
        print_json(v.to_json())
        return
    console.print(f"[green]imported[/] [bold]{v.ref}[/]  ({len(v.files)} files, {_size(v.size)})\n  at {v.uri}")


@adapters_app.command()
def fetch(
    ref: Annotated[str, typer.Argument(help="customer/adapter[@vN|@alias]")],
    dest: Annotated[Path | None, typer.Argument(help="Folder to create (default: the local cache).")] = None,
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a version, verifying every file's sha256, into a folder stock PEFT loads."""
    cat = _catalog(catalog)
    v = cat.resolve(ref)
    path = cat.fetch(v, dest)
    if json_out:
        print_json({"ref": v.ref, "id": v.id, "path": str(path)})
        return
    console.print(f"[green]fetched[/] [bold]{v.ref}[/] (verified) to {path}")


@adapters_app.command()
def delete(
    ref: Annotated[str, typer.Argument(help="customer/adapter@vN")],
    force: Annotated[bool, typer.Option("--force", help="Also remove aliases pointing at it.")] = False,
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete one version; the delete is recorded (who, when, what) and the number never reused."""
    record = _catalog(catalog).delete(ref, force=force)
    if json_out:
        print_json({k: v for k, v in record.items() if k != "farm_json"})
        return
    removed = record["aliases_removed"]
    console.print(f"[green]deleted[/] {record['ref']}" + (f" and alias(es) {', '.join(removed)}" if removed else ""))


@adapters_app.command()
def alias(
    ref: Annotated[str, typer.Argument(help="customer/adapter[@vN|@alias]: the version to point at.")],
    name: Annotated[str, typer.Argument(help="Alias name, e.g. prod.")],
    expect: Annotated[str | None, typer.Option(help="Only move it if it now points at this (vN, or 'none' for a new alias).")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the alias instead.")] = False,
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Point an alias (customer/adapter@NAME) at a version, with compare-and-swap."""
    from farm.catalog import ANY, parse_ref

    cat = _catalog(catalog)
    if remove:
        was = cat.remove_alias(parse_ref(ref).name, name)
        out = {"alias": f"{parse_ref(ref).name}@{name}", "removed": True, "previous": was}
    else:
        before = cat.set_alias(ref, name, expect=ANY if expect is None else _expect(expect))
        v = cat.resolve(f"{parse_ref(ref).name}@{name}")
        out = {"alias": f"{v.name}@{name}", "version": v.version, "ref": v.ref, "previous": before}
    if json_out:
        print_json(out)
    elif remove:
        console.print(f"removed alias {out['alias']} (was v{out['previous']})")
    else:
        was = f" (was v{before})" if before is not None else ""
        console.print(f"{out['alias']} -> [bold]{out['ref']}[/]{was}")


def _expect(value: str) -> int | None:
    from farm.errors import CatalogError

    if value.lower() == "none":
        return None
    if value.startswith("v") and value[1:].isdigit() and int(value[1:]) > 0:
        return int(value[1:])
    raise CatalogError(f"--expect {value!r}: expected vN (e.g. v3) or 'none'")


@adapters_app.command()
def gc(
    grace: Annotated[float, typer.Option(help="Only remove debris older than this many seconds.")] = 24 * 3600,
    catalog: CatalogOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove debris of publishers that died midway, finish cut-short deletes, repair pointers."""
    report = _catalog(catalog).gc(grace_seconds=grace)
    if json_out:
        print_json(report)
        return
    for what, refs in report.items():
        console.print(f"{what.replace('_', ' ')}: {', '.join(refs) if refs else 'none'}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(adapters_app, name="adapters")
