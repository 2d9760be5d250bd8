"""The served API on the vLLM engine, end to end: real Ray Serve, real HTTP, the official openai
client, the real vLLM CPU build (`make vllm-env` builds .venv-vllm; the test is skipped only when
no vLLM environment exists). One vLLM-backed app for the whole module (vLLM starts in ~30 s or more).

Base unquantized in fp32 (vLLM's NF4 is CUDA-only; `dtype: fp32`), so answers are compared with stock
PEFT on an fp32 base. Not bf16: on a CPU without AVX512-BF16 vLLM's bf16 kernels round differently from
torch's and flip near-tied greedy tokens (seen on an AMD EPYC without AVX-512), which says nothing
about which adapter answered.
2 LoRA slots and 4 adapters per replica: the adapter-pressure test runs more distinct adapters
than slots in flight, base requests mixed in.
"""

from __future__ import annotations

import concurrent.futures
from types import SimpleNamespace

import httpx
import openai
import pytest

from farm.serve.auth import KeyStore
from farm.serve.engines.base import vllm_python
from tests.ports import free_port
from tests.serve_helpers import KEYS, PROMPT, publish_under_traffic, wait_healthy, write_keys_file
from tests.test_serve_support import make_adapter

pytestmark = [pytest.mark.ray, pytest.mark.skipif(vllm_python() is None, reason="no vLLM environment (make vllm-env)")]

# Seeds of the test adapters (tests/test_serve_support.make_adapter). Their LoRA B is scaled up 40x
# so that they change the greedy argmax: every adapter (and the base) answers differently.
SEEDS = {"acme/support": 3, "acme/notes": 7, "globex/billing": 9, "acme/extra": 4}


