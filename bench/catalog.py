"""Catalog benchmark: resolve latency and storage requests per resolve, at two catalog sizes, on a
local directory (up to 10,000 adapters: 100 customers x 100) and on a real S3 server (SeaweedFS).

    .venv/bin/python bench/catalog.py                 # full run; writes bench/results/catalog.json
    .venv/bin/python bench/catalog.py --quick         # smaller sizes, for a smoke run

Requests are counted by the store (S3: real HTTP requests, counted by a botocore hook), so
"requests per resolve" is what a serving replica pays each time it checks for a new version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a fresh clone without installing

from farm.catalog import Catalog  # noqa: E402
from farm.catalog.testing import write_dummy_adapter  # noqa: E402
from tests.fixtures.seaweedfs import start_seaweedfs  # noqa: E402


def publish_grid(cat: Catalog, srcs: list[Path], customers: range, adapters: int) -> int:
    """Publish adapters a0..a{adapters-1} for each customer c<i>; returns how many were published."""
    n = 0
    for c in customers:
        for a in range(adapters):
            cat.publish(f"c{c:03d}", f"a{a:03d}", srcs[(c + a) % len(srcs)], {"metrics": {"eval_loss": 1.0}})
            n += 1
    return n


def measure(cat: Catalog, refs: list[str], samples: int, seed: int = 0) -> dict:
    """Resolve `samples` random refs; latency percentiles (ms) and requests per resolve."""
    rng = random.Random(seed)
    lat, reqs = [], []
    for _ in range(samples):
        ref = rng.choice(refs)
        before = cat.store.requests
        t0 = time.perf_counter()
        cat.resolve(ref)
        lat.append((time.perf_counter() - t0) * 1000)
        reqs.append(cat.store.requests - before)
    lat.sort()
    return {
        "samples": samples,
        "p50_ms": round(statistics.median(lat), 3),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3),
        "requests_per_resolve_mean": round(statistics.mean(reqs), 3),
        "requests_per_resolve_max": max(reqs),
    }


def list_cost(cat: Catalog, customer: str) -> int:
    before = cat.store.requests
    cat.list(customer)
    return cat.store.requests - before


def run_backend(name: str, url: str, srcs: list[Path], sizes: list[tuple[int, int]], samples: int) -> list[dict]:
    """Grow the catalog through `sizes` (customers, adapters each) and measure at each size."""
    cat = Catalog(url)
    rows, done_customers = [], 0
    for customers, adapters in sizes:
        t0 = time.perf_counter()
        publish_grid(cat, srcs, range(done_customers, customers), adapters)
        publish_s = time.perf_counter() - t0
        done_customers = customers
        total = customers * adapters
        # Pinned refs hit v1; latest refs go through the pointer + probe; two adapters get a second version.
        cat.publish("c000", "a000", srcs[0], {})
        cat.set_alias("c000/a000@v1", "prod")
        latest = [f"c{c:03d}/a{a:03d}" for c in range(customers) for a in range(adapters)]
        row = {
            "backend": name,
            "adapters": total,
            "customers": customers,
            "publish_s": round(publish_s, 1),
            "latest": measure(Catalog(url), latest, samples),
            "pinned": measure(Catalog(url), [r + "@v1" for r in latest], samples, seed=1),
            "alias": measure(Catalog(url), ["c000/a000@prod"], min(samples, 200), seed=2),
            "list_one_customer_requests": list_cost(Catalog(url), "c000"),
        }
        rows.append(row)
        lt = row["latest"]
        print(f"  {name}: {total} adapters: latest p50 {lt['p50_ms']} ms p99 {lt['p99_ms']} ms, "
              f"{lt['requests_per_resolve_mean']} req/resolve (published in {publish_s:.0f}s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| backend | adapters | resolve | p50 ms | p99 ms | requests/resolve (mean, max) |\n"
            "|---|---:|---|---:|---:|---|")
    lines = [head]
    for r in rows:
        for kind in ("latest", "pinned", "alias"):
            m = r[kind]
            lines.append(f"| {r['backend']} | {r['adapters']:,} | {kind} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                         f"{m['requests_per_resolve_mean']:g}, {m['requests_per_resolve_max']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Small sizes (smoke run).")
    p.add_argument("--samples", type=int, default=2000, help="Resolves measured per size and kind.")
    p.add_argument("--no-s3", action="store_true", help="Skip the SeaweedFS part.")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "catalog.json")
    args = p.parse_args()

    local_sizes = [(1, 100), (100, 100)] if not args.quick else [(1, 20), (10, 20)]
    s3_sizes = [(1, 30), (10, 30)] if not args.quick else [(1, 10), (3, 10)]
    samples = args.samples if not args.quick else 200
    results: dict = {
        "command": " ".join(["python", "bench/catalog.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "rows": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="farm-bench-"))
    try:
        srcs = [write_dummy_adapter(tmp / f"src{i}", seed=i, extra=True) for i in range(8)]
        print("local directory catalog", flush=True)
        results["rows"] += run_backend("local", (tmp / "catalog").as_uri(), srcs, local_sizes, samples)
        if not args.no_s3:
            print("SeaweedFS S3 catalog (starting server)", flush=True)
            server = start_seaweedfs(tmp / "seaweedfs", bucket="farm-bench")
            try:
                os.environ.update(server.env)
                results["rows"] += run_backend("s3 (SeaweedFS)", server.url("bench"), srcs, s3_sizes,
                                               min(samples, 1000))
            finally:
                server.stop()
        report(results, args.out)
    finally:
        print(f"removing {tmp} (tens of thousands of files: takes a while)", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict, out: Path) -> None:
    print()
    print(table(results["rows"]))
    for r in results["rows"]:
        print(f"{r['backend']}, {r['adapters']:,} adapters: `list --customer c000` = "
              f"{r['list_one_customer_requests']} requests; published in {r['publish_s']} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}", flush=True)


if __name__ == "__main__":
    main()
