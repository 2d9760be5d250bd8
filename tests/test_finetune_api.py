"""The fine-tuning API's routes without Ray: the official openai client over Starlette's TestClient
(an httpx client) against the real app, a real SQLite queue, a real local catalog and files store.
Jobs are queued, not trained here (the one training run is in test_finetune_e2e.py)."""

from __future__ import annotations

import io
import json

import openai
import pytest
from starlette.testclient import TestClient

from farm.finetune.config import FinetuneConfig
from farm.finetune.policy import TrainingPolicy
from farm.finetune.routes import build
from farm.queue import JobState, open_store
from farm.serve.auth import KeyStore, Principal, hash_key

KEYS = {"acme": "acme-key", "globex": "globex-key", "admin": "admin-key"}
CHAT = [
    {"messages": [{"role": "user", "content": "How do I reset my sensor?"},
                  {"role": "assistant", "content": "Hold the button for ten seconds."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello.", "weight": 0}, {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "Goodbye."}]},
]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def api(farm_home, tiny_llama):
    policy = TrainingPolicy(base_model=str(tiny_llama), max_epochs=4, max_batch_size=8, max_concurrent_jobs=3,
                            max_training_tokens=5_000, max_file_bytes=4096, max_stored_bytes=6000, priority=7)
    cfg = FinetuneConfig(bases={"tiny-llama": policy}, files_url=(farm_home / "finetune").as_uri(),
                         queue_db=str(farm_home / "queue.db"), scheduler_name="no-such-scheduler")
    keys = KeyStore({hash_key(KEYS["acme"]): Principal("acme"), hash_key(KEYS["globex"]): Principal("globex"),
                     hash_key(KEYS["admin"]): Principal(None, admin=True)})
    app = build(cfg, keys, (farm_home / "catalog").as_uri())
    http = TestClient(app, raise_server_exceptions=False)

    def client(who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://testserver/v1", api_key=KEYS[who], http_client=http, max_retries=0)

    return type("Api", (), {"client": staticmethod(client), "http": http, "queue": open_store(farm_home / "queue.db"),
                            "home": farm_home, "policy": policy, "cfg": cfg, "keys": keys})


def upload(c: openai.OpenAI, data: bytes, name: str = "train.jsonl"):
    return c.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")


def test_upload_list_content_delete_and_tenancy(api):
    acme, globex, admin = api.client("acme"), api.client("globex"), api.client("admin")
    f = upload(acme, jsonl(CHAT))
    assert f.status == "processed" and f.status_details is None and f.bytes == len(jsonl(CHAT))
    assert f.filename == "train.jsonl" and f.purpose == "fine-tune"
    assert acme.files.retrieve(f.id).id == f.id
    assert acme.files.content(f.id).read() == jsonl(CHAT)
    with pytest.raises(openai.NotFoundError):
        globex.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        globex.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        globex.files.delete(f.id)
    assert admin.files.retrieve(f.id).id == f.id
    g = upload(globex, jsonl(CHAT[:1]))
    assert [x.id for x in acme.files.list()] == [f.id]
    assert {x.id for x in admin.files.list()} == {f.id, g.id}
    assert acme.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(f.id)


@pytest.mark.parametrize("data, expected", [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n',
     "line 2: not JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"text": "x"}\n',
     "line 2: no 'messages'"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}\n', "line 1: message 1: role must be one of system, user, assistant (got 'wizard')"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: has no assistant message"),
    (b"\n\n", "empty"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}\n',
     "line 1: message 2 (assistant): weight must be 0 or 1"),
])
def test_bad_files_get_status_error_naming_the_line(api, data, expected):
    f = upload(api.client("acme"), data)
    assert f.status == "error"
    assert expected in f.status_details


def test_prompt_completion_file_is_processed(api):
    f = upload(api.client("acme"), jsonl([{"prompt": "Q: hi\nA:", "completion": " hello"}]))
    assert f.status == "processed"


def test_size_cap_and_stored_bytes_quota(api):
    acme = api.client("acme")
    with pytest.raises(openai.APIStatusError) as exc:
        upload(acme, b" " * 5000)
    assert exc.value.status_code == 413 and "4096-byte" in exc.value.message
    big = jsonl(CHAT * 10)[:4000].rsplit(b"\n", 1)[0] + b"\n"
    upload(acme, big)
    with pytest.raises(openai.RateLimitError) as exc:
        upload(acme, big)
    assert "stored bytes quota" in exc.value.message and "6000" in exc.value.message
    upload(api.client("globex"), big)  # the quota is per customer


def test_errors_are_openai_shaped_never_detail(api):
    r = api.http.get("/v1/files")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = api.http.get("/v1/fine_tuning/jobs?limit=abc", headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    r = api.http.get("/v1/fine_tuning/nope", headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 404 and "detail" not in r.json() and r.json()["error"]["type"] == "not_found_error"
    r = api.http.post("/v1/fine_tuning/jobs", content=b"{bad", headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]


def test_create_maps_onto_the_queue_with_the_policy(api):
    acme = api.client("acme")
    f = upload(acme, jsonl(CHAT))
    job = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, suffix="Support_Bot", seed=3,
                                       hyperparameters={"n_epochs": 2, "batch_size": "auto"}, metadata={"team": "a"})
    assert job.status == "queued" and job.model == "tiny-llama" and job.training_file == f.id
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.seed == 3 and job.metadata == {"team": "a"} and job.fine_tuned_model is None
    queued = api.queue.get(job.id.removeprefix("ftjob-"))  # what `farm jobs` lists
    assert queued.state is JobState.QUEUED and queued.customer == "acme" and queued.priority == 7
    m = queued.manifest
    assert m["adapter"].startswith("ft-support-bot-") and m["training"]["epochs"] == 2.0
    assert m["dataset"]["train"].startswith((api.home / "finetune" / "acme").as_uri())
    assert m["dataset"]["format"] == "chat" and m["training"]["seed"] == 3
    assert acme.fine_tuning.jobs.retrieve(job.id).id == job.id
    # method.supervised.hyperparameters is the same thing
    job2 = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    assert job2.hyperparameters.n_epochs == 1


@pytest.mark.parametrize("kwargs, param, words", [
    ({"model": "gpt-4o"}, "model", "not a base offered"),
    ({"hyperparameters": {"n_epochs": 5}}, "hyperparameters.n_epochs", "max_epochs"),
    ({"hyperparameters": {"batch_size": 64}}, "hyperparameters.batch_size", "max_batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 50}}, "hyperparameters.learning_rate_multiplier", "10"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     "method.supervised.hyperparameters.n_epochs", "1..4"),
    ({"method": {"type": "reinforcement"}}, "method.type", "supervised, dpo"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}},
     "method.supervised.hyperparameters.beta", "not a supervised hyperparameter"),
    ({"suffix": "bad/name"}, "suffix", "suffix"),
    ({"extra_body": {"priority": 100}}, "priority", "operator"),
    ({"extra_body": {"base_model": "s3://x/y"}}, "base_model", "operator"),
])
def test_create_outside_policy_is_400_naming_the_field(api, kwargs, param, words):
    acme = api.client("acme")
    f = upload(acme, jsonl(CHAT))
    args = {"model": "tiny-llama", "training_file": f.id, **kwargs}
    with pytest.raises(openai.BadRequestError) as exc:
        acme.fine_tuning.jobs.create(**args)
    assert exc.value.body["param"] == param and words in exc.value.message
    assert api.queue.list() == []


PREFS = [
    {"input": {"messages": [{"role": "user", "content": "How do I reset my sensor?"}]},
     "preferred_output": [{"role": "assistant", "content": "Hold the button for ten seconds."}],
     "non_preferred_output": [{"role": "assistant", "content": "Buy a new sensor."}]},
    {"input": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
     "preferred_output": [{"role": "assistant", "content": "Hello."}],
     "non_preferred_output": [{"role": "assistant", "content": "What do you want?"}]},
]


def test_a_dpo_job_is_created_from_openai_preference_lines(api):
    """OpenAI's DPO request shape (checked against the openai client's own types): the preference file is
    processed at upload, the job queues a `method: dpo` manifest with the request's beta, and the job
    object answers with method.dpo.hyperparameters."""
    acme = api.client("acme")
    f = upload(acme, jsonl(PREFS), "prefs.jsonl")
    assert f.status == "processed"
    job = acme.fine_tuning.jobs.create(
        model="tiny-llama", training_file=f.id, validation_file=f.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "batch_size": "auto"}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.25
    assert job.method.dpo.hyperparameters.n_epochs == 2 and job.hyperparameters.n_epochs == 2
    m = api.queue.get(job.id.removeprefix("ftjob-")).manifest
    assert m["method"] == "dpo" and m["dpo"]["beta"] == 0.25 and m["dataset"]["format"] == "preference"
    auto = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, method={"type": "dpo"})
    assert auto.method.dpo.hyperparameters.beta == 0.1  # "auto": the documented starting point
    assert acme.fine_tuning.jobs.retrieve(auto.id).method.type == "dpo"
    # the stored preference lines are what the trainer reads: prompt = input.messages, chosen, rejected
    from farm.manifest import DatasetSpec
    from farm.modeling import load_tokenizer
    from farm.train.data import load_prepared

    d = load_prepared(DatasetSpec(train=m["dataset"]["train"], eval=m["dataset"]["train"]),
                      load_tokenizer(api.policy.base_model, None), task="causal_lm", max_seq_len=128, seed=0,
                      method="dpo")
    assert d.stats["train"]["format"] == "preference" and d.stats["train"]["rows"] == 2


@pytest.mark.parametrize("rows, words", [
    ([{**PREFS[0], "non_preferred_output": PREFS[0]["preferred_output"]}], "line 1: 'non_preferred_output' is the same"),
    ([PREFS[0], {**PREFS[1], "preferred_output": []}], "line 2: 'preferred_output' must be a string or a list of one"),
    ([PREFS[0], {**PREFS[1], "preferred_output": "Hello."}], "line 2: 'preferred_output' must be a list of one assistant"),
    ([PREFS[0], {k: v for k, v in PREFS[1].items() if k != "non_preferred_output"}], "line 2: 'non_preferred_output'"),
    ([PREFS[0], {**PREFS[1], "preferred_output": [{"role": "assistant", "content": " "}]}], "must not be empty"),
    ([{**PREFS[0], "input": {"messages": [{"role": "robot", "content": "x"}]}}], "line 1: 'input.messages'"),
    ([PREFS[0], {"input": "hi", "preferred_output": [], "non_preferred_output": []}], "line 2: 'input' must be an object"),
])
def test_bad_preference_files_get_status_error_naming_the_line(api, rows, words):
    f = upload(api.client("acme"), jsonl(rows))
    assert f.status == "error" and words in f.status_details, f.status_details


def test_a_file_of_the_wrong_format_for_the_method_is_400_at_create(api):
    acme = api.client("acme")
    chat, prefs = upload(acme, jsonl(CHAT)), upload(acme, jsonl(PREFS), "prefs.jsonl")
    with pytest.raises(openai.BadRequestError) as exc:
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=chat.id, method={"type": "dpo"})
    assert exc.value.body["param"] == "training_file" and "is chat (line 1" in exc.value.message
    assert "preferred_output" in exc.value.message
    for kwargs in ({}, {"method": {"type": "supervised"}}):
        with pytest.raises(openai.BadRequestError) as exc:
            acme.fine_tuning.jobs.create(model="tiny-llama", training_file=prefs.id, **kwargs)
        assert exc.value.body["param"] == "training_file" and "preference lines" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=prefs.id, validation_file=chat.id,
                                     method={"type": "dpo"})
    assert exc.value.body["param"] == "validation_file"
    with pytest.raises(openai.BadRequestError) as exc:
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=prefs.id,
                                     method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}})
    assert exc.value.body["param"] == "method.dpo.hyperparameters.beta"
    assert api.queue.list() == []


