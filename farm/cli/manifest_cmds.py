"""`farm validate` and `farm plan`: manifest checks that load no weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from farm.cli._common import console, err_console, print_json
from farm.errors import ManifestError


def validate(
    files: Annotated[list[Path], typer.Argument(help="Job manifest or serve config (a file with `bases:`) YAML files.")],
    offline: Annotated[bool, typer.Option("--offline", help="Skip the s3:// (remote) existence checks.")] = False,
) -> None:
    """Check job manifests and what they point at (dataset files, base model folder, s3:// objects),
    and serve configs (`farm serve --config`); print every problem of every file, or a one-line
    summary per valid file."""
    from farm.finetune.policy import serve_policy
    from farm.manifest import read_yaml
    from farm.preflight import load_checked
    from farm.serve.config_file import is_serve_config, load_serve_config

    failed = 0
    for f in files:
        try:
            if is_serve_config(read_yaml(f)):
                sc = load_serve_config(f)
                serve_policy(sc.bases[0].model, sc.training_policy, str(f))
                bases = ", ".join(f"{b.name} ({b.replicas}x {b.engine})" for b in sc.bases)
                console.print(f"[green]✓[/] {f}: serve config, {sc.host}:{sc.port}, bases: {bases}")
                continue
            m, report = load_checked(f, offline=offline)
        except ManifestError as exc:
            failed += 1
            err_console.print(f"[red]✗[/] {exc}", markup=True, highlight=False)
        else:
            console.print(f"[green]✓[/] {f}: {m.summary()}")
            for ref in report.skipped:
                console.print(f"  [yellow]not checked (--offline):[/] {ref}", highlight=False)
    if failed:
        raise typer.Exit(1)


def plan(
    file: Annotated[Path, typer.Argument(help="Job manifest YAML file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Cost before compute: parameter counts, adapter size and base-model memory per quantization mode.

    Builds the model on the meta device from its config; no weights are loaded."""
    from farm.manifest import load_manifest
    from farm.plan import plan as make_plan

    report = make_plan(load_manifest(file), source=str(file))
    if as_json:
        print_json(report)
    else:
        _render(report)


def _render(r: dict) -> None:
    from rich.table import Table

    from farm.plan import human_bytes

    p, a, f = r["params"], r["adapter"], r["footprint"]
    targets = r["lora"]["target_modules"]
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    console.print(f"[bold]{r['manifest']}[/]: {r['task']} on {r['base_model']} ({r['model_type']})")
    console.print(f"LoRA r={r['lora']['r']} alpha={r['lora']['alpha']:g} on {targets}")
    if r["lora"]["modules_to_save"]:
        console.print(f"trained in full: {', '.join(r['lora']['modules_to_save'])}")
    params = Table(show_header=False, box=None, pad_edge=False)
    params.add_row("base params", f"{p['base']:,}")
    params.add_row("total params (with adapter)", f"{p['total']:,}")
    params.add_row("trainable params", f"{p['trainable']:,} ({p['trainable_percent']:.4f}%)")
    params.add_row("adapter file", f"{human_bytes(a['file_bytes'])} ({a['tensors']} fp32 tensors)")
    w = r["work"]
    params.add_row(f"{w['method']}: sequences/step", f"{w['sequences_per_step']:,} (at most {w['max_tokens_per_step']:,} tokens)"
                   + (": chosen + rejected of each pair" if w["method"] == "dpo" else ""))
    console.print(params)

    table = Table(title="Base model weights in memory")
    table.add_column("quantization", no_wrap=True)
    for col in ("bits/linear param", "linear weights", "other params", "total"):
        table.add_column(col, justify="right")
    for m in f["modes"]:
        mark = " ←" if m["mode"] == f["selected"] else ""
        table.add_row(
            m["label"] + mark,
            f"{m['bits_per_linear_param']:.3f}" if m["bits_per_linear_param"] is not None else "-",
            human_bytes(m["linear_bytes"]),
            human_bytes(m["other_bytes"]),
            human_bytes(m["total_bytes"]),
            style="bold" if mark else None,
        )
    console.print(table)
    console.print(f"[dim]{f['note']}. ← this job's setting.[/]")


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(plan)
