"""Run every farm benchmark, then print one table and draw one summary plot (`make bench`).

Each bench/ script runs as its own subprocess with a time limit and writes its own
bench/results/<name>.json; this collects the files written during this run (an older file from an
earlier run is never reported as fresh), writes bench/results/summary.png (one panel per bench with
its headline figure) and bench/results/summary.json, and prints a table. A script that fails or
runs out of time is reported with the tail of its output (full log: bench/results/<name>.log);
the others still run, and the exit status is 1 if any failed.

    .venv/bin/python bench/run_all.py              # full sizes (tens of minutes on 2 cores)
    .venv/bin/python bench/run_all.py --quick      # small sizes, a few minutes
    .venv/bin/python bench/run_all.py --only job_queue --only serve
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

RESULTS = REPO / "bench" / "results"


@dataclass
class Bench:
    name: str  # bench/<name>.py writes bench/results/<name>.json
    args: list[str]
    quick_args: list[str]
    timeout_s: float
    headline: Callable[[dict], str]
    bars: Callable[[dict], tuple[str, dict[str, float]]]  # (y label, {bar label: value})
    log_scale: bool = False


def _get(d: dict, *path: str, default: Any = None) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _fmt(v: Any, spec: str = ".2f", unit: str = "") -> str:
    return f"{v:{spec}}{unit}" if isinstance(v, (int, float)) else "n/a"


# ---- what each bench's JSON holds (see each script) ---------------------------------------------


def _train_headline(r: dict) -> str:
    warm = r.get("farm_warm") or {}
    return (f"warm farm train: +{_fmt(warm.get('overhead_seconds'), '.1f', ' s')} over the bare loop, "
            f"tokens/s x{_fmt(warm.get('tokens_per_s_ratio'))}")


def _train_bars(r: dict) -> tuple[str, dict[str, float]]:
    return "wall s", {k: _get(r, k, "wall") for k in ("bare", "farm_cold", "farm_warm") if _get(r, k, "wall") is not None}


def _catalog_rows(r: dict) -> list[dict]:
    return [row for row in r.get("rows", []) if isinstance(row, dict)]


def _catalog_headline(r: dict) -> str:
    parts = []
    for row in _catalog_rows(r):
        backend = "local" if row.get("backend") == "local" else "s3"
        parts.append(f"{backend} {row.get('adapters'):,}: p99 {_fmt(_get(row, 'latest', 'p99_ms'), '.2f', ' ms')}, "
                     f"{_get(row, 'latest', 'requests_per_resolve_max', default='?')} req")
    return "resolve latest: " + "; ".join(parts) if parts else "no rows"


def _catalog_bars(r: dict) -> tuple[str, dict[str, float]]:
    bars = {}
    for row in _catalog_rows(r):
        backend = "local" if row.get("backend") == "local" else "s3"
        value = _get(row, "latest", "p99_ms")
        if value is not None:
            bars[f"{backend}\n{row.get('adapters'):,}"] = value
    return "p99 resolve ms (latest)", bars


def _queue_headline(r: dict) -> str:
    return (f"submit->running p95 {_fmt(_get(r, 'ray', 'submit_to_running_ms', 'p95'), '.0f', ' ms')}, "
            f"per-job overhead {_fmt(_get(r, 'ray', 'per_job_overhead_ms'), '.0f', ' ms')}, "
            f"fair order of {_get(r, 'fairness', 'ordered', default='?')} jobs "
            f"{_fmt((_get(r, 'fairness', 'order_s') or 0) * 1000, '.0f', ' ms')}")


def _queue_bars(r: dict) -> tuple[str, dict[str, float]]:
    bars = {
        "submit->running\np95": _get(r, "ray", "submit_to_running_ms", "p95"),
        "submit->runner\np95": _get(r, "ray", "submit_to_runner_ms", "p95"),
        "poll only\np95": _get(r, "ray", "submit_to_running_polled_ms", "p95"),
        "per job": _get(r, "ray", "per_job_overhead_ms"),
    }
    return "ms", {k: v for k, v in bars.items() if v is not None}


def _serve_headline(r: dict) -> str:
    return (f"32 adapters / 1 adapter = {_fmt(r.get('a_spread_over_single'))} (goal >= 0.8); "
            f"farm / PEFT-swap baseline = {_fmt(r.get('b_farm_over_baseline'))}x (goal >= 5); "
            f"cold load p99 {_fmt(_get(r, 'cold_load_local', 'p99_ms'), '.0f', ' ms')} (goal <= 100)")


def _serve_bars(r: dict) -> tuple[str, dict[str, float]]:
    names = {"farm_1_adapter": "farm\n1 adapter", "farm_32_adapters": "farm\nmany adapters",
             "baseline_32_adapters": "PEFT swap\nbaseline"}
    return "requests/s", {label: _get(r, k, "req_per_s") for k, label in names.items() if _get(r, k, "req_per_s") is not None}


def _data_headline(r: dict) -> str:
    big = r.get(f"{r.get('scale')}x") or {}
    return (f"driver data step at {r.get('scale')}x demo: +{_fmt(_get(big, 'old', 'added_peak_mb'), '.0f', ' MB')} old, "
            f"+{_fmt(_get(big, 'new', 'added_peak_mb'), '.0f', ' MB')} new peak RSS "
            f"(x{_fmt(r.get('old_over_new_added_peak'), '.0f')}); new grows {_fmt(r.get('new_growth_mb'), '.1f', ' MB')} from 1x")


def _data_bars(r: dict) -> tuple[str, dict[str, float]]:
    bars = {}
    for scale in ("1x", f"{r.get('scale')}x"):
        for mode in ("old", "new"):
            v = _get(r, scale, mode, "added_peak_mb")
            if v is not None:
                bars[f"{mode}\n{scale}"] = v
    return "MB added to peak RSS", bars


def _pack_headline(r: dict) -> str:
    return (f"packed / one run per job: jobs/hour x{_fmt(r.get('jobs_per_hour_ratio'))} (goal >= 3), "
            f"tokens/s x{_fmt(r.get('tokens_per_s_ratio'))}, join latency {_fmt(r.get('join_latency_s'), '.2f', ' s')} "
            f"(goal <= 2 s)")


def _pack_bars(r: dict) -> tuple[str, dict[str, float]]:
    bars = {"one run\nper job": _get(r, "single", "makespan_s"), "packed": _get(r, "packed", "makespan_s")}
    return "makespan s (8 jobs)", {k: v for k, v in bars.items() if v is not None}


def _solo_headline(r: dict) -> str:
    return f"solo job, engine / whole PEFT model step time: x{_fmt(r.get('ratio_engine_over_peft'), '.3f')} (goal <= 1.10)"


def _solo_bars(r: dict) -> tuple[str, dict[str, float]]:
    import statistics

    bars = {k: statistics.median(r[f"{k}_ms"]) for k in ("engine", "peft") if r.get(f"{k}_ms")}
    return "ms per optimizer step", bars


def _dpo_headline(r: dict) -> str:
    res = r.get("results") or {}
    return (f"held-out label accuracy base {_fmt(_get(res, 'base', 'label_accuracy'), '.3f')}, "
            f"SFT {_fmt(_get(res, 'sft', 'label_accuracy'), '.3f')}, DPO {_fmt(_get(res, 'dpo', 'label_accuracy'), '.3f')}; "
            f"DPO reward accuracy {_fmt(_get(res, 'dpo', 'reward_accuracy'), '.3f')}")


def _dpo_bars(r: dict) -> tuple[str, dict[str, float]]:
    res = r.get("results") or {}
    return "held-out label accuracy", {k: res[k]["label_accuracy"] for k in ("base", "sft", "dpo") if k in res}


def _tinker_headline(r: dict) -> str:
    return (f"Tinker API, {r.get('clients')} clients together / one after another: total steps/s "
            f"x{_fmt(r.get('together_over_sequential'))}")


def _tinker_bars(r: dict) -> tuple[str, dict[str, float]]:
    bars = {"one after\nanother": _get(r, "sequential", "total_steps_per_s"),
            "together": _get(r, "together", "total_steps_per_s")}
    return "total steps/s", {k: v for k, v in bars.items() if v is not None}


BENCHES = [
    Bench("train_overhead", [], ["--steps", "20"], 1200, _train_headline, _train_bars),
    Bench("catalog", [], ["--quick"], 900, _catalog_headline, _catalog_bars, log_scale=True),
    Bench("job_queue", [], ["--latency-jobs", "5", "--burst-jobs", "20", "--fair-jobs", "300", "--customers", "100"],
          600, _queue_headline, _queue_bars),
    Bench("serve", [], ["--requests", "64", "--baseline-requests", "16", "--no-routing", "--no-s3"],
          1200, _serve_headline, _serve_bars),
    Bench("data_rss", [], ["--scale", "20"], 600, _data_headline, _data_bars),
    Bench("pack", [], ["--jobs", "4", "--steps", "10"], 1800, _pack_headline, _pack_bars),
    Bench("solo_engine", ["--base", str(REPO / "models" / "smollm2-135m-instruct"), "--steps", "10", "--warmup", "2"],
          ["--rounds", "2"], 1800, _solo_headline, _solo_bars),
    Bench("dpo", [], ["--steps", "10", "--eval-rows", "60"], 1800, _dpo_headline, _dpo_bars),
    Bench("tinker_packing", [], ["--clients", "2", "--steps", "3"], 600, _tinker_headline, _tinker_bars),
]


# ---- running ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    command: str
    status: str = "ok"  # ok | failed | timeout | missing
    seconds: float = 0.0
    detail: str = ""
    result: dict | None = None
    tail: list[str] = field(default_factory=list)


def _pump(stream, name: str, log, tail: collections.deque) -> None:
    for line in iter(stream.readline, ""):
        log.write(line)
        log.flush()
        tail.append(line.rstrip("\n"))
        print(f"[{name}] {line}", end="", flush=True)


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the script and everything it started in its session (its own process group)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_one(bench: Bench, args: list[str], timeout_s: float) -> Outcome:
    script = REPO / "bench" / f"{bench.name}.py"
    out_json = RESULTS / f"{bench.name}.json"
    cmd = [sys.executable, str(script), *args]
    shown = " ".join(["python", f"bench/{bench.name}.py", *args])
    outcome = Outcome(bench.name, shown)
    if not script.exists():
        outcome.status, outcome.detail = "missing", f"{script.relative_to(REPO)} does not exist"
        return outcome
    started = time.time()
    tail: collections.deque = collections.deque(maxlen=15)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(RESULTS / f"{bench.name}.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        reader = threading.Thread(target=_pump, args=(proc.stdout, bench.name, log, tail), daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = None
        reader.join(timeout=10)
    outcome.seconds = time.time() - started
    outcome.tail = list(tail)
    fresh = out_json.exists() and out_json.stat().st_mtime >= started
    if code is None:
        outcome.status, outcome.detail = "timeout", f"stopped after {timeout_s:.0f} s"
    elif code != 0:
        outcome.status, outcome.detail = "failed", f"exit code {code}"
    elif not fresh:
        outcome.status, outcome.detail = "failed", f"exited 0 but did not write {out_json.relative_to(REPO)}"
    if outcome.status == "ok":
        try:
            outcome.result = json.loads(out_json.read_text())
        except ValueError as exc:
            outcome.status, outcome.detail = "failed", f"{out_json.name} is not JSON: {exc}"
    return outcome


def headline(bench: Bench, outcome: Outcome) -> str:
    if outcome.result is None:
        return f"{outcome.status.upper()}: {outcome.detail}"
    try:
        return bench.headline(outcome.result)
    except Exception as exc:  # noqa: BLE001 - a changed JSON shape must not lose the other benches
        return f"(cannot read headline: {type(exc).__name__}: {exc})"


def plot(benches: list[Bench], outcomes: list[Outcome], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    n = len(outcomes)
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    for ax, bench, outcome in zip(axes.flat, benches, outcomes):
        head = "\n".join(textwrap.wrap(headline(bench, outcome), 70))
        ax.set_title(f"{bench.name}\n{head}", fontsize=9, loc="left")
        bars: dict[str, float] = {}
        ylabel = ""
        if outcome.result is not None:
            try:
                ylabel, bars = bench.bars(outcome.result)
            except Exception:  # noqa: BLE001
                bars = {}
        if bars:
            labels, values = list(bars), [float(v) for v in bars.values()]
            ax.bar(range(len(values)), values, color="#4c72b0")
            ax.set_xticks(range(len(values)), labels, fontsize=8)
            ax.set_ylabel(ylabel)
            if bench.log_scale and min(values) > 0:
                ax.set_yscale("log")
            for i, v in enumerate(values):
                ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no figures" if outcome.result is not None else outcome.status.upper(),
                    ha="center", va="center", fontsize=14, color="#c44e52", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Small sizes: a smoke run of every bench.")
    ap.add_argument("--only", action="append", choices=[b.name for b in BENCHES], help="Run just these (repeatable).")
    ap.add_argument("--timeout", type=float, help="Time limit per script in seconds (default: per bench).")
    args = ap.parse_args(argv)

    RESULTS.mkdir(parents=True, exist_ok=True)
    benches = [b for b in BENCHES if not args.only or b.name in args.only]
    outcomes = []
    for bench in benches:
        bench_args = bench.quick_args if args.quick else bench.args
        limit = args.timeout or (min(bench.timeout_s, 600) if args.quick else bench.timeout_s)
        print(f"=== {bench.name}: python bench/{bench.name}.py {' '.join(bench_args)} (limit {limit:.0f} s)", flush=True)
        outcomes.append(run_one(bench, bench_args, limit))

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    title = f"farm benchmarks{' (--quick)' if args.quick else ''} - {machine} - {time.strftime('%Y-%m-%d %H:%M')}"
    plot(benches, outcomes, RESULTS / "summary.png", title)
    summary = {
        "machine": machine, "quick": args.quick, "finished_at": time.time(),
        "benches": [{"name": o.name, "command": o.command, "status": o.status, "seconds": round(o.seconds, 1),
                     "detail": o.detail, "headline": headline(b, o)} for b, o in zip(benches, outcomes)],
    }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    width = max(len(b.name) for b in benches)
    print(f"\n{'bench':<{width}}  {'status':<8}{'time':>8}  headline")
    for bench, o in zip(benches, outcomes):
        print(f"{bench.name:<{width}}  {o.status:<8}{o.seconds:>7.0f}s  {headline(bench, o)}")
    failed = [o for o in outcomes if o.status != "ok"]
    for o in failed:
        print(f"\n--- {o.name} {o.status}: {o.detail} (log: bench/results/{o.name}.log); last lines:")
        print("\n".join(f"    {line}" for line in o.tail) or "    (no output)")
    print(f"\nwrote {RESULTS.relative_to(REPO)}/summary.png and summary.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