def test_training_tokens_over_policy_is_400(api):
    acme = api.client("acme")
    f = upload(acme, jsonl([{"prompt": "x " * 150, "completion": " y " * 150}] * 4))
    with pytest.raises(openai.BadRequestError) as exc:
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, hyperparameters={"n_epochs": 4})
    assert "max_training_tokens" in exc.value.message and exc.value.body["param"] == "hyperparameters.n_epochs"


def test_job_on_a_bad_file_fails_in_validation_naming_the_file(api):
    acme = api.client("acme")
    bad = upload(acme, b'{"messages": [{"role": "user", "content": "hi"}]}\n', name="broken.jsonl")
    job = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=bad.id)
    assert job.status == "failed" and job.error.param == "training_file"
    assert bad.id in job.error.message and "broken.jsonl" in job.error.message and "line 1" in job.error.message
    assert api.queue.list() == []  # nothing queued
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "failed"
    events = acme.fine_tuning.jobs.list_events(job.id).data
    assert any(e.level == "error" and bad.id in e.message for e in events)


def test_other_customers_jobs_and_files_are_404(api):
    acme, globex, admin = api.client("acme"), api.client("globex"), api.client("admin")
    f = upload(acme, jsonl(CHAT))
    job = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    for call in (lambda: globex.fine_tuning.jobs.retrieve(job.id), lambda: globex.fine_tuning.jobs.cancel(job.id),
                 lambda: globex.fine_tuning.jobs.list_events(job.id),
                 lambda: globex.fine_tuning.jobs.checkpoints.list(job.id),
                 lambda: globex.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert globex.fine_tuning.jobs.list().data == []
    assert [j.id for j in admin.fine_tuning.jobs.list().data] == [job.id]
    assert admin.fine_tuning.jobs.retrieve(job.id).id == job.id


def test_retried_creates_start_one_job(api):
    acme = api.client("acme")
    f = upload(acme, jsonl(CHAT))
    h = {"Authorization": f"Bearer {KEYS['acme']}"}
    body = {"model": "tiny-llama", "training_file": f.id}
    a = api.http.post("/v1/fine_tuning/jobs", json=body, headers={**h, "Idempotency-Key": "k1"}).json()
    b = api.http.post("/v1/fine_tuning/jobs", json=body, headers={**h, "Idempotency-Key": "k1"}).json()
    assert a["id"] == b["id"]
    r = api.http.post("/v1/fine_tuning/jobs", json={**body, "seed": 1}, headers={**h, "Idempotency-Key": "k1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "idempotency_key_reused"
    # the openai client's own retry: same body, x-stainless-retry-count > 0, no key
    c = api.http.post("/v1/fine_tuning/jobs", json={**body, "seed": 2}, headers={**h, "x-stainless-retry-count": "0"}).json()
    d = api.http.post("/v1/fine_tuning/jobs", json={**body, "seed": 2}, headers={**h, "x-stainless-retry-count": "1"}).json()
    assert c["id"] == d["id"] != a["id"]
    assert len(api.queue.list()) == 2


def test_concurrent_jobs_quota_is_429_and_pagination_walks_every_job_once(api):
    acme = api.client("acme")
    f = upload(acme, jsonl(CHAT))
    made = [acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, seed=i).id for i in range(3)]
    with pytest.raises(openai.RateLimitError) as exc:
        acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, seed=9)
    assert "concurrent jobs quota" in exc.value.message and "3" in exc.value.message
    acme.fine_tuning.jobs.cancel(made[0])
    assert acme.fine_tuning.jobs.retrieve(made[0]).status == "cancelled"
    made.append(acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, seed=10).id)
    page = acme.fine_tuning.jobs.list(limit=1)
    assert len(page.data) == 1 and page.has_more
    walked = [j.id for j in acme.fine_tuning.jobs.list(limit=1)]  # the client pages with after=
    assert sorted(walked) == sorted(made) and len(walked) == len(set(walked))
    assert walked[0] == made[-1]  # newest first
    with pytest.raises(openai.BadRequestError):
        acme.fine_tuning.jobs.cancel(made[0])  # already cancelled


