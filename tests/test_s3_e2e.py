"""`FARM_CATALOG=s3://…` end to end (issue 3): the real `farm train` CLI, in a subprocess, trains on
the shared Ray cluster with its base model, data, Ray Train checkpoints and catalog all on the
SeaweedFS S3 server, publishes there, and `farm adapters list/show/fetch` read the version back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data"
FARM = str(Path(sys.executable).with_name("farm"))

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def s3fs_for(server):
    import s3fs

    env = server.env
    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=server.endpoint_url, client_kwargs={"region_name": env["AWS_REGION"]},
                             skip_instance_cache=True, use_listings_cache=False)


def upload_inputs(server, prefix: str, model_dir: Path) -> dict[str, str]:
    """The tiny Llama and customer_x's data on S3: a job that names them depends on no local path."""
    fs = s3fs_for(server)
    root = prefix.removeprefix("s3://")
    fs.put(str(model_dir), f"{root}/models/llama", recursive=True)
    for name in ("customer_x_train.jsonl", "customer_x_eval.jsonl"):
        fs.put_file(str(DATA / name), f"{root}/data/{name}")
    return {"base_model": f"{prefix}/models/llama", "train": f"{prefix}/data/customer_x_train.jsonl",
            "eval": f"{prefix}/data/customer_x_eval.jsonl"}


def tiny_manifest(inputs: dict[str, str], *, customer: str, adapter: str, steps: int, checkpoint_every: int,
                  max_failures: int = 0) -> dict:
    return {
        "customer": customer, "adapter": adapter, "base_model": inputs["base_model"],
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "dataset": {"train": inputs["train"], "eval": inputs["eval"], "format": "prompt_completion"},
        "training": {"max_steps": steps, "batch_size": 4, "max_seq_len": 32, "learning_rate": 3e-3,
                     "checkpoint_every": checkpoint_every},
        "resources": {"gpus": 0, "max_failures": max_failures},
    }


def test_farm_train_publishes_to_s3_catalog_and_adapters_cli_reads_it(ray_cluster, s3_server, farm_home, tiny_llama,
                                                                     tmp_path):
    prefix = s3_server.url("e2e")
    inputs = upload_inputs(s3_server, prefix, tiny_llama)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(tiny_manifest(inputs, customer="acme", adapter="helpdesk", steps=4,
                                                     checkpoint_every=2)))
    env = {**os.environ, **s3_server.env, "FARM_HOME": str(farm_home), "FARM_CATALOG": f"{prefix}/catalog",
           "FARM_STORAGE": f"{prefix}/runs", "RAY_ADDRESS": ray_cluster}

    def farm(*args: str, timeout: int = 300) -> str:
        proc = subprocess.run([FARM, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
        assert proc.returncode == 0, f"farm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
        return proc.stdout

    trained = json.loads(farm("train", str(manifest), "--job-id", "acme-s3e2e", "--json"))
    assert trained["ref"] == "acme/helpdesk@v1"

    fs = s3fs_for(s3_server)
    root = prefix.removeprefix("s3://")
    assert fs.exists(f"{root}/runs/farm-acme-s3e2e/checkpoint_manager_snapshot.json")  # Ray Train on S3
    assert fs.find(f"{root}/catalog")  # the catalog is on S3, nothing under FARM_HOME
    assert not (farm_home / "catalog").exists() and not (farm_home / "runs").exists()

    listed = json.loads(farm("adapters", "list", "--customer", "acme", "--json"))
    assert [row["ref"] for row in listed] == ["acme/helpdesk@v1"], listed
    shown = json.loads(farm("adapters", "show", "acme/helpdesk", "--json"))
    assert shown["ref"] == "acme/helpdesk@v1"
    assert shown["metadata"]["job_id"] == "acme-s3e2e" and shown["metadata"]["steps"] == 4
    dest = tmp_path / "fetched"
    farm("adapters", "fetch", "acme/helpdesk@v1", str(dest))
    assert (dest / "adapter_config.json").exists() and (dest / "adapter_model.safetensors").exists()

    # Stock PEFT loads the fetched adapter on the base.
    from peft import PeftModel

    from farm.modeling import load_base_model

    PeftModel.from_pretrained(load_base_model(str(tiny_llama), device="cpu"), str(dest))
