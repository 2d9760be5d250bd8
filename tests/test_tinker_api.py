"""The Tinker API end to end with the official `tinker` SDK (0.38) against a real `farm serve` app on
127.0.0.1 (real HTTP, the pack worker actor on the tiny Llama, NF4 as served): a training client made
with a `tml-` key trains and its loss falls, a fresh model scores as stock transformers does, another
tenant gets the same 404 as for a missing model, and bad requests are 4xx JSON naming the field."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from farm.serve.auth import KeyStore, Principal, hash_key
from tests.ports import free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.ray

KEYS = {"acme": "tml-acme-tinker-key", "globex": "tml-globex-tinker-key"}
TOKENS = [5, 17, 33, 40, 12, 9, 60, 3, 21, 8]


@pytest.fixture(scope="module")
def farm(ray_cluster, tiny_llama, module_farm_home):
    from ray import serve

    from farm.serve.app import deploy
    from farm.serve.config import ServeConfig
    from farm.tinker.config import mount

    cfg = ServeConfig(base_model=str(tiny_llama), catalog_url=(module_farm_home / "catalog").as_uri(), replicas=1,
                      max_tokens_cap=16, port=free_port())
    mount(cfg, poll_s=2.0, window_ms=200, worker_name="farm-tinker-test")  # wide: steps sent together meet in one cycle
    keys = KeyStore({hash_key(KEYS["acme"]): Principal("acme"), hash_key(KEYS["globex"]): Principal("globex")})
    base = deploy(cfg, keys, name="farm-tinker-test")
    wait_for(lambda: _healthy(base), timeout=120, what="the tinker healthz")
    ns = SimpleNamespace(base=base, cfg=cfg, tiny=tiny_llama, clients=[])
    yield ns
    for service in ns.clients:  # the SDK heartbeats each session every 10 s until it is closed
        try:
            service.close("success").result(timeout=30)
        except Exception:  # noqa: BLE001 - closed already by its test, or its session never started
            pass
    serve.delete("farm-tinker-test")
    serve.shutdown()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/api/v1/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _service(farm, who: str = "acme"):
    import tinker

    service = tinker.ServiceClient(base_url=farm.base, api_key=KEYS[who])
    farm.clients.append(service)
    return service


def _datum(tokens: list[int], weights: list[float] | None = None):
    from tinker import types

    weights = weights if weights is not None else [1.0] * (len(tokens) - 1)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def _stock_logprobs(tiny, tokens: list[int]) -> np.ndarray:
    """Per-token logprobs of the base alone with stock transformers (NF4 as the worker holds it)."""
    import torch

    from farm.modeling import disable_cpu_repack, load_base_model

    model = load_base_model(str(tiny), device="cpu").eval()
    disable_cpu_repack(model)  # the same bitsandbytes CPU kernel as the worker's
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def test_a_tml_key_trains_a_lora_and_its_loss_falls_and_fresh_logprobs_are_the_bases(farm):
    from tinker import types

    started = time.monotonic()
    service = _service(farm)
    import tinker

    caps = tinker.RestClient(base_url=farm.base, api_key=KEYS["acme"]).get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == [farm.cfg.served_name]
    tc = service.create_lora_training_client(base_model=farm.cfg.served_name, rank=4, seed=3).result()
    assert tc.model_id.endswith(":train:0")
    data = [_datum(TOKENS), _datum(TOKENS[:6], [0.0, 1.0, 1.0, 1.0, 1.0])]
    losses, first = [], None
    for _ in range(4):
        fb = tc.forward_backward(data, "cross_entropy")
        op = tc.optim_step(types.AdamParams(learning_rate=5e-3))
        out = fb.result()
        op.result()
        first = first or out
        losses.append(out.metrics["loss:sum"])
    # cross_entropy is a sum of -logprob * weight over every datum and position
    lp = [np.asarray(o["logprobs"].tolist()) for o in first.loss_fn_outputs]
    assert [len(x) for x in lp] == [len(TOKENS) - 1, 5]
    weighted = -(lp[0].sum() + lp[1][1:].sum())
    assert abs(first.metrics["loss:sum"] - weighted) < 1e-3
    # B starts at zero: the first step's logprobs are the base's, as stock transformers computes them
    np.testing.assert_allclose(lp[0], _stock_logprobs(farm.tiny, TOKENS), atol=1e-4)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # forward() scores with the trained weights and takes no gradient
    fwd = tc.forward([_datum(TOKENS)], "cross_entropy").result()
    assert fwd.metrics["loss:sum"] < losses[0]
    print(f"train loop: {time.monotonic() - started:.1f} s, losses {losses}")


def test_another_tenant_gets_the_404_of_a_missing_model(farm):
    acme = _service(farm, "acme")
    tc = acme.create_lora_training_client(base_model=farm.cfg.served_name, rank=2, seed=1).result()
    headers = {"X-API-Key": KEYS["acme"], "Content-Type": "application/x-protobuf", "X-Idempotency-Key": "fb-1"}
    fb_id = httpx.post(f"{farm.base}/api/v1/forward_backward", content=_proto_request(tc.model_id, 1),
                       headers=headers, timeout=30)
    assert fb_id.status_code == 200, fb_id.text
    request_id = fb_id.json()["request_id"]
    # the SDK's retry of a POST carries the same idempotency key: the same future, not a second step
    again = httpx.post(f"{farm.base}/api/v1/forward_backward", content=_proto_request(tc.model_id, 1),
                       headers=headers, timeout=30)
    assert again.status_code == 200 and again.json()["request_id"] == request_id
    headers["X-Idempotency-Key"] = "fb-other"
    reused = httpx.post(f"{farm.base}/api/v1/forward_backward", content=_proto_request(tc.model_id, 1),
                        headers=headers, timeout=30)
    assert reused.status_code == 400 and reused.json()["field"] == "seq_id"

    def call(key: str, path: str, **kw):
        return httpx.post(f"{farm.base}/api/v1/{path}", headers={"X-API-Key": key, **kw.pop("headers", {})},
                          timeout=30, **kw)

    theirs = call(KEYS["globex"], "get_info", json={"model_id": tc.model_id})
    missing = call(KEYS["globex"], "get_info", json={"model_id": tc.model_id + "0"})
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"] == missing.json()["error"].replace(tc.model_id + "0", tc.model_id)
    stolen = call(KEYS["globex"], "forward_backward", content=_proto_request(tc.model_id, 2),
                  headers={"Content-Type": "application/x-protobuf"})
    assert stolen.status_code == 404 and "not found" in stolen.json()["error"]
    peek = call(KEYS["globex"], "retrieve_future", json={"request_id": request_id})
    assert peek.status_code == 404
    # the owner still gets its result (protobuf)
    mine = wait_for(lambda: _done(call(KEYS["acme"], "retrieve_future", json={"request_id": request_id},
                                       headers={"Accept": "application/x-protobuf"})), timeout=120,
                    what="acme's forward_backward result")
    assert mine.headers["content-type"].startswith("application/x-protobuf")


def _done(r: httpx.Response):
    if r.headers.get("content-type", "").startswith("application/json") and r.json().get("type") == "try_again":
        return None
    return r


def _proto_request(model_id: str, seq_id: int, loss_fn: str = "cross_entropy", weights: int | None = None) -> bytes:
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    d = _datum(TOKENS, None if weights is None else [1.0] * weights)
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(data=[d], loss_fn=loss_fn),
                                       model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(req).SerializeToString()


def test_refusals_are_4xx_json_naming_the_field(farm):
    def post(path: str, key: str | None = KEYS["acme"], **kw):
        headers = {"X-API-Key": key} if key else {}
        headers.update(kw.pop("headers", {}))
        return httpx.post(f"{farm.base}/api/v1/{path}", headers=headers, timeout=30, **kw)

    nokey = post("client/config", key=None, json={"sdk_version": "0.38.0"})
    assert nokey.status_code == 401 and "API key" in nokey.json()["error"]
    assert post("client/config", key="tml-unknown", json={}).status_code == 401
    bearer = httpx.post(f"{farm.base}/api/v1/client/config", json={},
                        headers={"Authorization": f"Bearer {KEYS['globex']}"}, timeout=30)
    assert bearer.status_code == 200 and bearer.json()["pjwt_auth_enabled"] is False
    session = post("create_session", json={"tags": [], "sdk_version": "0.38.0", "type": "create_session"}).json()
    sid = session["session_id"]
    wrong_base = post("create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": "gpt-9",
                                            "lora_config": {"rank": 4}})
    assert wrong_base.status_code == 400 and wrong_base.json()["field"] == "base_model"
    assert "'gpt-9'" in wrong_base.json()["error"]
    bad_rank = post("create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": farm.cfg.served_name,
                                          "lora_config": {"rank": 0}})
    assert bad_rank.status_code == 400 and bad_rank.json()["field"] == "lora_config.rank"
    other_session = post("create_model", key=KEYS["globex"], json={"session_id": sid, "model_seq_id": 0,
                                                                   "base_model": farm.cfg.served_name,
                                                                   "lora_config": {"rank": 4}})
    assert other_session.status_code == 404
    proto = {"Content-Type": "application/x-protobuf"}
    cispo = post("forward_backward", content=_proto_request("x:train:0", 1, loss_fn="cispo"), headers=proto)
    assert cispo.status_code == 422 and cispo.json()["field"] == "loss_fn"
    ppo = post("forward_backward", content=_proto_request("x:train:0", 1, loss_fn="ppo"), headers=proto)
    assert ppo.status_code == 400 and "ppo needs ['target_tokens', 'logprobs', 'advantages']" in ppo.json()["error"]
    short = post("forward_backward", content=_proto_request("x:train:0", 1, weights=3), headers=proto)
    assert short.status_code == 400 and short.json()["field"] == "data[0].loss_fn_inputs.weights"
    as_json = post("forward_backward", json={"model_id": "x"})
    assert as_json.status_code == 400 and as_json.json()["field"] == "content-type"
    later = post("cancel_future", json={"request_id": "x"})
    assert later.status_code == 422 and "does not offer it yet" in later.json()["error"]
    sample = {"sampling_session_id": "x", "num_samples": 1, "prompt": {"chunks": [{"tokens": [1]}]}}
    topk_prompt = post("asample", json={**sample, "topk_prompt_logprobs": 5})
    assert topk_prompt.status_code == 422 and topk_prompt.json()["field"] == "topk_prompt_logprobs"
    top_k = post("asample", json={**sample, "sampling_params": {"top_k": -5}})
    assert top_k.status_code == 400 and top_k.json()["field"] == "sampling_params.top_k"
    bad_name = post("save_weights", json={"model_id": "x", "path": "../up", "seq_id": 2})
    assert bad_name.status_code == 400 and "'../up' is not a checkpoint name" in bad_name.json()["error"]
    bad_path = post("load_weights", json={"path": "s3://bucket/x", "optimizer": True, "session_id": sid,
                                          "model_seq_id": 1})
    assert bad_path.status_code == 400 and bad_path.json()["field"] == "path"


def test_save_state_and_a_client_from_that_state_continue_with_the_same_loss(farm):
    import tinker
    from tinker import types

    service = _service(farm)
    tc = service.create_lora_training_client(base_model=farm.cfg.served_name, rank=4, seed=5).result()
    adam = types.AdamParams(learning_rate=5e-3)
    for _ in range(2):
        fb, op = tc.forward_backward([_datum(TOKENS)], "cross_entropy"), tc.optim_step(adam)
        fb.result()
        op.result()
    saved = tc.save_state("step-2").result()
    assert saved.path == f"tinker://{tc.model_id}/weights/step-2"
    follow = [_datum(TOKENS[2:])]
    expected = tc.forward_backward(follow, "cross_entropy").result().metrics["loss:sum"]
    resumed = service.create_training_client_from_state_with_optimizer(saved.path).result()
    assert resumed.model_id.endswith(":train:1")  # create-by-load: the id the SDK derives itself
    assert resumed.forward_backward(follow, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
        expected, rel=1e-5)
    # the path names acme's checkpoint; for globex it is not there
    with pytest.raises(tinker.RequestFailedError, match="no checkpoint"):
        _service(farm, "globex").create_training_client_from_state(saved.path).result()


def test_checkpoints_are_listed_expire_are_deleted_and_usage_is_reported_through_the_sdk(farm):
    """RestClient's checkpoint calls and AdminClient's usage calls, each tenant seeing its own only."""
    import datetime as dt

    import ray
    import tinker
    from tinker import types
    from typer.testing import CliRunner

    from farm.catalog import Catalog
    from farm.cli import app

    service = _service(farm)
    tc = service.create_lora_training_client(base_model=farm.cfg.served_name, rank=4, seed=6,
                                             user_metadata={"renderer_name": "role_colon"}).result()
    fb, op = tc.forward_backward([_datum(TOKENS)], "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=1e-3))
    fb.result()
    op.result()
    kept = tc.save_state("kept").result().path
    short = tc.save_state("short", ttl_seconds=7200).result().path
    sampler = tc.save_weights_for_sampler("listed").result().path
    rest = tinker.RestClient(base_url=farm.base, api_key=KEYS["acme"])
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert set(listed) == {kept, short, sampler}
    assert listed[kept].checkpoint_type == "training" and listed[kept].size_bytes > 0 and listed[kept].expires_at is None
    assert listed[short].expires_at is not None
    assert listed[sampler].checkpoint_type == "sampler" and listed[sampler].checkpoint_id == "sampler_weights/listed"
    assert listed[sampler].size_bytes > 0  # named sampler weights: a catalog version, in the storage quota
    rest.set_checkpoint_ttl_from_tinker_path(kept, 3600).result()
    rest.set_checkpoint_ttl_from_tinker_path(short, None).result()
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[kept].expires_at is not None and listed[short].expires_at is None
    with pytest.raises(tinker.BadRequestError, match=r"ttl_seconds: 60 is not in \[3600"):
        rest.set_checkpoint_ttl_from_tinker_path(kept, 60).result()
    # the training run: what the cookbook reads back on resume (its renderer name in user_metadata)
    run = rest.get_training_run_by_tinker_path(kept).result()
    assert (run.training_run_id, run.base_model, run.model_owner, run.lora_rank) == (tc.model_id, farm.cfg.served_name,
                                                                                      "acme", 4)
    assert run.user_metadata == {"renderer_name": "role_colon"} and run.last_sampler_checkpoint.tinker_path == sampler
    assert run.last_checkpoint.tinker_path == short  # the newest save_state
    runs = rest.list_training_runs(limit=1000).result()
    assert tc.model_id in {r.training_run_id for r in runs.training_runs}
    assert runs.cursor.total_count == len(runs.training_runs) and runs.cursor.limit == 1000
    assert rest.list_training_runs(limit=1, offset=runs.cursor.total_count).result().training_runs == []
    everything = {c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints}
    assert {kept, short, sampler} <= everything
    info = rest.get_weights_info_by_tinker_path(kept).result()
    assert (info.base_model, info.lora_rank, info.is_lora, info.train_mlp) == (farm.cfg.served_name, 4, True, True)
    with pytest.raises(tinker.BadRequestError, match="limit: '0': Input should be greater than or equal to 1"):
        rest.list_training_runs(limit=0).result()
    rest.delete_checkpoint_from_tinker_path(short).result()
    assert short not in {c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(short).result()
    # another tenant: the run is not there for it
    other = tinker.RestClient(base_url=farm.base, api_key=KEYS["globex"])
    with pytest.raises(tinker.NotFoundError):
        other.list_checkpoints(tc.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        other.delete_checkpoint_from_tinker_path(kept).result()
    with pytest.raises(tinker.NotFoundError):
        other.get_training_run(tc.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        other.get_weights_info_by_tinker_path(kept).result()
    assert tc.model_id not in {r.training_run_id for r in other.list_training_runs(limit=1000).result().training_runs}
    assert not {c.tinker_path for c in other.list_user_checkpoints(limit=1000).result().checkpoints} & {kept, sampler}
    # usage: acme's checkpoints in storage, and its hourly ledger
    admin = tinker.AdminClient(base_url=farm.base, api_key=KEYS["acme"])
    [stored] = admin.get_current_checkpoint_storage_usage().result().data
    assert stored.checkpoint_count >= 2 and stored.size_bytes >= listed[kept].size_bytes + listed[sampler].size_bytes
    # the sampler weights are deleted through the SDK too: the catalog version goes, and the quota frees
    rest.delete_checkpoint_from_tinker_path(sampler).result()
    assert Catalog(farm.cfg.catalog_url).versions("acme", "listed") == []
    [after] = admin.get_current_checkpoint_storage_usage().result().data
    assert after.size_bytes == stored.size_bytes - listed[sampler].size_bytes
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(sampler).result()
    hour = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)

    def billed() -> dict[str, int]:
        usage = admin.get_billing_usage(hour - dt.timedelta(hours=1), hour + dt.timedelta(hours=1)).result().data
        totals: dict[str, int] = {}
        for e in usage:  # hourly buckets (this test may straddle an hour)
            n = e.event_info.count if e.event_info.type == "checkpoint" else e.event_info.token_count
            totals[e.event_info.type] = totals.get(e.event_info.type, 0) + n
        return totals

    totals = billed()
    assert totals["training"] >= len(TOKENS) - 1 and totals["checkpoint"] >= 3
    # the usage lasts in the queue database (a Ray task on the head adds it): `farm status` shows it, and
    # the billing answer is the same after the flush (nothing counted twice, nothing lost)
    worker = ray.get_actor("farm-tinker-test", namespace="farm")
    ray.get(worker.flush_usage.remote())
    assert billed() == totals
    status = CliRunner().invoke(app, ["status", "--json", "--customer", "acme"],
                                env={"FARM_QUEUE_DB": farm.cfg.extra["tinker"]["queue_db"]})
    acme = json.loads(status.output)["customers"]["acme"]
    assert acme["tinker_training_tokens"] >= len(TOKENS) - 1 and acme["tinker_checkpoints"] >= 3
    assert acme["tinker_accelerator_seconds"] > 0 and acme["jobs"] == 0
    with pytest.raises(tinker.BadRequestError, match="starting_on: .* is not on a UTC hour boundary"):
        admin.get_billing_usage(hour + dt.timedelta(minutes=5), hour + dt.timedelta(hours=1)).result()
    service.close("success").result()
    # the run outlives its session: its record is in run storage
    assert rest.get_training_run(tc.model_id).result().user_metadata == {"renderer_name": "role_colon"}


def test_two_tenants_training_at_once_share_grouped_steps_and_each_loss_falls(farm):
    import threading

    import ray
    from tinker import types

    worker = ray.get_actor("farm-tinker-test", namespace="farm")
    spent = ray.get(worker.state.remote())["usage"]
    services = {who: _service(farm, who) for who in KEYS}
    clients = {who: services[who].create_lora_training_client(base_model=farm.cfg.served_name, rank=4,
                                                                seed=7).result() for who in KEYS}
    rows = {"acme": [_datum(TOKENS)], "globex": [_datum(TOKENS[3:]), _datum(TOKENS[:5])]}
    losses: dict[str, list[float]] = {who: [] for who in KEYS}
    barrier = threading.Barrier(len(KEYS))

    def train(who: str) -> None:
        tc = clients[who]
        for _ in range(3):
            barrier.wait(timeout=60)  # both submit their step together: one clock cycle
            fb, op = tc.forward_backward(rows[who], "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=5e-3))
            losses[who].append(fb.result().metrics["loss:sum"])
            op.result()

    threads = [threading.Thread(target=train, args=(who,)) for who in KEYS]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    for who, ls in losses.items():
        assert len(ls) == 3 and ls[-1] < ls[0], (who, ls)
    before = ray.get(worker.state.remote())
    assert before["largest_group"] >= 2  # the two models shared a forward/backward
    # each tenant's cost ledger got its own tokens (3 steps of 9, and of 6 + 4) and time, though the steps were shared
    for who, tokens in (("acme", 27), ("globex", 30)):
        was = spent.get(who, {"tokens": 0, "accelerator_seconds": 0.0})
        assert before["usage"][who]["tokens"] - was["tokens"] == tokens
        assert before["usage"][who]["accelerator_seconds"] > was["accelerator_seconds"]
    # closing a client finishes its session: its model leaves the worker, later calls on it are 404s
    for service in services.values():
        service.close("success").result()
    wait_for(lambda: ray.get(worker.state.remote())["resident"] == before["resident"] - 2, timeout=60,
             what="the finished sessions' models released")
    gone = httpx.post(f"{farm.base}/api/v1/get_info", json={"model_id": clients["acme"].model_id},
                      headers={"X-API-Key": KEYS["acme"]}, timeout=30)
    assert gone.status_code == 404


def test_sampler_weights_are_a_catalog_version_the_openai_api_serves_to_its_tenant_only(farm):
    import openai
    from tinker import types

    from farm.catalog import Catalog
    from farm.modeling import load_tokenizer
    from tests.test_serve_support import stock_greedy

    tc = _service(farm).create_lora_training_client(base_model=farm.cfg.served_name, rank=4, seed=2).result()
    for _ in range(2):
        fb, op = tc.forward_backward([_datum(TOKENS)], "cross_entropy"), tc.optim_step(
            types.AdamParams(learning_rate=5e-2))  # big steps, so the greedy output moves off the base's
        fb.result()
        op.result()
    saved = tc.save_weights_for_sampler("tinker-run").result()
    assert saved.path == f"tinker://{tc.model_id}/sampler_weights/tinker-run"
    cat = Catalog(farm.cfg.catalog_url)
    version = cat.resolve("acme/tinker-run")
    assert version.ref == "acme/tinker-run@v1" and version.metadata["tinker"]["model_id"] == tc.model_id
    acme = openai.OpenAI(base_url=f"{farm.base}/v1", api_key=KEYS["acme"], max_retries=0, timeout=120)
    reply = wait_for(lambda: _completion(acme, "acme/tinker-run"), timeout=60, what="the served sampler weights")
    assert reply.model == "acme/tinker-run@v1"
    tok = load_tokenizer(str(farm.tiny))
    ids = tok("How do I", add_special_tokens=False).input_ids  # as the ingress tokenizes a prompt
    assert reply.choices[0].text == stock_greedy(farm.tiny, cat.fetch("acme/tinker-run@v1"), ids, 6)
    assert reply.choices[0].text != stock_greedy(farm.tiny, None, ids, 6)  # the trained LoRA, not the base
    globex = openai.OpenAI(base_url=f"{farm.base}/v1", api_key=KEYS["globex"], max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        globex.completions.create(model="acme/tinker-run", prompt="How do I", max_tokens=2, temperature=0)


def _completion(client, model: str):
    import openai

    try:
        return client.completions.create(model=model, prompt="How do I", max_tokens=6, temperature=0)
    except openai.NotFoundError:
        return None  # the resolver's cache may still hold "no such adapter" for resolve_ttl_s


def test_a_sampling_client_samples_the_trained_weights_through_the_serving_engine(farm):
    import hashlib

    import ray
    from tinker import types

    from farm.catalog import Catalog
    from farm.modeling import load_tokenizer
    from tests.test_serve_support import stock_greedy

    service = _service(farm)
    tc = service.create_lora_training_client(base_model=farm.cfg.served_name, rank=4, seed=4).result()
    for _ in range(2):
        fb, op = tc.forward_backward([_datum(TOKENS)], "cross_entropy"), tc.optim_step(
            types.AdamParams(learning_rate=5e-2))
        fb.result()
        op.result()
    worker = ray.get_actor("farm-tinker-test", namespace="farm")
    spent = ray.get(worker.state.remote())["usage"]["acme"]
    sampler = tc.save_weights_and_get_sampling_client().result()  # a snapshot: a catalog version of its own
    tok = load_tokenizer(str(farm.tiny))
    ids = tok("How do I", add_special_tokens=False).input_ids
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    res = sampler.sample(types.ModelInput.from_ints(ids), num_samples=2, sampling_params=greedy).result()
    assert len(res.sequences) == 2 and res.sequences[0].tokens == res.sequences[1].tokens
    seq = res.sequences[0]
    assert len(seq.logprobs) == len(seq.tokens) and all(lp <= 0 for lp in seq.logprobs)
    snapshot = f"acme/tinker-{hashlib.sha256(tc.model_id.encode()).hexdigest()[:12]}@v1"
    adapter = Catalog(farm.cfg.catalog_url).fetch(snapshot)
    assert tok.decode(seq.tokens, skip_special_tokens=True) == stock_greedy(farm.tiny, adapter, ids, 6)
    # the cost ledger: the prompt once per sample, and the generated tokens
    now = ray.get(worker.state.remote())["usage"]["acme"]
    assert now["prefill_tokens"] - spent["prefill_tokens"] == 2 * len(ids)
    assert now["sample_tokens"] - spent["sample_tokens"] == 2 * len(seq.tokens)
    # an on-policy RL step on what was sampled (the cookbook's loop): the trainer scores the sampled tokens
    # as the sampler did, to the publish gate's train/serve tolerance, so the importance ratios are ~1
    from farm.train.gate import PARITY_TOLERANCE

    full = ids + list(seq.tokens)
    n_prompt = len(ids) - 1
    rl = types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                     loss_fn_inputs={"target_tokens": full[1:],
                                     "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                                     "advantages": [0.0] * n_prompt + [1.0] * len(seq.tokens)})
    out = tc.forward_backward([rl], "importance_sampling").result()
    trained = np.asarray(out.loss_fn_outputs[0]["logprobs"].tolist())[n_prompt:]
    np.testing.assert_allclose(trained, np.asarray(seq.logprobs), atol=PARITY_TOLERANCE)
    assert out.metrics["loss:sum"] == pytest.approx(-len(seq.tokens), rel=PARITY_TOLERANCE)
    # the base alone, through a sampling client of the base model
    base = service.create_sampling_client(base_model=farm.cfg.served_name).result()
    plain = base.sample(types.ModelInput.from_ints(ids), num_samples=1, sampling_params=greedy).result()
    assert tok.decode(plain.sequences[0].tokens, skip_special_tokens=True) == stock_greedy(farm.tiny, None, ids, 6)


def test_sampler_options_token_id_stops_top_k_and_prompt_logprobs(farm):
    """What the cookbook's loops ask of a sampler: stop token ids (its renderers' end-of-message token),
    kept at the end of the sample; top_k; compute_logprobs (prompt logprobs), as stock transformers
    scores the prompt."""
    from tinker import types

    service = _service(farm)
    base = service.create_sampling_client(base_model=farm.cfg.served_name).result()
    prompt = types.ModelInput.from_ints(TOKENS)
    free = base.sample(prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=8, temperature=0.0)).result()
    tokens = free.sequences[0].tokens
    assert len(tokens) == 8 and free.sequences[0].stop_reason == "length"
    stop = tokens[2]
    upto = tokens.index(stop)
    stopped = base.sample(prompt, num_samples=1, sampling_params=types.SamplingParams(
        max_tokens=8, temperature=0.0, stop=[stop])).result().sequences[0]
    assert stopped.tokens == tokens[: upto + 1] and stopped.stop_reason == "stop"  # the stop token is the last
    assert stopped.logprobs == pytest.approx(free.sequences[0].logprobs[: upto + 1])
    # top_k=1 at temperature 1 is greedy, whatever the seed
    top1 = base.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(
        max_tokens=8, temperature=1.0, top_k=1, seed=11)).result()
    assert [s.tokens for s in top1.sequences] == [tokens, tokens]
    logprobs = base.compute_logprobs(prompt).result()
    assert logprobs[0] is None and len(logprobs) == len(TOKENS)
    np.testing.assert_allclose(logprobs[1:], _stock_logprobs(farm.tiny, TOKENS), atol=1e-4)
    last = base.compute_logprobs(prompt, prompt_logprobs_last_n=3).result()
    assert last[:-3] == [None] * (len(TOKENS) - 3) and last[-3:] == pytest.approx(logprobs[-3:])
    service.close("success").result()


def test_a_lost_pack_worker_is_a_4xx_and_the_next_request_starts_a_new_one(farm):
    """Last in the module: it kills the worker."""
    import ray

    ray.kill(ray.get_actor("farm-tinker-test", namespace="farm"), no_restart=True)
    body = {"tags": [], "sdk_version": "0.38.0", "type": "create_session"}
    headers = {"X-API-Key": KEYS["acme"]}

    def create_session():
        return httpx.post(f"{farm.base}/api/v1/create_session", json=body, headers=headers, timeout=30)

    lost = wait_for(lambda: (r := create_session()).status_code != 200 and r, timeout=30,
                    what="a request that meets the dead worker")
    assert lost.status_code == 400 and "pack worker was lost" in lost.json()["error"]
    assert create_session().status_code == 200  # a new worker, empty
