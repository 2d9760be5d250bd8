"""The served API end to end: real local Ray Serve, real HTTP on 127.0.0.1, the real openai client.

One deployment for the whole module (Serve start-up is slow on 2 cores): 1 replica, K=2 adapters,
small queues so overload is reachable. Adapters are made with stock PEFT and published to a real
local catalog; outputs are compared with stock PEFT's greedy generation.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import openai
import pytest

from farm.serve.auth import KeyStore
from tests.ports import free_port
from tests.serve_helpers import (
    KEYS,
    PROMPT,
    peft_initializers,
    publish_under_traffic,
    wait_healthy,
    with_config,
    write_keys_file,
)
from tests.test_serve_support import make_adapter, stock_greedy

pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def served(ray_cluster, tiny_llama, tmp_path_factory, module_farm_home):
    from ray import serve

    from farm.catalog import Catalog
    from farm.serve.app import deploy
    from farm.serve.config import ServeConfig

    home = module_farm_home
    url = (home / "catalog").as_uri()
    cat = Catalog(url)
    made = tmp_path_factory.mktemp("made")
    dirs = {
        "acme/support": make_adapter(tiny_llama, made / "support", seed=1),
        "acme/notes": make_adapter(tiny_llama, made / "notes", seed=2),
        "globex/billing": make_adapter(tiny_llama, made / "billing", seed=3),
        "acme/fresh": make_adapter(tiny_llama, made / "fresh1", seed=4),
        "acme/sentiment": make_adapter(tiny_llama, made / "sentiment", seed=5, task="seq_cls"),
        "globex/head": make_adapter(tiny_llama, made / "head", seed=7, modules_to_save=["lm_head"]),
    }
    for name, d in dirs.items():
        customer, adapter = name.split("/")
        meta = {"task": "seq_cls", "label_names": ["neg", "neu", "pos"]} if adapter == "sentiment" else {}
        cat.publish(customer, adapter, d, meta)
    keys_file = write_keys_file(home)
    cfg = ServeConfig(
        base_model=str(tiny_llama), catalog_url=url, replicas=1, max_adapters=2, max_batch_size=8,
        max_wait_ms=10, max_waiting=8, max_tokens_cap=64, max_body_bytes=32 * 1024, port=free_port(),
        keys_file=str(keys_file), resolve_ttl_s=1.0,
    )
    base = deploy(cfg, KeyStore.load(cfg.keys_file), name="farm-test")

    wait_healthy(base, timeout=120)
    yield SimpleNamespace(base=base, url=f"{base}/v1", cat=cat, dirs=dirs, made=made, cfg=cfg, tiny=tiny_llama)
    serve.delete("farm-test")
    serve.shutdown()


def client(served, who: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url, api_key=KEYS[who], max_retries=0, timeout=60)


def _ids(served, text: str) -> list[int]:
    from farm.modeling import load_tokenizer

    return load_tokenizer(str(served.tiny))(text).input_ids


def test_completions_chat_and_streaming_match_stock_peft(served):
    from farm.modeling import load_tokenizer

    tok = load_tokenizer(str(served.tiny))
    for who, name in (("acme", "acme/support"), ("globex", "globex/billing")):
        c = client(served, who)
        want = stock_greedy(served.tiny, served.dirs[name], tok(PROMPT).input_ids, 16)
        r = c.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0)
        assert r.model == f"{name}@v1"
        assert r.choices[0].text == want
        assert r.usage.completion_tokens <= 16
        pinned = c.completions.create(model=f"{name}@v1", prompt=PROMPT, max_tokens=16, temperature=0)
        assert pinned.choices[0].text == want
        chunks = list(c.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == want
        assert {ch.model for ch in chunks} == {f"{name}@v1"}
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        messages = [{"role": "user", "content": "Where is my order?"}]
        chat_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False).input_ids
        want_chat = stock_greedy(served.tiny, served.dirs[name], chat_ids, 12)
        r = c.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
        assert r.model == f"{name}@v1" and r.choices[0].message.content == want_chat
        stream = c.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want_chat
    # the base model by its name
    base_name = served.cfg.served_name
    r = client(served, "acme").completions.create(model=base_name, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.model == base_name and r.choices[0].text == stock_greedy(served.tiny, None, tok(PROMPT).input_ids, 8)


def test_same_seed_same_output(served):
    c = client(served, "acme")
    kw = dict(model="acme/support", prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.95)
    a = c.completions.create(seed=11, **kw).choices[0].text
    assert c.completions.create(seed=11, **kw).choices[0].text == a
    assert any(c.completions.create(seed=s, **kw).choices[0].text != a for s in (12, 13))


def test_models_lists_only_the_callers_adapters(served):
    ids = {m.id for m in client(served, "acme").models.list().data}
    assert {"acme/support", "acme/notes", "acme/sentiment", served.cfg.served_name} <= ids
    assert "globex/billing" not in ids
    ids = {m.id for m in client(served, "globex").models.list().data}
    assert ids == {"globex/billing", "globex/head", served.cfg.served_name}
    assert "globex/billing" in {m.id for m in client(served, "admin").models.list().data}


def test_cross_tenant_is_404_like_a_missing_adapter(served):
    c = client(served, "globex")
    with pytest.raises(openai.NotFoundError) as foreign:
        c.completions.create(model="acme/support", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.NotFoundError) as missing:
        c.completions.create(model="globex/nope", prompt=PROMPT, max_tokens=4)
    assert "not found" in foreign.value.message and "not found" in missing.value.message
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="acme/support@v1", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url, api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(
    "model", ["../etc/passwd", "acme/../globex/billing", "/abs/path", "s3://bucket/x", "acme/%2e%2e", "acme\\x",
              "acme/support@v0", "ACME/Support", "acme/support/extra"]
)
def test_bad_refs_are_400(served, model):
    with pytest.raises(openai.BadRequestError):
        client(served, "admin").completions.create(model=model, prompt=PROMPT, max_tokens=4)


def test_limits_are_4xx_naming_the_numbers(served):
    c = client(served, "acme")
    long_prompt = "word " * 600
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="acme/support", prompt=long_prompt, max_tokens=32)
    n = len(_ids(served, long_prompt))
    assert f"{n} tokens" in e.value.message and "max_tokens is 32" in e.value.message and "512" in e.value.message
    with pytest.raises(openai.BadRequestError, match="cap of 64"):
        c.completions.create(model="acme/support", prompt=PROMPT, max_tokens=1000)
    r = httpx.post(f"{served.url}/completions", content=b"x" * 40_000,
                   headers={"Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(f"{served.url}/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 400
    with pytest.raises(openai.BadRequestError, match="classify"):
        c.completions.create(model="acme/sentiment", prompt=PROMPT, max_tokens=4)
    ok = c.completions.create(model="acme/support", prompt=PROMPT, max_tokens=2, temperature=0)
    assert ok.model == "acme/support@v1" and 1 <= ok.usage.completion_tokens <= 2  # still serving after all that


def test_classify_matches_stock_peft(served):
    import torch
    from peft import PeftModel

    from farm.modeling import load_base_model

    r = httpx.post(f"{served.url}/classify", json={"model": "acme/sentiment", "input": "great service"},
                   headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "acme/sentiment@v1" and set(body["probabilities"]) == {"neg", "neu", "pos"}
    base = load_base_model(str(served.tiny), task="seq_cls", num_labels=3, device="cpu")
    model = PeftModel.from_pretrained(base, str(served.dirs["acme/sentiment"])).eval()
    with torch.inference_mode():
        probs = torch.softmax(model(input_ids=torch.tensor([_ids(served, "great service")])).logits[0], -1)
    assert body["probabilities"]["pos"] == pytest.approx(float(probs[2]), abs=1e-4)
    r = httpx.post(f"{served.url}/classify", json={"model": "acme/sentiment", "input": "x"},
                   headers={"Authorization": f"Bearer {KEYS['globex']}"})
    assert r.status_code == 404


def test_overload_is_503_with_retry_after_then_recovers(served):
    async def flood():
        async with httpx.AsyncClient(timeout=120) as h:
            body = {"model": "acme/support", "prompt": PROMPT, "max_tokens": 64, "temperature": 0}
            hdr = {"Authorization": f"Bearer {KEYS['acme']}"}
            return await asyncio.gather(*[h.post(f"{served.url}/completions", json=body, headers=hdr) for _ in range(60)])

    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert 500 not in codes and set(codes) <= {200, 503, 429}, codes
    busy = [r for r in responses if r.status_code in (503, 429)]
    assert busy and all(int(r.headers["retry-after"]) >= 1 for r in busy)
    assert codes.count(200) >= served.cfg.max_batch_size
    r = client(served, "acme").completions.create(model="acme/support", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.model == "acme/support@v1" and 1 <= r.usage.completion_tokens <= 4  # serving again after the flood


def test_lru_with_k2_evicts_and_reloads(served):
    admin = client(served, "admin")
    hdr = {"Authorization": f"Bearer {KEYS['admin']}"}
    want = {n: stock_greedy(served.tiny, served.dirs[n], _ids(served, PROMPT), 8)
            for n in ("acme/support", "acme/notes", "globex/billing")}
    before = httpx.get(f"{served.base}/admin/cache", headers=hdr).json()
    for name in ("acme/support", "acme/notes", "globex/billing", "acme/support", "acme/notes"):
        r = admin.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.choices[0].text == want[name], name
        state = httpx.get(f"{served.base}/admin/cache", headers=hdr).json()
        assert len(state["resident"]) <= 2 and f"{name}@v1" in state["resident"]
    after = httpx.get(f"{served.base}/admin/cache", headers=hdr).json()
    assert after["resident"] == ["acme/notes@v1", "acme/support@v1"]
    assert after["stats"]["evictions"] - before["stats"].get("evictions", 0) >= 3
    assert after["stats"]["loads"] - before["stats"]["loads"] >= 4  # support and notes were reloaded


def test_publishing_v2_under_traffic_switches_to_v2(served, capsys):
    """Requests running while v2 is published: v1 before, then v2 once the resolve TTL lapses, and
    never v1 again. Waits on the event (a v2 answer to a request sent after publish), not on a clock."""
    v2_dir = make_adapter(served.tiny, served.made / "fresh2", seed=6)
    sw = publish_under_traffic(lambda: client(served, "acme"), "acme/fresh", "acme/fresh@v2",
                               lambda: served.cat.publish("acme", "fresh", v2_dir, {}), warm=4, after=6, timeout=60)
    with capsys.disabled():
        print(f"\ntime-to-fresh: {sw.first_new - sw.published:.2f}s ({len(sw.seen)} requests; "
              f"resolve TTL {served.cfg.resolve_ttl_s}s)")
    # a request sent while publish() runs may already see v2: only answers from before it started must be v1
    assert {m for s, r, m in sw.seen if r < sw.publishing} == {"acme/fresh@v1"}
    assert {m for s, r, m in sw.seen if s > sw.first_new} == {"acme/fresh@v2"}
    assert client(served, "acme").completions.create(model="acme/fresh@v1", prompt=PROMPT, max_tokens=2).model == "acme/fresh@v1"


def test_separate_ingress_routes_to_the_model_deployment(served):
    """fused=False (what routing=affinity with several replicas uses): ingress -> handle -> model replica."""
    from ray import serve

    from farm.serve.app import deploy
    from farm.serve.config import ServeConfig

    cfg = ServeConfig(**{**served.cfg.to_dict(), "fused": False, "max_adapters": 2})
    base = deploy(cfg, KeyStore.load(cfg.keys_file), name="farm-test-2tier", route_prefix="/two")
    try:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS["acme"], max_retries=0, timeout=120)
        r = c.completions.create(model="acme/support", prompt=PROMPT, max_tokens=8, temperature=0)
        want = stock_greedy(served.tiny, served.dirs["acme/support"], _ids(served, PROMPT), 8)
        assert r.model == "acme/support@v1" and r.choices[0].text == want
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="acme/support", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
        assert streamed == want
    finally:
        serve.delete("farm-test-2tier")


def test_lru_churn_with_module_copies_every_answer_is_stock_peft(served):
    """K=2 resident adapters, four in use (one with its own lm_head copy) plus the bare base, sent
    concurrently by both tenants in a seeded random order: each answer is stock PEFT's solo answer."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    models = {"acme/support": "acme", "acme/notes": "acme", "globex/billing": "globex", "globex/head": "globex",
              served.cfg.served_name: "acme"}
    prompts = [PROMPT, "The quick brown fox"]
    want = {(m, p): stock_greedy(served.tiny, served.dirs.get(m), _ids(served, p), 8) for m in models for p in prompts}
    assert want["globex/head", PROMPT] != want[served.cfg.served_name, PROMPT]
    rng = random.Random(7)
    calls = [(rng.choice(list(models)), rng.choice(prompts)) for _ in range(30)]
    before = httpx.get(f"{served.base}/admin/cache", headers={"Authorization": f"Bearer {KEYS['admin']}"}).json()

    def ask(call):
        model, prompt = call
        r = client(served, models[model]).completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, calls))
    assert got == [want[c] for c in calls]
    after = httpx.get(f"{served.base}/admin/cache", headers={"Authorization": f"Bearer {KEYS['admin']}"}).json()
    assert after["stats"]["evictions"] > before["stats"]["evictions"]  # the churn really happened


