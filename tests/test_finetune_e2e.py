"""The fine-tuning API end to end with the official openai client: real Ray Serve on 127.0.0.1, the
real scheduler actor and Ray Train on the tiny Llama (an SFT job of acme and, beside it, a DPO job of
globex from OpenAI's preference lines), then each adapter answered by the same service (acme's
compared with stock PEFT). A cancel of a running job uses a scheduler whose
runner only reports progress (no second training run)."""

from __future__ import annotations

import io
import json
import time
import uuid
from types import SimpleNamespace

import httpx
import openai
import pytest

from farm.serve.auth import KeyStore, Principal, hash_key
from tests.ports import free_port
from tests.test_serve_support import stock_greedy
from tests.waiting import wait_for

pytestmark = pytest.mark.ray

KEYS = {"acme": "acme-ft-key", "globex": "globex-ft-key"}
QUESTIONS = ["reset my sensor", "update my thermostat", "pair my hub", "charge my remote"]


def chat_rows() -> list[dict]:
    rows = []
    for i, q in enumerate(QUESTIONS * 2):
        rows.append({"messages": [{"role": "system", "content": "You are a support agent."},
                                  {"role": "user", "content": f"How do I {q}?"},
                                  {"role": "assistant", "content": f"To {q}, hold the button for {i + 2} seconds."}]})
    return rows


def preference_rows() -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": f"How do I {q}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"To {q}, hold the button."}],
             "non_preferred_output": [{"role": "assistant", "content": "I do not know."}]} for q in QUESTIONS * 2]


def slow_runner(manifest, *, job_id: str, on_progress=None):
    """Reports a step every 0.2 s for a minute and never publishes: only a cancel ends it early."""
    for step in range(1, 301):
        if on_progress:
            on_progress({"step": step, "total_steps": 300, "loss": 1.0, "tokens": step})
        time.sleep(0.2)
    raise AssertionError("slow_runner was not cancelled")


@pytest.fixture(scope="module")
def farm(ray_cluster, tiny_llama, module_farm_home):
    import ray
    from ray import serve

    from farm import scheduler
    from farm.finetune.config import serve_extra
    from farm.finetune.policy import default_policy
    from farm.serve.app import deploy
    from farm.serve.config import ServeConfig

    home = module_farm_home
    sched = f"ft-{uuid.uuid4().hex[:6]}"
    # `farm serve --base-model` defaults (the demo manifest), shortened for a tiny CPU run
    policy = default_policy(str(tiny_llama), default_batch_size=4, checkpoint_every=2, eval_every=2,
                            max_concurrent_jobs=4)
    cfg = ServeConfig(base_model=str(tiny_llama), catalog_url=(home / "catalog").as_uri(), replicas=1,
                      max_tokens_cap=32, port=free_port(), resolve_ttl_s=0.5)
    cfg.extra.update(serve_extra(cfg.served_name, policy, scheduler_name=sched, scheduler_namespace="farm-tests"))
    keys = KeyStore({hash_key(KEYS["acme"]): Principal("acme"), hash_key(KEYS["globex"]): Principal("globex")})
    base = deploy(cfg, keys, name="farm-ft-test")
    wait_for(lambda: _healthy(base), timeout=120, what="serve /healthz")
    actor = scheduler.start(scheduler.SchedulerConfig(name=sched, namespace="farm-tests", poll_s=0.1))
    ns = SimpleNamespace(url=f"{base}/v1", base=base, home=home, cfg=cfg, tiny=tiny_llama, sched=sched, actor=actor)
    yield ns
    ray.kill(ns.actor, no_restart=True)  # the one the last test started
    serve.delete("farm-ft-test")
    serve.shutdown()  # the next module's deploy starts its own proxy on its own port


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def client(farm, who: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=farm.url, api_key=KEYS[who], max_retries=0, timeout=120)


