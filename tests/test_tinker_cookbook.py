"""tinker-cookbook 0.5.8 (its own environment, .venv-cookbook) against a real `farm serve` app on the
real SmolLM2 base.

* Its RL recipe `recipes/math_rl/train.py` (env=arithmetic), run as it ships with command-line
  settings only: it samples through the farm's serving engine, parses each sample with its renderer
  (which needs the stop token at the end), trains with importance_sampling, and the trainer's logprobs
  of the sampled tokens are the sampler's.
* Its supervised fine-tuning loop (`tinker_cookbook.supervised.train.main`, what recipes/sl_basic.py
  runs), through examples/tinker_cookbook_sft.py: its loss falls, its checkpoints are saved, a run on
  the same log path resumes from a saved state, and the sampler weights it saved are served by the
  OpenAI API."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from farm.serve.auth import KeyStore, Principal, hash_key
from tests.ports import free_port

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
COOKBOOK_PYTHON = REPO / ".venv-cookbook" / "bin" / "python"
KEY = "tml-acme-cookbook-key"


@pytest.fixture(scope="module")
def farm(ray_cluster, real_model, module_farm_home):
    from ray import serve

    from farm.serve.app import deploy
    from farm.serve.config import ServeConfig
    from farm.tinker.config import mount

    if not COOKBOOK_PYTHON.exists():
        pytest.fail(f"{COOKBOOK_PYTHON} is missing: `make cookbook-env` builds it (`make test` does)")
    cfg = ServeConfig(base_model=str(real_model), catalog_url=(module_farm_home / "catalog").as_uri(), replicas=1,
                      max_tokens_cap=16, port=free_port())
    mount(cfg, window_ms=20, worker_name="farm-tinker-cookbook-test")
    base = deploy(cfg, KeyStore({hash_key(KEY): Principal("acme")}), name="farm-tinker-cookbook-test")
    yield base, cfg, real_model
    serve.delete("farm-tinker-cookbook-test")
    serve.shutdown()  # a later module's Serve starts on its own port (test_serve_api checks the listener)


def _cookbook(base: str, served: str, model: Path, log: Path, max_steps: int) -> str:
    env = {**os.environ, "TINKER_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(COOKBOOK_PYTHON), str(REPO / "examples" / "tinker_cookbook_sft.py"),
                          "--base-url", base, "--model", served, "--tokenizer", str(model),
                          "--log-path", str(log), "--batch-size", "8", "--max-steps", str(max_steps),
                          "--save-every", "3"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"the cookbook failed:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    return run.stdout + run.stderr


def test_the_cookbook_rl_recipe_runs_unchanged_and_its_sampler_and_trainer_agree(farm, tmp_path):
    base, cfg, model = farm
    log = tmp_path / "rl"
    env = {**os.environ, "TINKER_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    # run from the folder that holds the base: the recipe's tokenizer (AutoTokenizer of model_name) is the
    # base's own local files, found by the served name
    run = subprocess.run([str(COOKBOOK_PYTHON), "-m", "tinker_cookbook.recipes.math_rl.train", f"base_url={base}",
                          f"model_name={cfg.served_name}", "renderer_name=qwen3_instruct", "env=arithmetic",
                          f"log_path={log}", "group_size=4", "groups_per_batch=4", "max_tokens=8",
                          "learning_rate=1e-4", "lora_rank=8", "max_steps=3", "eval_every=0", "save_every=0",
                          "behavior_if_log_dir_exists=delete"],
                         cwd=model.parent, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"the recipe failed:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    steps = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [0, 1, 2]
    for m in steps:
        assert m["env/all/total_episodes"] == 16 and m["env/all/total_ac_tokens"] > 0
        # the trainer scores the sampled tokens as the sampler did (the recipe's on-policy check)
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-3, m
    # samples end with the renderer's stop token (<|im_end|>), so some parse as well-formed answers
    assert max(m["env/all/format"] for m in steps) > 0
    saved = [json.loads(line) for line in (log / "checkpoints.jsonl").read_text().splitlines()]
    assert saved[-1]["name"] == "final" and saved[-1]["sampler_path"].endswith("/sampler_weights/final")


def _metrics(log: Path) -> dict[int, float]:
    return {m["step"]: m["train_mean_nll"] for m in map(json.loads, (log / "metrics.jsonl").read_text().splitlines())
            if "train_mean_nll" in m}


def test_the_cookbook_sft_loop_trains_saves_resumes_and_its_sampler_weights_are_served(farm, tmp_path):
    import openai

    base, cfg, model = farm
    log = tmp_path / "run"
    _cookbook(base, cfg.served_name, model, log, max_steps=6)
    nll = _metrics(log)
    assert sorted(nll) == list(range(6))
    assert max(nll[4], nll[5]) < 0.6 * nll[0], nll  # the loss falls (about 2.5 at step 0)
    saved = [json.loads(line) for line in (log / "checkpoints.jsonl").read_text().splitlines()]
    assert [c["name"] for c in saved] == ["000003", "final"]
    model_id = saved[0]["state_path"].removeprefix("tinker://").split("/")[0]
    assert saved[-1]["state_path"] == f"tinker://{model_id}/weights/final"
    assert saved[-1]["sampler_path"] == f"tinker://{model_id}/sampler_weights/final"

    # A run that died after its step-3 checkpoint: the same log path again resumes from that state with its
    # optimizer. The cookbook saves a periodic state as it finishes a step, after it has already sent the
    # next step (submit_ahead=1), so "000003" holds the updates of steps 0-4 and the resumed run replays
    # batches 3 and 4 on weights that have seen them: its step-3 loss is below the first run's. (That a
    # state resumes with the same next loss is test_tinker_api's.)
    (log / "checkpoints.jsonl").write_text(json.dumps(saved[0]) + "\n")
    out = _cookbook(base, cfg.served_name, model, log, max_steps=6)
    assert f"Resumed training from tinker://{model_id}/weights/000003" in out
    resumed = _metrics(log)
    assert sorted(resumed) == list(range(6)) and [resumed[s] for s in (0, 1, 2)] == [nll[s] for s in (0, 1, 2)]
    assert resumed[3] < nll[3], (nll, resumed)

    # the resumed run's final sampler weights are the newest catalog version of acme/final (each run that
    # ends publishes one), served over the OpenAI API
    from farm.catalog import Catalog

    last = json.loads((log / "checkpoints.jsonl").read_text().splitlines()[-1])
    version = Catalog(cfg.catalog_url).resolve("acme/final")
    assert last["name"] == "final" and last["sampler_path"].startswith(f"tinker://{version.metadata['tinker']['model_id']}/")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="acme/final", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.model == version.ref and reply.choices[0].message.content
