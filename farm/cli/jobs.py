"""`farm up/down/submit/jobs/status/logs/cancel/retry`: thin commands over farm.queue (the store),
farm.cluster (Ray head + scheduler) and farm.scheduler. Ray is imported only by commands that need
the cluster (up, down, submit); the others read and write the queue file directly."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from farm.cli._common import console, err_console, print_json
from farm.names import pack_run_name, run_name
from farm.queue import JobState

if TYPE_CHECKING:
    from farm.queue import Job

JobArg = Annotated[str, typer.Argument(help="Job id, as printed by `farm submit` or `farm jobs`.")]


def _store():
    from farm.queue import open_store

    return open_store()


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0, time.time() - t)
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.0f}m" if s < 5400 else f"{s / 3600:.1f}h"


def _progress(job: Job) -> str:
    p = job.progress
    if not p.get("total_steps"):
        return "-"
    text = f"{p.get('step', 0)}/{p['total_steps']}"
    for key, label in (("loss", "loss"), ("eval_loss", "eval loss"), ("reward_accuracy", "reward acc"),
                       ("reward_margin", "margin"), ("eval_reward_accuracy", "eval reward acc")):
        if isinstance(p.get(key), (int, float)):  # reward_*: a dpo job (TRL's rewards/* metrics)
            text += f" {label} {p[key]:.3f}"
    return text


def _eta(job: Job) -> float | None:
    p = job.progress
    step, total = p.get("step") or 0, p.get("total_steps") or 0
    if job.state is not JobState.RUNNING or not job.started_at or step <= 0 or not total:
        return None
    return (time.time() - job.started_at) / step * max(0, total - step)


def _farm_up_message(info, started: bool) -> str:
    where = f"Ray at {info.address}" + (f", dashboard {info.dashboard_url}" if info.dashboard_url else "")
    where += f", metrics {info.metrics_url}" if info.metrics_url else ""
    return f"farm {'started' if started else 'running'}: {where}, scheduler {info.namespace}/{info.scheduler}"


def up(
    pack_max: Annotated[int | None, typer.Option("--pack-max", min=1, max=64, help="Jobs per pack (one shared base on one slot); 1 = every job alone. Default FARM_PACK_MAX, else 4 on CPU and derived from GPU memory on a GPU.")] = None,
) -> None:
    """Start the farm: a local Ray head on 127.0.0.1 (or the cluster at RAY_ADDRESS) and the scheduler."""
    from farm import cluster

    info, started = cluster.up(pack_max=pack_max)
    console.print(_farm_up_message(info, started))
    if pack_max is not None and not started:
        console.print(f"[yellow]the scheduler was already running and keeps its pack size; --pack-max {pack_max} "
                      "applies from the next start (`farm down`, then `farm up --pack-max`)[/yellow]")


def down() -> None:
    """Stop what `farm up` started under this FARM_HOME, and nothing else. Queued jobs stay queued."""
    from farm import cluster

    for line in cluster.down():
        console.print(line)


def submit(
    files: Annotated[list[Path], typer.Argument(help="Job manifest YAML files.")],
    priority: Annotated[int | None, typer.Option(min=-100, max=100, help="Override the manifests' priority.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show live progress; exit 0 only if all jobs succeed.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the jobs as JSON.")] = False,
    force: Annotated[bool, typer.Option("--force", help="A new job even if an identical one is active.")] = False,
    max_attempts: Annotated[int, typer.Option(min=1, max=100, help="Attempts before the job is failed.")] = 3,
) -> None:
    """Validate manifests and what they point at, and queue them; starts a farm first if none is running."""
    from farm import cluster
    from farm.errors import ManifestError
    from farm.preflight import load_checked

    manifests, bad = [], 0
    for f in files:  # all files (schema and referenced data/model) are checked before anything is queued
        try:
            manifests.append(load_checked(f)[0])
        except ManifestError as exc:
            bad += 1
            err_console.print(f"[red]✗[/] {exc}", markup=True, highlight=False)
    if bad:
        err_console.print(f"nothing queued: {bad} invalid manifest{'s' if bad > 1 else ''}")
        raise typer.Exit(1)
    store = _store()
    results = [store.submit(m, priority=priority, max_attempts=max_attempts, force=force) for m in manifests]
    out = err_console if json_out else console
    if cluster.running() is None and not os.environ.get("RAY_ADDRESS"):
        out.print("no farm running: starting one as `farm up` would")
    info, started = cluster.up()
    if started:
        out.print(_farm_up_message(info, started))
    from farm import scheduler

    scheduler.wake(info.scheduler, info.namespace)
    jobs = [store.get(r.job_id) for r in results]
    if json_out and not wait:
        print_json([{**j.to_dict(), "created": r.created} for j, r in zip(jobs, results)])
    elif not json_out:
        for j, r in zip(jobs, results):
            note = "" if r.created else "  (identical job already active: not queued again; --force for a new one)"
            console.print(f"{j.id}  {j.state.value}  {j.name}  priority {j.priority}{note}")
    if wait:
        finals = _wait([j.id for j in jobs], store, quiet=json_out)
        if json_out:
            print_json([j.to_dict() for j in finals])
        if not all(j.state is JobState.SUCCEEDED for j in finals):
            raise typer.Exit(1)


def _wait(job_ids: list[str], store, *, quiet: bool) -> list[Job]:
    """A live progress bar per job until all are final."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[steps]}"),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=quiet, disable=quiet) as bar:
        tasks = {j: bar.add_task(j, total=None, steps="", stats="queued") for j in job_ids}
        while True:
            jobs = [store.get(j) for j in job_ids]
            for job in jobs:
                p = job.progress
                stats = job.state.value
                if isinstance(p.get("loss"), (int, float)):
                    stats += f"  loss {p['loss']:.3f}"
                if isinstance(p.get("tokens_per_s"), (int, float)):
                    stats += f"  {p['tokens_per_s']:.0f} tok/s"
                if job.state is JobState.SUCCEEDED:
                    stats += f"  {job.adapter_ref or ''}"
                elif job.done and job.last_error:
                    stats += f"  {job.last_error[:80]}"
                total = p.get("total_steps") or (1 if job.done else None)
                done = total if job.state is JobState.SUCCEEDED else p.get("step", 0)
                steps = f"{done}/{total}" if total else ""
                bar.update(tasks[job.id], description=f"{job.id} {job.name}", total=total, completed=done or 0,
                           steps=steps, stats=stats)
            if all(j.done for j in jobs):
                return jobs
            time.sleep(0.5)


