"""Does the driver (the Ray head) keep a job's dataset in memory?

Builds the demo's tiny model, writes the demo's training set (jobs/data/customer_x_train.jsonl)
repeated 1x and SCALE x (default 50x) into a temp dir, and measures, each in a fresh process, the
peak RSS the driver's data step adds on top of the process after imports and a first tokenizer load
(RSS sampled every 2 ms during the step):

  old - what `prepare` did before the head stopped holding data: `prepare_data` (read the whole file,
        tokenize every row, keep it as datasets) plus the plain columns it shipped to the worker,
        serialized in-process the way `ray.put` serializes them (pickle protocol 5)
  new - `farm.train.run.prepare` as it is: a streaming check that keeps counts, not rows

and prints old/new at SCALE x and how much the new step grows from 1x to SCALE x (flat = ~0 MB).
Writes bench/results/data_rss.json.

    python bench/data_rss.py [--scale 50]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEMO = REPO / "jobs" / "data" / "customer_x_train.jsonl"

CHILD = r'''
import json, pickle, sys, time
import psutil
from farm.manifest import load_manifest
from farm.modeling import load_tokenizer
from farm.train import data as data_mod
from farm.train.run import prepare

mode, manifest_path = sys.argv[1], sys.argv[2]
m = load_manifest(manifest_path)
load_tokenizer(m.base_model)  # import-time and first-load costs belong to the baseline
import datasets  # noqa: F401 - the old path's import, paid before the baseline too
import threading
proc = psutil.Process()
base = proc.memory_info().rss
high = [base]
done = threading.Event()

def sample():  # RSS every 2 ms during the step: its own high-water mark, not the process's
    while not done.is_set():
        high[0] = max(high[0], proc.memory_info().rss)
        time.sleep(0.002)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
t0 = time.perf_counter()
if mode == "old":
    tok = load_tokenizer(m.base_model)
    t = m.training
    d = data_mod.prepare_data(m.dataset, task=m.task, tokenizer=tok, max_seq_len=t.max_seq_len, seed=t.seed,
                              labels=m.labels, num_labels=m.num_labels, packing=t.packing)
    cols = lambda ds: {c: ds[c] for c in ("input_ids", "attention_mask", "labels")}
    shipped = pickle.dumps((cols(d.train), cols(d.eval)), protocol=5)
    n_train, stats = len(d.train), d.stats
else:
    job = prepare(m, "bench-data-rss")
    n_train, stats = job.data.train_rows, job.data.stats
seconds = time.perf_counter() - t0
high[0] = max(high[0], proc.memory_info().rss)
done.set()
sampler.join()
peak = high[0]
print(json.dumps({"mode": mode, "seconds": seconds, "baseline_mb": base / 2**20, "peak_mb": peak / 2**20,
                  "added_peak_mb": (peak - base) / 2**20, "train_rows": n_train,
                  "rows": stats["train"]["rows"] + (0 if m.dataset.eval else stats["eval"]["rows"])}))
'''


def _manifest(tmp: Path, model: Path, data: Path) -> Path:
    import yaml

    raw = yaml.safe_load((REPO / "jobs" / "customer_x.yaml").read_text())
    raw["base_model"] = str(model)
    raw["dataset"] = {"train": str(data), "eval_fraction": 0.05, "format": "prompt_completion"}
    out = tmp / f"job-{data.stem}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def _child(mode: str, manifest: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(manifest)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{mode} on {manifest.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=50, help="copies of the demo training set (default 50)")
    args = ap.parse_args()

    from farm.tiny import build_all

    demo = DEMO.read_text()
    with tempfile.TemporaryDirectory(prefix="farm-bench-data-") as d:
        tmp = Path(d)
        model = build_all(tmp / "models", [DEMO])["llama"]
        env = {**os.environ, "FARM_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        results: dict = {"scale": args.scale, "demo_rows": demo.count("\n")}
        for scale in (1, args.scale):
            data = tmp / f"train-{scale}x.jsonl"
            data.write_text(demo * scale)
            manifest = _manifest(tmp, model, data)
            row = {"file_mb": data.stat().st_size / 2**20}
            for mode in ("old", "new"):
                started = time.time()
                row[mode] = _child(mode, manifest, env)
                print(f"{scale:>4}x {mode}: +{row[mode]['added_peak_mb']:.1f} MB peak over "
                      f"{row[mode]['baseline_mb']:.0f} MB, {row[mode]['seconds']:.2f} s in the step "
                      f"({row[mode]['rows']} rows, {time.time() - started:.1f} s with start-up)", flush=True)
            if row["old"]["train_rows"] != row["new"]["train_rows"]:
                sys.exit(f"old and new disagree on the training rows: {row['old']['train_rows']} vs {row['new']['train_rows']}")
            results[f"{scale}x"] = row
    big, small = results[f"{args.scale}x"], results["1x"]
    results["old_over_new_added_peak"] = big["old"]["added_peak_mb"] / max(big["new"]["added_peak_mb"], 1.0)
    results["new_growth_mb"] = big["new"]["added_peak_mb"] - small["new"]["added_peak_mb"]
    results["old_growth_mb"] = big["old"]["added_peak_mb"] - small["old"]["added_peak_mb"]
    results["new_over_old_seconds"] = big["new"]["seconds"] / max(big["old"]["seconds"], 1e-9)
    print(f"\nat {args.scale}x ({big['file_mb']:.1f} MB, {big['new']['rows']} rows): the driver's data step adds "
          f"{big['old']['added_peak_mb']:.1f} MB (old) vs {big['new']['added_peak_mb']:.1f} MB (new) of peak RSS: "
          f"old/new = {results['old_over_new_added_peak']:.1f}x (new counted as >= 1 MB)")
    print(f"growth 1x -> {args.scale}x: old +{results['old_growth_mb']:.1f} MB, new +{results['new_growth_mb']:.1f} MB; "
          f"step time new/old = {results['new_over_old_seconds']:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_rss.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