def stock_fp32(base, adapter_dir, prompt_ids: list[int], n: int) -> str:
    """Stock transformers + PEFT greedy output on an fp32 base (the precision vLLM serves here)."""
    import torch
    from peft import PeftModel

    from farm.modeling import Quantization, load_base_model, load_tokenizer

    model = load_base_model(str(base), quant=Quantization(mode="none", compute_dtype="fp32"), device="cpu")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return load_tokenizer(str(base)).decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def lm_head_adapter(base, dest):
    """The demo manifest's kind of adapter: LoRA plus a full trained copy of lm_head (modules_to_save)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from farm.modeling import load_base_model

    torch.manual_seed(0)
    model = load_base_model(str(base), device="cpu")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    get_peft_model(model, cfg).save_pretrained(dest)
    return dest


def big_rank_adapter(base, dest):
    from peft import LoraConfig, get_peft_model

    from farm.modeling import load_base_model

    model = load_base_model(str(base), device="cpu")
    get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"])).save_pretrained(dest)
    return dest


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
    dirs = {name: make_adapter(tiny_llama, made / name.replace("/", "_"), seed=s) for name, s in SEEDS.items()}
    dirs["acme/fresh"] = make_adapter(tiny_llama, made / "fresh1", seed=7)
    dirs["acme/head"] = lm_head_adapter(tiny_llama, made / "head")
    dirs["acme/big"] = big_rank_adapter(tiny_llama, made / "big")
    for name, d in dirs.items():
        customer, adapter = name.split("/")
        cat.publish(customer, adapter, d, {})
    keys_file = write_keys_file(home)
    cfg = ServeConfig(
        base_model=str(tiny_llama), catalog_url=url, replicas=1, engine="vllm", quantization="none", dtype="fp32",
        max_adapters=4, lora_slots=2, max_lora_rank=8, max_batch_size=8, max_waiting=48, max_tokens_cap=64,
        max_body_bytes=32 * 1024, port=free_port(), keys_file=str(keys_file), resolve_ttl_s=1.0,
        cpus_per_replica=1,
    )
    base = deploy(cfg, KeyStore.load(cfg.keys_file), name="farm-vllm-test")
    wait_healthy(base, timeout=300)
    from farm.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    yield SimpleNamespace(base=base, url=f"{base}/v1", cat=cat, dirs=dirs, made=made, cfg=cfg, tiny=tiny_llama, tok=tok)
    serve.delete("farm-vllm-test")
    serve.shutdown()


def client(served, who: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url, api_key=KEYS[who], max_retries=retries, timeout=300)


def admin_state(served) -> dict:
    return httpx.get(f"{served.base}/admin/cache", headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=30).json()


def test_completions_chat_streaming_and_models_on_vllm(served):
    tok = served.tok
    assert admin_state(served)["engine"] == "vllm"
    for who, name in (("acme", "acme/support"), ("globex", "globex/billing")):
        c = client(served, who)
        want = stock_fp32(served.tiny, served.dirs[name], tok(PROMPT).input_ids, 8)
        r = c.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.model == f"{name}@v1" and r.choices[0].text == want
        assert r.usage.completion_tokens <= 8
        chunks = list(c.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == want
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        messages = [{"role": "user", "content": "Where is my order?"}]
        chat_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False).input_ids
        want_chat = stock_fp32(served.tiny, served.dirs[name], chat_ids, 6)
        r = c.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
        assert r.model == f"{name}@v1" and r.choices[0].message.content == want_chat
        stream = c.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want_chat
    base_name = served.cfg.served_name
    r = client(served, "acme").completions.create(model=base_name, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.model == base_name and r.choices[0].text == stock_fp32(served.tiny, None, tok(PROMPT).input_ids, 8)
    # stop strings cut the text where the stop begins
    full = stock_fp32(served.tiny, None, tok(PROMPT).input_ids, 16)
    stop = full[3:5]
    cut = client(served, "acme").completions.create(model=base_name, prompt=PROMPT, max_tokens=16, temperature=0,
                                                     stop=[stop]).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    # seeds
    kw = dict(model="acme/support", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.95)
    c = client(served, "acme")
    a = c.completions.create(seed=11, **kw).choices[0].text
    assert c.completions.create(seed=11, **kw).choices[0].text == a
    assert any(c.completions.create(seed=s, **kw).choices[0].text != a for s in (12, 13))
    ids = {m.id for m in client(served, "globex").models.list().data}
    assert ids == {"globex/billing", base_name}


def test_tenancy_bad_refs_and_limits_on_vllm(served):
    g = client(served, "globex")
    with pytest.raises(openai.NotFoundError):
        g.completions.create(model="acme/support", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        g.completions.create(model="globex/nope", prompt=PROMPT, max_tokens=4)
    for bad in ("../etc/passwd", "acme/support@v0", "ACME/Support"):
        with pytest.raises(openai.BadRequestError):
            client(served, "admin").completions.create(model=bad, prompt=PROMPT, max_tokens=4)
    c = client(served, "acme")
    with pytest.raises(openai.BadRequestError, match="512"):
        c.completions.create(model="acme/support", prompt="word " * 600, max_tokens=32)
    with pytest.raises(openai.BadRequestError, match="cap of 64"):
        c.completions.create(model="acme/support", prompt=PROMPT, max_tokens=1000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url, api_key="wrong", max_retries=0).models.list()


def test_adapters_vllm_cannot_take_get_a_422_and_the_replica_serves_on(served):
    c = client(served, "acme")
    want = stock_fp32(served.tiny, served.dirs["acme/notes"], served.tok(PROMPT).input_ids, 8)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.completions.create(model="acme/head", prompt=PROMPT, max_tokens=4)
    assert "modules_to_save ['lm_head']" in e.value.message and "--engine farm" in e.value.message
    assert c.completions.create(model="acme/notes", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text == want
    with pytest.raises(openai.UnprocessableEntityError, match="rank 16 is above this replica's max_lora_rank 8"):
        c.completions.create(model="acme/big", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError):  # asked again: the same answer, not a crash
        c.chat.completions.create(model="acme/head", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    assert c.completions.create(model="acme/notes", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text == want


def test_adapter_pressure_every_answer_is_its_own_adapter(served):
    """4 adapters + the base, 2 LoRA slots, 40 concurrent greedy requests: each answer equals that
    adapter's (or the base's) solo stock-PEFT output, and the gate really held requests back."""
    ids = served.tok(PROMPT).input_ids
    names = list(SEEDS) + [served.cfg.served_name]
    want = {n: stock_fp32(served.tiny, served.dirs.get(n), ids, 8) for n in names}
    assert len(set(want.values())) == len(names)  # a mix-up could not go unseen
    before = admin_state(served)["stats"]
    c = client(served, "admin", retries=3)

    def ask(i: int):
        name = names[i % len(names)]
        return name, c.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(ask, range(40)))
    wrong = [(n, got) for n, got in answers if got != want[n]]
    assert not wrong, wrong
    stats = admin_state(served)["stats"]
    # 2 slots + the base's identity adapter (base requests run as a zero LoRA, see docs/serving.md)
    assert stats["gate_slots"] == 3 and stats["gate_peak_adapters_in_flight"] <= 3
    assert stats["gate_waited_for_slot"] > before.get("gate_waited_for_slot", 0)  # there was pressure


def test_publishing_v2_under_traffic_switches_to_v2_on_vllm(served):
    # Observable events, not a stopwatch (how fast v2 shows up is bench/serve.py's business): a request
    # sent after the publish is answered by v2, then a few more after the first v2.
    v2_dir = make_adapter(served.tiny, served.made / "fresh2", seed=9)
    sw = publish_under_traffic(lambda: client(served, "acme"), "acme/fresh", "acme/fresh@v2",
                               lambda: served.cat.publish("acme", "fresh", v2_dir, {}), warm=2, after=4, timeout=120)
    assert {m for s, r, m in sw.seen if r < sw.publishing} == {"acme/fresh@v1"}
    assert {m for s, r, m in sw.seen if s > sw.first_new} == {"acme/fresh@v2"}


def test_logprobs_on_vllm_equal_stock_fp32_log_softmax_and_echo_scores_are_refused(served):
    """Completion and chat logprobs for the base and an adapter are stock transformers/PEFT's fp32
    log-softmax (within 1e-3: vLLM's CPU kernels sum in another order), from vLLM's raw logprobs.
    echo with logprobs (prompt logprobs) is a 400 on this engine; echo alone and max_tokens=0 work."""
    from farm.modeling import Quantization
    from farm.serve.logprobs import TokenText
    from tests.test_serve_support import stock_logprobs

    tok, fp32 = served.tok, Quantization(mode="none", compute_dtype="fp32")
    text_of = TokenText(tok)
    prompt_ids = tok(PROMPT).input_ids
    rows = [(served.cfg.served_name, None), ("acme/support", served.dirs["acme/support"])]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda r: client(served, "acme").completions.create(
            model=r[0], prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3), rows))
    for (_, adapter_dir), r in zip(rows, answers):
        ids, lp = stock_logprobs(served.tiny, adapter_dir, prompt_ids, quant=fp32, generate=6)
        got = r.choices[0].logprobs
        assert got.tokens == [text_of(t)[0] for t in ids[len(prompt_ids):]]
        for n, value in enumerate(got.token_logprobs):
            want = lp[len(prompt_ids) + n - 1]
            assert abs(value - float(want[ids[len(prompt_ids) + n]])) <= 1e-3, n
            assert 1 <= len(got.top_logprobs[n]) <= 4
            assert abs(max(got.top_logprobs[n].values()) - float(want.max())) <= 1e-3
    messages = [{"role": "user", "content": "Where is my order?"}]
    chat_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids
    r = client(served, "acme").chat.completions.create(model="acme/notes", messages=messages, max_tokens=6,
                                                       temperature=0, logprobs=True, top_logprobs=2)
    ids, lp = stock_logprobs(served.tiny, served.dirs["acme/notes"], chat_ids, quant=fp32, generate=6)
    content = r.choices[0].logprobs.content
    assert len(content) == len(ids) - len(chat_ids)
    for n, c in enumerate(content):
        assert abs(c.logprob - float(lp[len(chat_ids) + n - 1][ids[len(chat_ids) + n]])) <= 1e-3
        assert len(c.top_logprobs) == 2
    with pytest.raises(openai.BadRequestError, match="echo"):
        client(served, "acme").completions.create(model="acme/support", prompt=PROMPT, max_tokens=2, echo=True, logprobs=1)
    echoed = client(served, "acme").completions.create(model="acme/support", prompt=PROMPT, max_tokens=0, echo=True)
    assert echoed.choices[0].text == PROMPT and echoed.usage.completion_tokens == 0
    # the engine is still up after the refusal
    assert client(served, "acme").completions.create(model="acme/support", prompt=PROMPT, max_tokens=2).choices


def test_tinker_sampling_options_on_vllm_stop_ids_kept_and_top_k(served):
    """What the Tinker sampler asks of an engine (the ingress's generate_ids): a stop token id ends the
    completion and, with keep_stop_token, is its last token; top_k=1 at temperature 1 is greedy."""
    from ray import serve

    from farm.serve.auth import Principal

    ingress = serve.get_deployment_handle("AdapterServer", app_name="farm-vllm-test")
    ids = served.tok(PROMPT).input_ids

    def gen(**kw) -> dict:
        return ingress.generate_ids.remote(Principal("acme"), "acme/support", ids, max_tokens=8, **kw).result(
            timeout_s=300)

    free = gen(temperature=0.0)
    tokens = [e[0] for e in free["logprobs"]]
    assert len(tokens) == 8 and free["finish_reason"] == "length"
    upto = tokens.index(tokens[2])
    stopped = gen(temperature=0.0, stop_token_ids=[tokens[2]], keep_stop_token=True)
    assert [e[0] for e in stopped["logprobs"]] == tokens[: upto + 1] and stopped["finish_reason"] == "stop"
    assert [e[0] for e in gen(temperature=1.0, top_k=1, seed=5)["logprobs"]] == tokens