def jobs(
    customer: Annotated[str | None, typer.Option(help="Only this customer's jobs.")] = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state (queued, running, ...).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the jobs as JSON.")] = False,
) -> None:
    """List jobs, with each waiting job's place in the dispatch order."""
    from rich.table import Table

    from farm.queue import parse_state

    wanted = parse_state(state) if state else None
    store = _store()
    rows = store.list(customer=customer, state=wanted)
    positions = store.queue_positions()
    if json_out:
        print_json([{**j.to_dict(), "queue_position": positions.get(j.id)} for j in rows])
        return
    if not rows:
        console.print("no jobs" + (" matching the filters" if customer or state else ""))
        return
    table = Table(box=None, pad_edge=False)
    for col in ("JOB", "STATE", "ADAPTER", "PRIO", "POS", "STEP", "TRIES", "AGE"):
        table.add_column(col, no_wrap=True)
    table.add_column("RESULT", overflow="fold")
    for j in rows:
        p = j.progress
        step = f"{p.get('step', 0)}/{p['total_steps']}" if p.get("total_steps") else "-"
        result = j.adapter_ref or (j.last_error or "")[:80]
        table.add_row(j.id, j.state.value, j.name, str(j.priority), str(positions.get(j.id, "")), step,
                      f"{j.attempts}/{j.max_attempts}", _ago(j.created_at), result)
    console.print(table)