def test_poisoned_folder_refused_at_import_and_attach_base_unchanged(served, tmp_path, monkeypatch):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    import farm.catalog.peft_folder as peft_folder
    from farm.errors import CatalogError

    bad = tmp_path / "bad"
    shutil.copytree(served.dirs["acme/support"], bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.down_proj.weight"
    tensors[key] = torch.zeros(128, 352)
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(CatalogError, match=key.replace(".", r"\.")):
        served.cat.import_adapter(bad, "acme/poison")
    # a version stored before the rule existed (or written around the catalog): the replica refuses it too
    monkeypatch.setattr(peft_folder, "check_tensors", lambda *a, **k: [])
    served.cat.import_adapter(bad, "acme/poison")
    c = client(served, "acme")
    base_name = served.cfg.served_name
    ask = dict(prompt=PROMPT, max_tokens=12, temperature=0)
    base_before = c.completions.create(model=base_name, **ask).choices[0].text
    support_before = c.completions.create(model="acme/support", **ask).choices[0].text
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        c.completions.create(model="acme/poison", **ask)
    assert key in refused.value.message and "shared base" in refused.value.message
    assert c.completions.create(model=base_name, **ask).choices[0].text == base_before
    assert base_before == stock_greedy(served.tiny, None, _ids(served, PROMPT), 12)
    assert c.completions.create(model="acme/support", **ask).choices[0].text == support_before


def test_initializer_adapters_are_422_and_the_base_answers_as_before(served, tmp_path, monkeypatch):
    """Every initializer PEFT offers, named by a stored adapter (one stored before the rule existed,
    or written around the catalog): 422 naming the option, and the bare base and another tenant's
    adapter answer exactly as before."""
    import farm.catalog.peft_folder as peft_folder
    from farm.errors import CatalogError

    overrides = peft_initializers()
    bad = [with_config(served.dirs["acme/support"], tmp_path / f"init{i}", **o) for i, o in enumerate(overrides)]
    with pytest.raises(CatalogError, match="adapter refused: init_lora_weights 'olora'"):
        served.cat.import_adapter(bad[overrides.index({"init_lora_weights": "olora"})], "acme/init")
    monkeypatch.setattr(peft_folder, "check_config", lambda cfg: [])
    for i, folder in enumerate(bad):
        served.cat.import_adapter(folder, f"acme/init{i}")
    c = client(served, "acme")
    ask = dict(prompt=PROMPT, max_tokens=12, temperature=0)
    base_name = served.cfg.served_name
    base_before = c.completions.create(model=base_name, **ask).choices[0].text
    support_before = c.completions.create(model="acme/support", **ask).choices[0].text
    for i, override in enumerate(overrides):
        option = next((k for k in override if k != "init_lora_weights"), "init_lora_weights")
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            c.completions.create(model=f"acme/init{i}", **ask)
        assert option in refused.value.message and "shared base weights" in refused.value.message, override
        assert c.completions.create(model=base_name, **ask).choices[0].text == base_before, override
    assert base_before == stock_greedy(served.tiny, None, _ids(served, PROMPT), 12)
    assert c.completions.create(model="acme/support", **ask).choices[0].text == support_before


@pytest.mark.parametrize("field,value", [("seed", 2**70), ("seed", -(2**64)), ("temperature", 1e-45),
                                         ("temperature", 2.5), ("top_p", 0), ("top_p", 1.5),
                                         ("stop", ["a", "b", "c", "d", "e"]), ("stop", ["x" * 65])])
def test_bad_sampling_fields_are_400_naming_the_field(served, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client(served, "acme").completions.create(model="acme/support", prompt=PROMPT, max_tokens=4, **{field: value})
    assert f"invalid request: {field}" in e.value.message


def test_proxy_check_reports_the_real_listener(served):
    from farm.errors import FarmError
    from farm.serve.proxy import check_existing, running_proxy

    proxy = running_proxy()
    assert proxy == ("127.0.0.1", served.cfg.port)
    assert check_existing(proxy, "127.0.0.1", 1, 0) == proxy  # a keyless re-deploy reports where it really is
    with pytest.raises(FarmError, match="already listens on 0.0.0.0"):
        check_existing(("0.0.0.0", 8000), "127.0.0.1", 8000, 0)
    assert check_existing(("0.0.0.0", 8000), "0.0.0.0", 8000, 2) == ("0.0.0.0", 8000)
def test_adapter_pressure_every_answer_is_its_own_adapter(served):
    """Farm engine: 3 adapters + the base in flight on a replica that holds K=2, greedy, concurrent:
    each answer equals that adapter's (or the base's) solo stock-PEFT output on the NF4 base."""
    import concurrent.futures

    ids = _ids(served, PROMPT)
    names = ["acme/support", "acme/notes", "globex/billing", served.cfg.served_name]
    want = {n: stock_greedy(served.tiny, served.dirs.get(n), ids, 8) for n in names}
    assert len(set(want.values())) == len(names)  # a mix-up could not go unseen
    c = openai.OpenAI(base_url=served.url, api_key=KEYS["admin"], max_retries=5, timeout=120)

    def ask(i: int):
        name = names[i % len(names)]
        return name, c.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(24)))
    assert [(n, got) for n, got in answers if got != want[n]] == []