def test_upload_train_poll_and_call_the_fine_tuned_model(farm):
    from farm.catalog import Catalog
    from farm.modeling import load_tokenizer
    from farm.queue import open_store

    acme = client(farm)
    data = "".join(json.dumps(r) + "\n" for r in chat_rows()).encode()
    f = acme.files.create(file=("support.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert f.status == "processed"
    job = acme.fine_tuning.jobs.create(model=farm.cfg.served_name, training_file=f.id, suffix="support",
                                       hyperparameters={"n_epochs": 2})
    assert job.status in ("queued", "running")
    assert job.id.removeprefix("ftjob-") in {j.id for j in open_store(farm.home / "queue.db").list()}  # farm jobs
    # another tenant's preference-tuning job, created with OpenAI's DPO shapes, trains beside it
    globex = client(farm, "globex")
    prefs = "".join(json.dumps(r) + "\n" for r in preference_rows()).encode()
    pf = globex.files.create(file=("prefs.jsonl", io.BytesIO(prefs)), purpose="fine-tune")
    assert pf.status == "processed", pf.status_details
    dpo = globex.fine_tuning.jobs.create(model=farm.cfg.served_name, training_file=pf.id, suffix="prefs",
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}})
    assert dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.2

    def finished():
        j = acme.fine_tuning.jobs.retrieve(job.id)
        return j if j.status in ("succeeded", "failed", "cancelled") else None

    done = wait_for(finished, timeout=420, what="the fine-tuning job", every=1.0)
    assert done.status == "succeeded", done.error
    model = done.fine_tuned_model
    assert model.startswith("acme/ft-support-") and model.endswith("@v1")
    assert done.trained_tokens > 0 and done.finished_at and done.result_files

    events = acme.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert {e.data["step"] for e in metrics} >= {1, 2, 3, 4}
    assert all(isinstance(e.data["train_loss"], float) for e in metrics if e.data["step"] in (1, 3))
    assert any(isinstance(e.data.get("valid_loss"), float) and e.data["valid_loss"] > 0 for e in metrics)
    assert any("succeeded" in e.message for e in events if e.type == "message")
    ckpts = acme.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [4, 2]
    assert ckpts[0].fine_tuned_model_checkpoint == model and ckpts[0].metrics.valid_loss > 0
    csv = acme.files.content(done.result_files[0]).read().decode()
    assert csv.splitlines()[0] == "step,train_loss,valid_loss,tokens" and len(csv.splitlines()) >= 5

    # farm adapters shows it under the customer
    cat = Catalog(farm.cfg.catalog_url)
    assert model in {v.ref for v in cat.list(customer="acme")}
    # the same service answers with that adapter version, like stock PEFT
    messages = [{"role": "system", "content": "You are a support agent."},
                {"role": "user", "content": "How do I pair my hub?"}]
    reply = acme.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert reply.model == model
    tok = load_tokenizer(str(farm.tiny))
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False).input_ids
    assert reply.choices[0].message.content == stock_greedy(farm.tiny, cat.fetch(model), ids, 12)
    text = acme.completions.create(model=model, prompt="How do I", max_tokens=6, temperature=0)
    assert text.model == model
    assert acme.models.retrieve(model).id == model  # '/' in the path, percent-encoded by the client
    # the DPO job: published, its reward metrics in farm.json, served to its own tenant only
    pref_done = wait_for(lambda: (j := globex.fine_tuning.jobs.retrieve(dpo.id)).status in
                         ("succeeded", "failed", "cancelled") and j, timeout=420, what="the DPO job", every=1.0)
    assert pref_done.status == "succeeded", pref_done.error
    pref_model = pref_done.fine_tuned_model
    assert pref_model.startswith("globex/ft-prefs-") and pref_done.method.type == "dpo"
    metrics = cat.resolve(pref_model).metadata["metrics"]
    assert 0.0 <= metrics["eval_reward_accuracy"] <= 1.0 and "train_reward_margin" in metrics, metrics
    assert cat.resolve(pref_model).metadata["manifest"]["method"] == "dpo"
    pref_reply = globex.chat.completions.create(model=pref_model, messages=messages, max_tokens=4, temperature=0)
    assert pref_reply.model == pref_model
    with pytest.raises(openai.NotFoundError):
        acme.chat.completions.create(model=pref_model, messages=messages, max_tokens=4)
    # another customer sees none of it
    with pytest.raises(openai.NotFoundError):
        globex.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        globex.chat.completions.create(model=model, messages=messages, max_tokens=4)


def test_cancel_of_a_running_job_is_cancelled_and_publishes_nothing(farm):
    import ray

    from farm import scheduler
    from farm.catalog import Catalog

    ray.kill(farm.actor, no_restart=True)  # the training scheduler's job is done; this one runs slow_runner
    wait_for(lambda: scheduler.get(farm.sched, "farm-tests") is None, timeout=30, what="scheduler gone")
    farm.actor = scheduler.start(scheduler.SchedulerConfig(
        name=farm.sched, namespace="farm-tests", poll_s=0.1, runner="tests.test_finetune_e2e:slow_runner"))
    acme = client(farm)
    data = "".join(json.dumps(r) + "\n" for r in chat_rows()[:2]).encode()
    f = acme.files.create(file=("small.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model=farm.cfg.served_name, training_file=f.id, suffix="cancel")
    wait_for(lambda: acme.fine_tuning.jobs.retrieve(job.id).status == "running", timeout=60, what="running")
    acme.fine_tuning.jobs.cancel(job.id)
    wait_for(lambda: acme.fine_tuning.jobs.retrieve(job.id).status == "cancelled", timeout=60, what="cancelled")
    final = acme.fine_tuning.jobs.retrieve(job.id)
    assert final.fine_tuned_model is None and final.result_files == []
    assert not [v for v in Catalog(farm.cfg.catalog_url).list(customer="acme") if "ft-cancel-" in v.adapter]
    assert acme.fine_tuning.jobs.checkpoints.list(job.id).data == []
