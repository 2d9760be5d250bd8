"""`farm train FILE`: run one job now, in the foreground, on Ray Train; publish; print the ref."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from farm.cli._common import console, err_console, print_json


def train(
    file: Annotated[Path, typer.Argument(help="Job manifest YAML.")],
    job_id: Annotated[str | None, typer.Option(
        help="Reuse this job's id to resume its last checkpoint (a-z, 0-9, '.', '_', '-'; the run of "
             "another manifest under the same id is refused).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the published version as JSON.")] = False,
) -> None:
    """Train one adapter now, in the foreground, publish it and print its reference.

    Runs on the cluster at RAY_ADDRESS, else the farm `farm up` started, else a local Ray of its own."""
    from farm.cluster import use_running_farm
    from farm.manifest import load_manifest
    from farm.names import check_job_id

    manifest = load_manifest(file)  # invalid manifests fail before anything heavy is imported
    if job_id is not None:
        check_job_id(job_id)  # it names run storage: nothing that could leave its folder
    use_running_farm()

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from farm.parity import serving_logprobs
    from farm.train.run import new_job_id, run_job

    job_id = job_id or new_job_id()
    out = sys.stdout
    if json_out:  # Ray prints its own warnings (the raylet's, at any time, even at exit) with print():
        sys.stdout = sys.stderr  # under --json they go to stderr and stdout holds the JSON document alone
    if not json_out:
        console.print(f"job [bold]{job_id}[/]: {manifest.summary()}")
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=json_out) as bar:
        task = bar.add_task("loading", total=None, stats="")

        def on_progress(m: dict) -> None:
            if m.get("event") in ("cpu_fallback", "gate"):
                bar.console.print(f"[yellow]note:[/] {m['message']}")
                return
            if "step" not in m:
                return
            stats = f"loss {m['loss']:.3f}  {m['tokens_per_s']:.0f} tok/s" if "loss" in m else ""
            if "eval_loss" in m:
                stats += f"  eval {m['eval_loss']:.3f}"
            bar.update(task, description="training", completed=m["step"], total=m["total_steps"], stats=stats)

        version = run_job(manifest, job_id=job_id, on_progress=on_progress, check_parity=serving_logprobs)
    if json_out:
        print_json(version.to_json(), file=out)
        out.flush()
        return
    metrics = version.metadata.get("metrics", {})
    shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    console.print(f"[green]published[/] [bold]{version.ref}[/]  {shown}")
    console.print(f"  at {version.uri}")


def register(app: typer.Typer) -> None:
    app.command()(train)
