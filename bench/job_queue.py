"""Queue and scheduler benchmark.

  .venv/bin/python bench/job_queue.py [--latency-jobs 20] [--burst-jobs 100] [--fair-jobs 1000] [--customers 100]

1. submit -> running: one trivial job at a time on an idle scheduler (real local Ray, the production
   poll period, woken on submit as `farm submit` does): time to `running` in the queue, and to the
   runner executing inside its Ray task.
2. per-job scheduling overhead: a burst of trivial jobs on 1 slot; wall time / jobs.
3. fairness at scale, store only: 1,000 queued jobs from 100 customers (one customer holds half of
   them): time to compute the whole fair order, and to dispatch all of them one by one through the
   store (claim + succeed); checks that every customer is served within the first round.

Prints a table and writes bench/results/job_queue.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a fresh clone without installing

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402


def _manifest(customer: str, adapter: str, priority: int = 0):
    from farm.manifest import parse_manifest

    return parse_manifest({"customer": customer, "adapter": adapter, "base_model": "tiny/llama", "priority": priority,
                           "dataset": {"train": "/data/train.jsonl"}, "training": {"max_steps": 1}})


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench_fairness(home: Path, n_jobs: int, n_customers: int) -> dict:
    from farm.queue import SQLiteStore

    rng = random.Random(0)
    store = SQLiteStore(home / "fair.db")
    # One heavy customer with half the jobs, the rest spread over the others; submitted interleaved.
    owners = ["c000"] * (n_jobs // 2) + [f"c{rng.randrange(1, n_customers):03d}" for _ in range(n_jobs - n_jobs // 2)]
    missing = [f"c{i:03d}" for i in range(1, n_customers) if f"c{i:03d}" not in owners]
    owners[-len(missing):] = missing if missing else owners[-1:]  # every customer has at least one job
    rng.shuffle(owners)
    manifests = [_manifest(c, f"a{i}") for i, c in enumerate(owners)]
    t0 = time.perf_counter()
    for m in manifests:
        store.submit(m)
    submit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    positions = store.queue_positions()
    order_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    served = []
    while (job := store.claim_next("bench", lease_ttl=60)) is not None:
        served.append(job.customer)
        store.succeed(job.id, job.lease_id, adapter_ref=None)
    drain_s = time.perf_counter() - t0
    customers = set(owners)
    first_round = served[: len(customers)]
    store.close()
    return {
        "jobs": len(manifests), "customers": len(customers), "heavy_customer_jobs": owners.count("c000"),
        "submit_s": submit_s, "order_s": order_s, "ordered": len(positions),
        "dispatch_all_s": drain_s, "dispatch_per_job_ms": 1000 * drain_s / len(served),
        "every_customer_in_first_round": set(first_round) == customers,
        "heavy_customer_in_first_round": first_round.count("c000"),
    }


def bench_ray(home: Path, latency_jobs: int, burst_jobs: int) -> dict:
    import ray

    from farm import scheduler
    from farm.queue import SQLiteStore

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False, logging_level="WARNING")
    ray_start_s = time.perf_counter() - t0
    store = SQLiteStore(home / "queue.db")
    name = f"bench-{uuid.uuid4().hex[:6]}"
    cfg = scheduler.SchedulerConfig(name=name, namespace="farm-bench", runner="farm.scheduler:noop_runner",
                                    slots=1, env={"FARM_HOME": str(home)})
    t0 = time.perf_counter()
    actor = scheduler.start(cfg)
    actor_start_s = time.perf_counter() - t0
    try:
        def run_one(i: int, wake: bool = True) -> tuple[float, float]:
            job_id = store.submit(_manifest("lat", f"j{i}")).job_id
            if wake:
                actor.wake.remote()  # what `farm submit` does
            while not store.get(job_id).done:
                time.sleep(0.005)
            job = store.get(job_id)
            return job.first_started_at - job.created_at, job.progress["started_at"] - job.created_at

        run_one(-1)  # warm: the first task starts a worker process
        lat = [run_one(i) for i in range(latency_jobs)]
        to_running = [a for a, _ in lat]
        to_runner = [b for _, b in lat]
        polled = [run_one(1000 + i, wake=False)[0] for i in range(latency_jobs)]  # e.g. a submit from SQL

        ids = [store.submit(_manifest(f"b{i % 10}", f"burst{i}")).job_id for i in range(burst_jobs)]
        t0 = time.perf_counter()
        actor.wake.remote()
        while not all(store.get(j).done for j in ids):
            time.sleep(0.02)
        burst_s = time.perf_counter() - t0
        assert all(store.get(j).state.value == "succeeded" for j in ids)
    finally:
        ray.kill(actor, no_restart=True)
        store.close()
        ray.shutdown()
    return {
        "ray_start_s": ray_start_s, "scheduler_start_s": actor_start_s, "poll_s": cfg.poll_s,
        "latency_jobs": latency_jobs,
        "submit_to_running_ms": {"p50": 1000 * statistics.median(to_running), "p95": 1000 * _pct(to_running, 0.95),
                                 "max": 1000 * max(to_running)},
        "submit_to_runner_ms": {"p50": 1000 * statistics.median(to_runner), "p95": 1000 * _pct(to_runner, 0.95),
                                "max": 1000 * max(to_runner)},
        "submit_to_running_polled_ms": {"p50": 1000 * statistics.median(polled), "p95": 1000 * _pct(polled, 0.95),
                                        "max": 1000 * max(polled)},
        "burst_jobs": burst_jobs, "burst_wall_s": burst_s, "per_job_overhead_ms": 1000 * burst_s / burst_jobs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-jobs", type=int, default=20)
    ap.add_argument("--burst-jobs", type=int, default=100)
    ap.add_argument("--fair-jobs", type=int, default=1000)
    ap.add_argument("--customers", type=int, default=100)
    ap.add_argument("--out", default=str(HERE / "results" / "job_queue.json"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    with tempfile.TemporaryDirectory(prefix="farm-bench-queue-") as tmp:
        home = Path(tmp)
        os.environ["FARM_HOME"] = str(home)
        fair = bench_fairness(home, args.fair_jobs, args.customers)
        live = bench_ray(home, args.latency_jobs, args.burst_jobs)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "command": "python bench/job_queue.py " + " ".join(sys.argv[1:]), "ray": live, "fairness": fair}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    rows = [
        ("submit -> running (queue), p50 / p95 / max",
         "{p50:.0f} / {p95:.0f} / {max:.0f} ms".format(**live["submit_to_running_ms"])),
        ("submit -> runner executing in its Ray task, p50 / p95 / max",
         "{p50:.0f} / {p95:.0f} / {max:.0f} ms".format(**live["submit_to_runner_ms"])),
        ("submit -> running without the wake call (poll only), p50 / p95 / max",
         "{p50:.0f} / {p95:.0f} / {max:.0f} ms".format(**live["submit_to_running_polled_ms"])),
        (f"per-job scheduling overhead ({live['burst_jobs']} trivial jobs, 1 slot)",
         f"{live['per_job_overhead_ms']:.0f} ms ({live['burst_wall_s']:.1f} s total)"),
        (f"submit {fair['jobs']} jobs, {fair['customers']} customers (store)", f"{fair['submit_s']:.2f} s"),
        (f"fair order of {fair['ordered']} queued jobs", f"{1000 * fair['order_s']:.0f} ms"),
        (f"dispatch all {fair['jobs']} one by one (claim + succeed)",
         f"{fair['dispatch_all_s']:.2f} s ({fair['dispatch_per_job_ms']:.1f} ms/job)"),
        ("every customer served in the first round",
         f"{fair['every_customer_in_first_round']} (heavy customer: {fair['heavy_customer_in_first_round']} "
         f"of first {fair['customers']}, holds {fair['heavy_customer_jobs']} jobs)"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
