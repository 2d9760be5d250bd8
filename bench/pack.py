"""Packed training vs one Ray Train run per job: the same 8 small jobs of 8 customers on one slot.

Two phases on one local Ray, each with its own FARM_HOME and scheduler (slots=1), the same jobs:
  single  - `--pack-max 1`: today's path, each job its own Ray Train run and base load;
  packed  - `--pack-max K` (default 8): jobs share one resident base in one Ray Train run.
In the packed phase the last job is submitted only once the pack is training, and its queue ->
first-step latency is the join latency of a job joining a warm pack (goal <= 2 s).

Prints and writes bench/results/pack.json:
  makespan (first submit -> last publish) of each phase and single/packed = jobs-per-hour ratio
  (goal >= 3x), aggregate training tokens/s (all jobs' tokens over the makespan) and its ratio,
  the join latency.

    python bench/pack.py [--jobs 8] [--steps 30] [--pack-max 8] [--base models/tiny-llama]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _manifest(base: str, i: int, steps: int):
    from farm.manifest import Manifest, load_manifest

    doc = load_manifest(REPO / "jobs" / "customer_x.yaml").model_dump(mode="json")
    doc.update(customer=f"bench_c{i}", adapter="bot", base_model=base)
    doc["lora"].update(modules_to_save=None, r=4 + 4 * (i % 3))
    doc["training"].update(max_steps=steps, eval_every=None, checkpoint_every=None, batch_size=4, seed=i,
                           learning_rate=1e-3)
    return Manifest.model_validate(doc)


def _first_step_at(store, job_id: str, timeout: float = 600) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = store.get(job_id)
        if job.progress.get("step", 0) >= 1 or job.done:
            return time.time()
        time.sleep(0.02)
    raise SystemExit(f"job {job_id} never started")


def phase(name: str, base: str, jobs: int, steps: int, pack_max: int, home: Path) -> dict:
    from farm import scheduler
    from farm.queue import JobState, SQLiteStore

    home.mkdir(parents=True)
    os.environ["FARM_HOME"] = str(home)
    store = SQLiteStore(home / "queue.db")
    cfg = scheduler.SchedulerConfig(name=f"bench-pack-{uuid.uuid4().hex[:6]}", namespace="farm-bench", slots=1,
                                    poll_s=0.05, pack_max=pack_max, pack_linger_s=1.0, env={"FARM_HOME": str(home)})
    actor = scheduler.start(cfg)
    join = None
    try:
        t0 = time.time()
        late = jobs - 1 if pack_max > 1 else None
        ids = [store.submit(_manifest(base, i, steps)).job_id for i in range(jobs) if i != late]
        if late is not None:
            _first_step_at(store, ids[0])  # the pack is warm: its first job trains
            time.sleep(1.0)
            submitted = time.time()
            jid = store.submit(_manifest(base, late, steps)).job_id
            scheduler.wake(cfg.name, cfg.namespace)
            join = _first_step_at(store, jid) - submitted
            joined = next((e.at for e in store.events(jid) if e.reason.startswith("joined pack")), None)
            if joined is not None:
                print(f"late job: submit -> joined pack {joined - submitted:.2f} s (scheduler), "
                      f"joined -> first step {join - (joined - submitted):.2f} s (driver + worker)", flush=True)
            ids.append(jid)
        deadline = time.time() + 3600
        while not all(store.get(j).done for j in ids) and time.time() < deadline:
            time.sleep(0.2)
        done = [store.get(j) for j in ids]
    finally:
        import ray

        ray.kill(actor, no_restart=True)
    bad = [f"{j.id}: {j.state.value} {j.last_error}" for j in done if j.state is not JobState.SUCCEEDED]
    if bad:
        raise SystemExit(f"{name}: jobs failed: {bad}")
    makespan = max(j.finished_at for j in done) - t0
    tokens = sum(j.tokens for j in done)
    packs = sorted({j.pack for j in done if j.pack})
    out = {"jobs": jobs, "steps": steps, "pack_max": pack_max, "makespan_s": makespan,
           "jobs_per_hour": 3600 * jobs / makespan, "tokens": tokens, "aggregate_tokens_per_s": tokens / makespan,
           "packs": len(packs), "join_latency_s": join}
    print(f"{name:7s} pack_max {pack_max}: makespan {makespan:.1f} s, {out['jobs_per_hour']:.0f} jobs/h, "
          f"{out['aggregate_tokens_per_s']:.0f} tokens/s, packs {len(packs)}"
          + (f", join latency {join:.2f} s" if join is not None else ""), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pack-max", type=int, default=8)
    ap.add_argument("--base", default=str(REPO / "models" / "tiny-llama"))
    ap.add_argument("--only", choices=("packed",), help="Run the packed phase alone (no ratios; for profiling).")
    ap.add_argument("--keep", type=Path, help="Keep each phase's FARM_HOME (job logs) under this folder.")
    args = ap.parse_args()
    if not Path(args.base).is_dir():
        sys.exit(f"--base {args.base}: no such model folder (run `make models`, or pass --base)")
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory(prefix="farm-bench-pack-") as tmp:
            work = args.keep or Path(tmp)
            if args.only == "packed":
                phase("packed", args.base, args.jobs, args.steps, args.pack_max, work / "packed")
                return
            single = phase("single", args.base, args.jobs, args.steps, 1, work / "single")
            packed = phase("packed", args.base, args.jobs, args.steps, args.pack_max, work / "packed")
    finally:
        ray.shutdown()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/pack.py " + " ".join(sys.argv[1:]),
        "single": single, "packed": packed,
        "jobs_per_hour_ratio": packed["jobs_per_hour"] / single["jobs_per_hour"],
        "tokens_per_s_ratio": packed["aggregate_tokens_per_s"] / single["aggregate_tokens_per_s"],
        "join_latency_s": packed["join_latency_s"],
        "goals": {"jobs_per_hour_ratio": 3.0, "join_latency_s": 2.0},
    }
    result["goals_met"] = {"jobs_per_hour_ratio": result["jobs_per_hour_ratio"] >= 3.0,
                           "join_latency_s": (packed["join_latency_s"] or 1e9) <= 2.0}
    print(f"packed / single: jobs/hour x{result['jobs_per_hour_ratio']:.2f} (goal >= 3), aggregate tokens/s "
          f"x{result['tokens_per_s_ratio']:.2f}, join latency {packed['join_latency_s']:.2f} s (goal <= 2 s)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pack.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