def test_completion_logprobs_with_echo_equal_stock_peft_for_base_and_adapter_rows(served):
    """Completions with logprobs=3 and echo for the base and an adapter, sent together: every prompt
    and completion token's logprob is stock transformers/PEFT's log-softmax (within 1e-4, NF4 base),
    in OpenAI's legacy shape; echo with max_tokens=0 scores the prompt alone."""
    import concurrent.futures

    from farm.modeling import load_tokenizer
    from farm.serve.logprobs import TokenText
    from tests.test_serve_support import stock_logprobs

    tok = load_tokenizer(str(served.tiny))
    text_of = TokenText(tok)
    prompt_ids = tok(PROMPT).input_ids
    rows = [(served.cfg.served_name, None), ("acme/support", served.dirs["acme/support"])]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda r: client(served, "acme").completions.create(
            model=r[0], prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, echo=True), rows))
    for (_, adapter_dir), r in zip(rows, answers):
        ids, lp = stock_logprobs(served.tiny, adapter_dir, prompt_ids, generate=6)
        choice = r.choices[0]
        got = choice.logprobs
        assert choice.text == PROMPT + tok.decode(ids[len(prompt_ids):], skip_special_tokens=True)
        assert got.tokens == [text_of(t)[0] for t in ids]
        assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
        for t in range(1, len(ids)):
            want = lp[t - 1]
            assert abs(got.token_logprobs[t] - float(want[ids[t]])) <= 1e-4, t
            top = got.top_logprobs[t]
            assert 1 <= len(top) <= 4  # the 3 most likely + the token itself, less ids sharing a text
            assert abs(max(top.values()) - float(want.max())) <= 1e-4
        assert got.text_offset[len(prompt_ids)] == len(PROMPT)
        assert got.text_offset == sorted(got.text_offset)
        assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(ids) - len(prompt_ids)
    scored = client(served, "acme").completions.create(model="acme/support", prompt=PROMPT, max_tokens=0, echo=True,
                                                       logprobs=0)
    assert scored.choices[0].text == PROMPT and scored.usage.completion_tokens == 0
    # scored alone vs in a batch of two: the same math up to float reduction order (a few 1e-7)
    alone, batched = scored.choices[0].logprobs.token_logprobs, answers[1].choices[0].logprobs.token_logprobs
    assert alone[0] is None and len(alone) == len(prompt_ids)
    assert all(abs(a - b) <= 1e-5 for a, b in zip(alone[1:], batched[1: len(prompt_ids)], strict=True))
    plain = client(served, "acme").completions.create(model="acme/support", prompt=PROMPT, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_equal_stock_peft_in_openai_chat_shape(served):
    from farm.modeling import load_tokenizer
    from tests.test_serve_support import stock_logprobs

    tok = load_tokenizer(str(served.tiny))
    messages = [{"role": "user", "content": "Where is my order?"}]
    chat_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids
    r = client(served, "globex").chat.completions.create(model="globex/billing", messages=messages, max_tokens=6,
                                                         temperature=0, logprobs=True, top_logprobs=2)
    ids, lp = stock_logprobs(served.tiny, served.dirs["globex/billing"], chat_ids, generate=6)
    content = r.choices[0].logprobs.content
    assert len(content) == len(ids) - len(chat_ids) == r.usage.completion_tokens
    # a random tiny model may split a character across tokens: the joined bytes decode as the text does
    assert bytes(b for c in content for b in c.bytes).decode(errors="replace") == r.choices[0].message.content
    for n, c in enumerate(content):
        want = lp[len(chat_ids) + n - 1]
        assert abs(c.logprob - float(want[ids[len(chat_ids) + n]])) <= 1e-4
        assert len(c.top_logprobs) == 2 and abs(c.top_logprobs[0].logprob - float(want.max())) <= 1e-4
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    plain = client(served, "globex").chat.completions.create(model="globex/billing", messages=messages, max_tokens=4)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("route, kwargs, names", [
    ("completions", {"logprobs": 21}, ["logprobs", "[0, 20]"]),
    ("completions", {"logprobs": -1}, ["logprobs", "[0, 20]"]),
    ("completions", {"max_tokens": 0}, ["max_tokens", "echo"]),
    ("completions", {"logprobs": 2, "stream": True}, ["logprobs", "stream"]),
    ("chat", {"logprobs": True, "top_logprobs": 21}, ["top_logprobs", "[0, 20]"]),
    ("chat", {"top_logprobs": 2}, ["top_logprobs", "logprobs: true"]),
])
def test_bad_logprob_settings_are_a_400_naming_the_field_and_range(served, route, kwargs, names):
    c = client(served, "acme")
    with pytest.raises(openai.BadRequestError) as err:
        if route == "completions":
            c.completions.create(model="acme/support", prompt=PROMPT, **{"max_tokens": 4, **kwargs})
        else:
            c.chat.completions.create(model="acme/support", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=4, **kwargs)
    for name in names:
        assert name in str(err.value)