def status(
    job_id: Annotated[str | None, typer.Argument(
        help="Job id, as printed by `farm submit` or `farm jobs`; without one, the farm: jobs by state and "
             "each customer's cost (jobs and Tinker API use).")] = None,
    customer: Annotated[str | None, typer.Option(help="Without a job id: only this customer's cost.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the job (or the farm) as JSON.")] = False,
) -> None:
    """One job: state, progress, ETA, attempts, cost, adapter ref, events and where to look in Ray.
    Without a job id: jobs by state and each customer's cost, its jobs' and its Tinker API use."""
    from farm import cluster

    store = _store()
    if job_id is None:
        _farm_status(store, customer, json_out)
        return
    if customer is not None:
        raise typer.BadParameter("--customer goes without a job id (a job has one customer)", param_hint="--customer")
    job = store.get(job_id)
    events = store.events(job_id)
    info = cluster.read_state()
    dashboard = info.dashboard_url if info else None
    run = pack_run_name(job.pack) if job.pack else run_name(job.id)
    extra = {"eta_seconds": _eta(job), "queue_position": store.queue_positions().get(job.id),
             "ray_task_name": run, "ray_train_run": run, "dashboard_url": dashboard,
             "events": [e.__dict__ for e in events]}
    if json_out:
        print_json({**job.to_dict(manifest=True), **extra})
        return
    console.print(f"[bold]{job.id}[/]  {job.name}  [bold]{job.state.value}[/]  priority {job.priority}")
    if extra["queue_position"]:
        console.print(f"  queue position {extra['queue_position']}")
    if job.progress:
        eta = extra["eta_seconds"]
        console.print(f"  progress {_progress(job)}" + (f", ETA {eta:.0f} s" if eta is not None else ""))
    console.print(f"  attempts {job.attempts}/{job.max_attempts}; cost {job.accelerator_seconds:.1f} "
                  f"accelerator-s, {job.tokens} tokens")
    if job.adapter_ref:
        console.print(f"  adapter {job.adapter_ref}")
    if job.pack:
        console.print(f"  pack {job.pack} (trained with other jobs on one shared base)")
    if job.last_error:
        console.print(f"  last error: {job.last_error}")
    if job.state is JobState.RETRYING and job.next_attempt_at:
        console.print(f"  next attempt in {max(0.0, job.next_attempt_at - time.time()):.0f} s")
    console.print(f"  Ray: task and Train run {run}" + (f" on {dashboard}" if dashboard else ""))
    for e in events:
        when = time.strftime("%H:%M:%S", time.localtime(e.at))
        console.print(f"  {when}  {e.from_state or '-'} -> {e.to_state}: {e.reason}")


def _farm_status(store, customer: str | None, json_out: bool) -> None:
    """Jobs by state and each customer's cost: its jobs' (the jobs table) and its Tinker use (the usage table)."""
    from rich.table import Table

    from farm.queue.usage import customer_costs

    costs = customer_costs(store.job_costs(), store.usage(customer=customer))
    if customer is not None:
        costs = {c: v for c, v in costs.items() if c == customer}
    counts = store.counts()
    if json_out:
        print_json({"jobs": counts, "customers": {c: v.to_dict() for c, v in costs.items()}})
        return
    console.print("jobs: " + (", ".join(f"{n} {state}" for state, n in counts.items() if n) or "none"))
    if not costs:
        console.print("no usage yet" + (f" for customer {customer!r}" if customer else ""))
        return
    table = Table(box=None, pad_edge=False, title="cost per customer (jobs: every attempt; tinker: the Tinker API)",
                  title_justify="left")
    for col in ("CUSTOMER", "JOBS", "JOB ACCEL-S", "JOB TOKENS", "TINKER ACCEL-S", "TINKER TOKENS",
                "PROMPT / SAMPLED", "SAVES"):
        table.add_column(col, justify="left" if col == "CUSTOMER" else "right")
    for c, v in costs.items():
        table.add_row(c, str(v.jobs), f"{v.job_accelerator_seconds:.1f}", str(v.job_tokens),
                      f"{v.tinker_accelerator_seconds:.1f}", str(v.tinker_training_tokens),
                      f"{v.tinker_prefill_tokens} / {v.tinker_sampled_tokens}", str(v.tinker_checkpoints))
    console.print(table)


def logs(
    job_id: JobArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """Print a job's log: its attempts, progress, errors with tracebacks, scheduler notes."""
    from farm.names import job_log_path

    store = _store()
    job = store.get(job_id)
    path = job_log_path(job.id)
    pos = 0
    while True:
        if path.exists():
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                print(chunk, end="", flush=True)
        if not follow or job.done:
            break
        time.sleep(0.5)
        job = store.get(job_id)
    if not path.exists() and not follow:
        err_console.print(f"job {job_id} has no log yet ({job.state.value})")


def cancel(job_id: JobArg) -> None:
    """Cancel a job: a waiting one never starts; a running one stops within seconds, publishing nothing."""
    job = _store().request_cancel(job_id)
    if job.state is JobState.CANCELLED:
        console.print(f"{job.id} cancelled")
    else:
        console.print(f"{job.id} cancel requested: the scheduler stops it within seconds (`farm status {job.id}`)")


def retry(job_id: JobArg) -> None:
    """Re-queue a failed or cancelled job with a fresh attempt budget."""
    from farm import cluster

    job = _store().retry(job_id)
    hint = "" if cluster.running() or os.environ.get("RAY_ADDRESS") else " (no farm running: `farm up`)"
    console.print(f"{job.id} {job.state.value}{hint}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    for fn in (up, down, submit, jobs, status, logs, cancel, retry):
        app.command()(fn)
