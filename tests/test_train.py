"""Training end to end on real local Ray Train: manifest -> NF4 base + LoRA -> published adapter.

Each Ray Train run costs ~20 s of overhead here, so these tests are few and use short runs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import yaml

from farm.catalog import Catalog
from farm.errors import DataError, ManifestError, QueueError
from farm.manifest import load_manifest, parse_manifest
from farm.train.run import new_job_id, run_job

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data"

pytestmark = pytest.mark.ray


def _causal_manifest(tiny_llama: Path, **training) -> dict:
    return {
        "customer": "customer_x",
        "adapter": "support-bot",
        "base_model": str(tiny_llama),
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
        "dataset": {
            "train": str(DATA / "customer_x_train.jsonl"),
            "eval": str(DATA / "customer_x_eval.jsonl"),
            "format": "prompt_completion",
        },
        "training": {"max_steps": 30, "learning_rate": 3e-3, "batch_size": 16, "max_seq_len": 64, **training},
        "resources": {"gpus": 1},
    }


def _eval_loss(model, tokenizer, manifest) -> float:
    """Token-weighted eval loss on the job's eval data (the farm's own data pipeline + evaluate)."""
    from farm.train.data import Collator, prepare_data
    from farm.train.modelops import evaluate

    data = prepare_data(manifest.dataset, task="causal_lm", tokenizer=tokenizer, max_seq_len=64, seed=0)
    rows = {c: data.eval[c] for c in ("input_ids", "attention_mask", "labels")}
    return evaluate(model, rows, Collator(tokenizer.pad_token_id), 16, "cpu", "causal_lm")["eval_loss"]


def test_causal_job_publishes_an_adapter_stock_peft_loads(ray_cluster, farm_home, tiny_llama):
    from peft import PeftModel

    from farm.modeling import Quantization, load_base_model, load_tokenizer

    manifest = parse_manifest(_causal_manifest(tiny_llama, eval_every=10, checkpoint_every=10))
    events: list[dict] = []
    version = run_job(manifest, job_id="job-causal", on_progress=events.append)

    assert version.ref == "customer_x/support-bot@v1"
    steps = [e["step"] for e in events if "loss" in e]
    assert steps == list(range(1, 31)), "a progress event per optimizer step"
    # One definition of cost (farm.costs): what the queue would charge this single attempt is what
    # farm.json records; on CPU the job counts as one accelerator.
    from farm.costs import attempt_cost

    charged = attempt_cost([e for e in events if "attempt_seconds" in e][-1], elapsed=0.0)
    assert charged["tokens"] == version.metadata["tokens_trained"] > 0
    assert charged["accelerator_seconds"] == pytest.approx(version.metadata["accelerator_seconds"])
    assert version.metadata["worker_seconds"] > 0
    assert version.metadata["accelerator_seconds"] == pytest.approx(version.metadata["worker_seconds"])
    assert any(e.get("event") == "cpu_fallback" for e in events), "gpus: 1 on a CPU cluster says so"

    meta = version.metadata
    assert meta["job_id"] == "job-causal"
    assert meta["manifest_sha256"] == manifest.content_hash()
    assert meta["quantization"]["mode"] == "nf4" and meta["device"] == "cpu"
    assert meta["steps"] == 30 and meta["tokens_trained"] > 0
    assert meta["params"]["trainable"] < meta["params"]["total"]
    assert meta["datasets"]["train"]["rows"] == 480
    assert [h["step"] for h in meta["metrics_history"] if "eval_loss" in h] == [10, 20, 30]
    for lib in ("torch", "transformers", "peft", "bitsandbytes"):
        assert meta["versions"][lib]

    # Stock PEFT loads the fetched version on the NF4 base, and it beats the base on eval data.
    path = Catalog().fetch(version)
    assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()
    assert (path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    tok = load_tokenizer(str(tiny_llama))
    base_loss = _eval_loss(load_base_model(str(tiny_llama), quant=Quantization()), tok, manifest)
    tuned = PeftModel.from_pretrained(load_base_model(str(tiny_llama), quant=Quantization()), path)
    tuned_loss = _eval_loss(tuned, tok, manifest)
    assert tuned_loss < base_loss - 1.0, (tuned_loss, base_loss)
    assert tuned_loss == pytest.approx(meta["metrics"]["eval_loss"], rel=1e-3)


def test_gpt2_seq_cls_job_trains_and_saves_its_head(ray_cluster, farm_home, tiny_gpt2, tmp_path):
    from safetensors import safe_open

    raw = yaml.safe_load((REPO / "jobs" / "customer_y.yaml").read_text())
    raw["base_model"] = str(tiny_gpt2)
    raw["dataset"]["train"] = str(DATA / "customer_y_reviews.jsonl")
    raw["training"].update({"epochs": None, "max_steps": 25, "eval_every": 5, "early_stopping_patience": None})
    manifest = parse_manifest(raw)
    version = run_job(manifest, job_id="job-seqcls")

    assert version.metadata["label_names"] == ["negative", "neutral", "positive"]
    assert version.metadata["metrics"]["eval_accuracy"] > 0.6
    path = Catalog().fetch(version)
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(".score." in k for k in keys), "the classification head is saved with the adapter"
    assert any("c_attn.lora_A" in k for k in keys), "LoRA on GPT-2's fused Conv1D projection"
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "score" in (cfg["modules_to_save"] or [])


def test_bad_data_fails_before_training(farm_home, tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    raw = _causal_manifest(tiny_llama)
    raw["dataset"] = {"train": str(bad), "eval": str(bad), "format": "prompt_completion"}
    with pytest.raises(DataError, match="completion"):
        run_job(parse_manifest(raw), job_id=new_job_id())
    with pytest.raises(QueueError, match="bad job id '../escape'"):
        run_job(parse_manifest(raw), job_id="../escape")  # checked before anything else
    assert not (farm_home / "runs").exists(), "no Ray Train run was started"


def test_farm_train_cli_reports_bad_manifest_without_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "job.yaml"
    bad.write_text("customer: Acme\nadapter: x\n")
    farm = Path(sys.executable).with_name("farm")
    proc = subprocess.run([str(farm), "train", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "customer" in proc.stderr and "Traceback" not in proc.stderr
    assert "base_model: required field is missing" in proc.stderr
    with pytest.raises(ManifestError):
        load_manifest(bad)

    # --job-id names run storage: refused before anything is loaded (no `..`, no odd characters).
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_causal_manifest(tmp_path / "no-such-model")))
    for bad_id in ("../other", "Acme-1", "a/b"):
        proc = subprocess.run([str(farm), "train", str(good), "--job-id", bad_id], capture_output=True, text=True)
        assert proc.returncode != 0 and f"bad job id {bad_id!r}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_killed_worker_resumes_and_early_stopping_publishes_the_best_weights_once(ray_cluster, farm_home, tiny_llama):
    """A killed worker resumes, and early stopping holds across the restart. SIGKILL the Ray Train worker
    after its first registered checkpoint: Ray Train restarts it (max_failures=1), it resumes at the
    step after that checkpoint with the best weights so far, stops at the next worse eval (a learning
    rate far too high makes eval loss stop improving), and publishes once an adapter that scores exactly
    the best eval loss (not the weights it stopped with). A re-run of the same job id publishes nothing.
    A checkpoint handed to ray.train.report counts once the controller has registered it, which it
    records in the run's checkpoint_manager_snapshot.json: the kill waits for that."""
    from peft import PeftModel

    from farm.modeling import Quantization, load_base_model, load_tokenizer

    manifest = parse_manifest({
        **_causal_manifest(tiny_llama, max_steps=40, eval_every=4, checkpoint_every=4, early_stopping_patience=2,
                           learning_rate=0.5, batch_size=64),
        "resources": {"gpus": 0, "max_failures": 1},
    })
    killed = threading.Event()
    events: list[dict] = []
    snapshot = farm_home / "runs" / "farm-job-early-kill" / "checkpoint_manager_snapshot.json"

    def checkpoint_registered() -> bool:
        try:
            return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
        except (OSError, ValueError):
            return False

    def on_progress(m: dict) -> None:
        events.append(m)
        if not killed.is_set() and "pid" in m and checkpoint_registered():
            killed.set()
            os.kill(m["pid"], signal.SIGKILL)

    version = run_job(manifest, job_id="job-early-kill", on_progress=on_progress)
    meta = version.metadata
    resumed = [e for e in events if e.get("attempt_resumed_from") is not None]
    assert killed.is_set() and resumed, "the worker was killed and a new one resumed"
    start = resumed[0]["attempt_resumed_from"]
    evals = [h for h in meta["metrics_history"] if "eval_loss" in h and "loss" in h]
    best = min(evals, key=lambda h: h["eval_loss"])
    assert start > 0 and start % 4 == 0 and resumed[0]["step"] == start + 1
    assert resumed[0]["pid"] != events[0]["pid"], "a new worker process"
    assert meta["stopped_early"] is True and meta["steps"] == evals[-1]["step"] > start
    # The stored history is continuous: each step once, in order, despite the restart.
    assert [h["step"] for h in meta["metrics_history"] if "loss" in h] == list(range(1, meta["steps"] + 1))
    assert best["step"] <= start, f"the best eval (step {best['step']}) came before the restart (step {start})"
    assert evals[-1]["eval_loss"] > best["eval_loss"], "it stopped at a worse eval, and published the best one"
    assert meta["metrics"]["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-4)

    # The published adapter itself scores the best eval loss on the same eval data.
    tok = load_tokenizer(str(tiny_llama))
    model = PeftModel.from_pretrained(load_base_model(str(tiny_llama), quant=Quantization()), Catalog().fetch(version))
    assert _eval_loss(model, tok, manifest) == pytest.approx(best["eval_loss"], rel=1e-3)

    # Running the same job id again (a scheduler retry after a crash) publishes nothing new.
    again = run_job(manifest, job_id="job-early-kill")
    assert again.ref == version.ref
    assert [v.ref for v in Catalog().versions("customer_x", "support-bot")] == [version.ref]