def test_model_names_with_slash_work_raw_and_percent_encoded(api, tiny_llama, tmp_path):
    from farm.catalog import Catalog
    from tests.test_serve_support import make_adapter

    Catalog((api.home / "catalog").as_uri()).publish("acme", "ft-x-1", make_adapter(tiny_llama, tmp_path / "a", seed=1), {})
    h = {"Authorization": f"Bearer {KEYS['acme']}"}
    for path in ("/v1/models/acme/ft-x-1@v1", "/v1/models/acme%2Fft-x-1@v1", "/v1/models/tiny-llama"):
        r = api.http.get(path, headers=h)
        assert r.status_code == 200, (path, r.text)
    assert api.client("acme").models.retrieve("acme/ft-x-1@v1").id == "acme/ft-x-1@v1"
    r = api.http.get("/v1/models/acme%2Fft-x-1", headers={"Authorization": f"Bearer {KEYS['globex']}"})
    assert r.status_code == 404 and "error" in r.json()


def test_submit_time_checks_guard_api_jobs(api, tmp_path):
    """The checks `farm submit` runs (farm.preflight) also run at create: a policy whose base folder
    is gone fails the job by name and queues nothing."""
    import shutil

    acme = api.client("acme")
    f = upload(acme, jsonl(CHAT))
    gone = tmp_path / "gone-model"
    shutil.copytree(api.policy.base_model, gone)
    api.policy.base_model = str(gone)
    shutil.rmtree(gone)
    job = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    assert job.status == "failed" and job.error.param == "model"
    assert "base_model" in job.error.message and str(gone) in job.error.message
    assert api.queue.list() == []


def test_uploads_are_parsed_off_the_event_loop_with_a_part_limit(api, monkeypatch):
    """A hostile multipart body must not stall other tenants: while one upload is being parsed (held
    here), another tenant's request on the same server completes."""
    import threading

    from farm.finetune import multipart
    from tests.test_finetune_replicas import Replica

    other_done, seen_loop = threading.Event(), []
    real = multipart.parse

    def held(*args, **kwargs):
        import asyncio

        try:
            asyncio.get_running_loop()
            seen_loop.append(True)
        except RuntimeError:
            seen_loop.append(False)
        other_done.wait(60)  # if this ran on the event loop, the other request could never finish
        return real(*args, **kwargs)

    monkeypatch.setattr(multipart, "parse", held)
    server = Replica(api.cfg, api.keys, (api.home / "catalog").as_uri())
    try:
        acme, globex = server.client(KEYS["acme"]), server.client(KEYS["globex"])
        done = []
        t = threading.Thread(target=lambda: done.append(upload(acme, jsonl(CHAT))))
        t.start()
        while not seen_loop:
            other_done.wait(0.05)
        assert globex.files.list().data == [] and not done  # answered while acme's body was held
        other_done.set()
        t.join(60)
        assert done and done[0].status == "processed" and seen_loop == [False]
    finally:
        server.stop()


def test_a_body_of_many_tiny_parts_is_refused_at_the_part_limit(api):
    part = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\ny\r\n'
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n' + jsonl(CHAT)
            + b'\r\n--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            + part * 1000 + b"--b--\r\n")
    r = api.http.post("/v1/files", content=body, headers={"Authorization": f"Bearer {KEYS['acme']}",
                                                          "Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "more than 8 parts" in r.json()["error"]["message"], r.text
    assert api.client("acme").files.list().data == []


def test_an_upload_completes_while_another_tenants_create_tokenizes(api, monkeypatch):
    import threading

    from farm.finetune.mapping import Jobs

    tokenizing, uploaded, upload_seen = threading.Event(), threading.Event(), []
    real = Jobs._count_tokens

    def held(self, *args, **kwargs):
        tokenizing.set()
        upload_seen.append(uploaded.wait(60))  # on a store-wide lock the upload waits for this: False
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Jobs, "_count_tokens", held)
    acme, globex = api.client("acme"), api.client("globex")
    f = upload(acme, jsonl(CHAT))
    created = []
    t = threading.Thread(target=lambda: created.append(acme.fine_tuning.jobs.create(model="tiny-llama",
                                                                                    training_file=f.id)))
    t.start()
    assert tokenizing.wait(60)
    assert upload(globex, jsonl(CHAT)).status == "processed"
    uploaded.set()
    t.join(120)
    assert upload_seen == [True]  # the upload went through while the create was tokenizing
    assert created and created[0].status == "queued"


BIG_METADATA = json.dumps({"model": "tiny-llama", "training_file": "file-x", "metadata": {"a": "x" * 100_000}})


@pytest.mark.parametrize("raw, status, words", [
    (b'{"model": "tiny-llama", "training_file": "file-x", "hyperparameters": {"n_epochs": NaN}}', 400, "NaN"),
    (b'{"model": "tiny-llama", "training_file": "file-x", "hyperparameters": {"batch_size": Infinity}}', 400,
     "Infinity"),
    (b'{"model": "tiny-llama", "training_file": "file-x", "hyperparameters": {"n_epochs": 1e999}}', 400,
     "out of range"),
    (b'{"model": "tiny-llama", "metadata": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400, "nested deeper"),
    (BIG_METADATA.encode(), 413, "65536-byte limit"),
])
def test_malformed_or_oversized_create_bodies_are_4xx_not_500(api, raw, status, words):
    r = api.http.post("/v1/fine_tuning/jobs", content=raw,
                      headers={"Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json"})
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert api.queue.list() == []


def test_file_names_are_bounded_and_count_toward_stored_bytes(api):
    acme = api.client("acme")
    with pytest.raises(openai.BadRequestError) as exc:
        upload(acme, jsonl(CHAT), name="n" * 1000 + ".jsonl")
    assert exc.value.body["param"] == "file" and "255" in exc.value.message
    assert acme.files.list().data == []
    row = jsonl(CHAT[:1])
    upload(acme, row * (3900 // len(row)), name="a" * 240 + ".jsonl")
    rest = row * ((6000 - 3900 // len(row) * len(row) - 240 - 6) // len(row))  # fits only with a short name
    with pytest.raises(openai.RateLimitError):
        upload(acme, rest, name="b" * 240 + ".jsonl")
    upload(acme, rest, name="b.jsonl")


@pytest.mark.parametrize("fault", ["files store write", "queue transaction"])
def test_a_create_that_fails_at_one_write_leaves_nothing_or_one_visible_job(api, monkeypatch, fault):
    """A write failing once inside create, then the client's retry: one job, visible to the API."""
    from farm.finetune.store import FinetuneStore
    from farm.queue.store import SQLiteStore

    acme = api.client("acme")
    f = upload(acme, jsonl(CHAT))
    target, name = (FinetuneStore, "_write_bytes") if fault == "files store write" else (SQLiteStore, "_event")
    real, failed = getattr(target, name), []

    def once(self, *args, **kwargs):
        if not failed:
            failed.append(name)
            raise OSError("injected write failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(target, name, once)
    h = {"Authorization": f"Bearer {KEYS['acme']}", "Idempotency-Key": "one-job"}
    body = {"model": "tiny-llama", "training_file": f.id}
    first = api.http.post("/v1/fine_tuning/jobs", json=body, headers=h)
    second = api.http.post("/v1/fine_tuning/jobs", json=body, headers=h)
    assert second.status_code == 200, second.text
    if first.status_code == 200:
        assert first.json()["id"] == second.json()["id"]
    queued = [j.id for j in api.queue.list(customer="acme")]
    assert queued == [second.json()["id"].removeprefix("ftjob-")]
    assert [j.id for j in acme.fine_tuning.jobs.list().data] == [second.json()["id"]]


def test_deleting_a_file_an_active_job_reads_is_409_until_the_job_ends(api):
    acme = api.client("acme")
    f = upload(acme, jsonl(CHAT))
    job = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    with pytest.raises(openai.ConflictError) as exc:
        acme.files.delete(f.id)
    assert job.id in exc.value.message and exc.value.body["code"] == "file_in_use"
    assert acme.files.content(f.id).read() == jsonl(CHAT)
    acme.fine_tuning.jobs.cancel(job.id)
    assert acme.files.delete(f.id).deleted is True


def test_result_files_are_rendered_on_read_and_reads_write_nothing(api):
    acme = api.client("acme")
    f = upload(acme, jsonl(CHAT))
    job = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    run = api.queue.claim_next("test-scheduler", lease_ttl=60)
    api.queue.record_progress(run.id, run.lease_id, {"step": 2, "total_steps": 2, "loss": 1.25, "eval_loss": 1.5,
                                                     "tokens": 40})
    api.queue.succeed(run.id, run.lease_id, adapter_ref="acme/ft-job-x@v1", tokens=40)
    stored = api.home / "finetune"
    before = {(p, p.stat().st_mtime_ns) for p in stored.rglob("*")}
    got = acme.fine_tuning.jobs.retrieve(job.id)
    assert got.status == "succeeded" and len(got.result_files) == 1
    assert [j.result_files for j in acme.fine_tuning.jobs.list().data] == [got.result_files]
    rid = got.result_files[0]
    meta = acme.files.retrieve(rid)
    assert meta.purpose == "fine-tune-results" and meta.filename == f"{job.id}-metrics.csv"
    csv = acme.files.content(rid).read()
    assert csv.splitlines() == [b"step,train_loss,valid_loss,tokens", b"2,1.25,1.5,40"] and meta.bytes == len(csv)
    with pytest.raises(openai.NotFoundError):
        api.client("globex").files.retrieve(rid)
    assert {(p, p.stat().st_mtime_ns) for p in stored.rglob("*")} == before  # the GETs wrote nothing


def test_an_upload_whose_write_fails_gives_its_reservation_back(api, monkeypatch):
    from farm.finetune.store import FinetuneStore

    real, failed = FinetuneStore._write_bytes, []

    def once(self, path, data):
        if path.endswith(".jsonl") and not failed:
            failed.append(path)
            raise OSError("injected write failure")
        return real(self, path, data)

    monkeypatch.setattr(FinetuneStore, "_write_bytes", once)
    r = api.http.post("/v1/files", files={"file": ("t.jsonl", jsonl(CHAT))}, data={"purpose": "fine-tune"},
                      headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 500 and failed
    store = FinetuneStore(api.cfg.files_url)
    assert store.usage("acme") == {"files": 0, "bytes": 0}
    f = upload(api.client("acme"), jsonl(CHAT))
    assert store.usage("acme") == {"files": 1, "bytes": f.bytes + len("train.jsonl")}
    api.client("acme").files.delete(f.id)
    assert store.usage("acme") == {"files": 0, "bytes": 0}
