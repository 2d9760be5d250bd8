"""The engine without Ray: mixed-adapter batches reproduce stock PEFT, sampling, stops, slots."""

from __future__ import annotations

import asyncio

import pytest

from farm.serve.engine import Engine, inspect_adapter, keys_only
from farm.serve.engines.base import GenJob
from farm.serve.limits import ApiError
from farm.serve.sampling import Sampler, find_stop, safe_prefix_len
from tests.test_serve_support import make_adapter, stock_greedy

PROMPTS = ["Hello there", "The quick brown fox jumps over", "Hi"]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_llama, root / f"a{i}", seed=i + 1) for i in range(3)]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(str(tiny_llama), max_batch_size=16, max_wait_ms=20, max_waiting=16)


async def _run(engine, slot, prompt, max_tokens=12, stream=False, stops=(), **sampling):
    job = GenJob(prompt_ids=engine.tokenizer(prompt).input_ids, max_tokens=max_tokens,
                 sampler=Sampler(**{"temperature": 0.0, **sampling}), slot=slot, stream=stream, stops=list(stops))
    deltas = []
    async for event in engine.generate(job):
        if "delta" in event:
            deltas.append(event["delta"])
        if "done" in event:
            return event["done"], "".join(deltas)


def test_mixed_adapter_batch_equals_stock_peft_greedy(engine, adapters, tiny_llama):
    slots = [engine.attach(a) for a in adapters]
    rows = [(s, p) for s in slots + [None] for p in PROMPTS]

    async def all_at_once():
        return await asyncio.gather(*[_run(engine, s.name if s else None, p, stream=True) for s, p in rows])

    before = engine.stats["batches"]
    results = asyncio.run(all_at_once())
    assert engine.stats["batches"] - before <= 2, "concurrent requests for 3 adapters + base should share batches"
    for (slot, prompt), (done, streamed) in zip(rows, results):
        adapter_dir = adapters[slots.index(slot)] if slot else None
        want = stock_greedy(tiny_llama, adapter_dir, engine.tokenizer(prompt).input_ids, 12)
        assert done["text"] == want, (slot, prompt)
        assert streamed == done["text"]
    # adapters really differ from each other and from the base
    texts = {r[0]["text"] for r in results[: len(PROMPTS)]} | {r[0]["text"] for r in results[-len(PROMPTS):]}
    assert len(texts) == 2 * len(PROMPTS)
    for s in slots:
        engine.detach(s.name)
    assert set(engine.slots) <= engine._doomed  # PEFT keeps one adapter until the next attach


def test_attach_leaves_the_packed_base_alone(engine, adapters, monkeypatch):
    """An attach loads only the adapter's tensors: no 4-bit weight of the base is converted out of
    bitsandbytes' CPU packing (PEFT's load_adapter would, through state_dict(); see keys_only)."""
    import bitsandbytes.nn.modules as bnb_modules

    packed = engine._packed["causal_lm"].saved
    if not packed:
        pytest.skip("bitsandbytes packs 4-bit weights only on CPUs with AVX512-BF16")
    first = engine.attach(adapters[0]).name  # the engine's PeftModel exists from here on
    converted = []
    real = bnb_modules._convert_weight_packed_for_cpu_inverse
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu_inverse",
                        lambda *a, **k: converted.append(1) or real(*a, **k))
    before = [(w, w.data_ptr()) for w, *_ in packed]
    second = engine.attach(adapters[1]).name
    engine.detach(first)
    assert converted == []
    assert all(w.data_ptr() == ptr and w.quant_state.packing_format_for_cpu for w, ptr in before)
    engine.detach(second)


def test_keys_only_names_every_adapter_key(engine, adapters):
    """What PEFT's load_adapter reads from state_dict() (the adapter's keys) is the same with keys_only;
    only bitsandbytes' quantization-state entries are left out."""
    slot = engine.attach(adapters[2]).name
    real = set(engine.peft.state_dict())
    engine._packed["causal_lm"].restore()
    with keys_only(engine.peft):
        light = set(engine.peft.state_dict())
    assert "state_dict" not in vars(engine.peft)
    lora = {k for k in real if ".lora_" in k}
    assert lora and lora == {k for k in light if ".lora_" in k}
    assert real - light and all(".weight." in k for k in real - light), sorted(real - light)[:5]
    engine.detach(slot)


def test_seed_gives_same_sample_and_stop_strings_cut(engine, adapters):
    slot = engine.attach(adapters[0]).name
    a = asyncio.run(_run(engine, slot, "Hello", max_tokens=20, temperature=0.9, top_p=0.9, seed=7))[0]
    b = asyncio.run(_run(engine, slot, "Hello", max_tokens=20, temperature=0.9, top_p=0.9, seed=7))[0]
    c = asyncio.run(_run(engine, slot, "Hello", max_tokens=20, temperature=0.9, top_p=0.9, seed=8))[0]
    assert a["text"] == b["text"] and a["text"] != c["text"]
    full = asyncio.run(_run(engine, slot, "Hello", max_tokens=20))[0]["text"]
    stop = full[5:8]
    cut, streamed = asyncio.run(_run(engine, slot, "Hello", max_tokens=20, stream=True, stops=[stop]))
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.find(stop)] and streamed == cut["text"]
    engine.detach(slot)


def test_overload_is_an_api_error_and_engine_recovers(engine):
    async def flood():
        return await asyncio.gather(*[_run(engine, None, "Hi", max_tokens=30) for _ in range(60)], return_exceptions=True)

    results = asyncio.run(flood())
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors and all(isinstance(e, ApiError) and e.status == 503 and e.retry_after for e in errors)
    assert asyncio.run(_run(engine, None, "Hi", max_tokens=3))[0]["completion_tokens"] == 3


def test_pickle_adapters_are_refused(tmp_path, adapters):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(adapters[0], bad)
    (bad / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ApiError, match="only safetensors"):
        inspect_adapter(bad)


def test_sampling_helpers():
    import torch

    logits = torch.tensor([0.0, 5.0, 1.0])
    assert Sampler(temperature=0.0).sample(logits) == 1
    assert {Sampler(temperature=1.0, top_p=0.01, seed=s).sample(logits) for s in range(10)} == {1}
    assert {Sampler(temperature=1.0, top_k=1, seed=s).sample(logits) for s in range(10)} == {1}
    assert {Sampler(temperature=2.0, top_k=2, seed=s).sample(logits) for s in range(40)} == {1, 2}  # never the 3rd
    assert Sampler(top_k=-2).problems() == ["top_k: -2 is not a whole number >= 1, or 0 / -1 (off)"]
    assert find_stop("abc\n\ndef", ["\n\n", "x"]) == 3
    assert safe_prefix_len("hello wor", ["world"]) == len("hello ")
    assert safe_prefix_len("ab\ufffd", []) == 2


def test_grouped_lora_matches_peft_mixed_batch_and_falls_back_for_dora(engine, adapters, tiny_llama, tmp_path):
    """The grouped forward (stacked A/B, bmm) gives PEFT's adapter_names logits; slots are reused
    after a detach; an adapter the grouped path does not implement (DoRA) switches it off."""
    import torch
    from peft import LoraConfig, get_peft_model

    from farm.modeling import load_base_model

    slots = [engine.attach(a).name for a in adapters]
    engine.detach(slots.pop(1))  # leaves a free slot index the next attach reuses
    slots.append(engine.attach(adapters[1]).name)
    names = slots + ["__base__", slots[0]]
    ids = torch.tensor([engine.tokenizer("The quick brown fox").input_ids] * len(names))
    with torch.inference_mode():
        want = engine.peft(input_ids=ids, adapter_names=names).logits
        assert engine.grouped.supports(names)
        with engine.grouped.batch(names):
            got = engine.base(input_ids=ids).logits
        uniform = [slots[2]] * 2
        with engine.grouped.batch(uniform):
            one = engine.base(input_ids=ids[:2]).logits
        assert torch.equal(one, engine.peft(input_ids=ids[:2], adapter_names=uniform).logits)
    assert (got - want).abs().max() < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    get_peft_model(load_base_model(str(tiny_llama), device="cpu"), cfg).save_pretrained(tmp_path / "dora")
    dora = engine.attach(tmp_path / "dora").name
    assert not engine.grouped.supports([slots[0]])
    engine.detach(dora)
    assert engine.grouped.supports([slots[0]])
    for s in slots:
        engine.detach(s)


def test_warm_up_leaves_the_base_bit_identical(tiny_llama):
    """The zero adapter of the warm-up changes no logit: on the same model before and after it, and
    between a replica started with warm-up and one without."""
    import torch

    from farm.serve.warmup import WARMUP, build_wrapper

    cold = Engine(str(tiny_llama), max_waiting=4, warm_up=False)
    batches = [torch.tensor([cold.tokenizer(p).input_ids] * 2) for p in PROMPTS]
    with torch.inference_mode():
        before = [cold._forward(["__base__"] * 2, input_ids=ids).logits for ids in batches]
        peft, grouped = build_wrapper(cold.base, cold._warmup_ids)
        cold._packed["causal_lm"].restore()
        assert list(peft.peft_config) == [] and WARMUP not in grouped.index
        after = [cold.base(input_ids=ids).logits for ids in batches]  # PEFT's own forward of the wrapped layer
        with grouped.batch(["__base__"] * 2):
            grouped_after = [cold.base(input_ids=ids).logits for ids in batches]
        warm = Engine(str(tiny_llama), max_waiting=4)
        assert warm.peft is not None and list(warm.peft.peft_config) == []
        other = [warm._forward(["__base__"] * 2, input_ids=ids).logits for ids in batches]
    for b, a, g, o in zip(before, after, grouped_after, other):
        assert torch.equal(b, a) and torch.equal(b, g) and torch.equal(b, o)


def test_first_attach_after_warm_up_equals_stock_peft(tiny_llama, adapters):
    """A warmed replica's first adapter goes through load_adapter into the prebuilt wrapper and
    answers as stock PEFT does, beside base rows in the same batch."""
    warm = Engine(str(tiny_llama), max_batch_size=8, max_wait_ms=20, max_waiting=8)
    slot = warm.attach(adapters[0]).name
    rows = [(s, p) for s in (slot, None) for p in PROMPTS]

    async def together():
        return await asyncio.gather(*[_run(warm, s, p) for s, p in rows])

    for (s, prompt), (done, _) in zip(rows, asyncio.run(together())):
        want = stock_greedy(tiny_llama, adapters[0] if s else None, warm.tokenizer(prompt).input_ids, 12)
        assert done["text"] == want, (s, prompt)
    assert list(warm.peft.peft_config) == [slot]


def test_logprobs_of_a_mixed_adapter_batch_equal_stock_peft_log_softmax(engine, adapters, tiny_llama):
    """Prompt (echo) and completion logprobs of a base row and an adapter row sharing one batch are
    stock transformers/PEFT's log-softmax at each position, within 1e-4 (float32 on the NF4 base)."""
    from tests.test_serve_support import check_entries, stock_logprobs

    slot = engine.attach(adapters[0])

    async def run(slot_name, prompt):
        job = GenJob(prompt_ids=engine.tokenizer(prompt).input_ids, max_tokens=6, sampler=Sampler(temperature=0.0),
                     slot=slot_name, logprobs=3, prompt_logprobs=3)
        async for event in engine.generate(job):
            if "done" in event:
                return job.prompt_ids, event["done"]

    async def both():
        return await asyncio.gather(run(None, PROMPTS[0]), run(slot.name, PROMPTS[1]))

    before = engine.stats["batches"]
    results = asyncio.run(both())
    assert engine.stats["batches"] - before == 1, "the base row and the adapter row should share one batch"
    for (prompt_ids, done), adapter_dir in zip(results, [None, adapters[0]]):
        ids, lp = stock_logprobs(tiny_llama, adapter_dir, prompt_ids, generate=6)
        assert [e[0] for e in done["prompt_logprobs"]] == prompt_ids
        assert done["prompt_logprobs"][0][1] is None
        check_entries(done["prompt_logprobs"][1:], lp, 1, 1e-4)
        assert [e[0] for e in done["logprobs"]] == ids[len(prompt_ids):]
        check_entries(done["logprobs"], lp, len(prompt_ids), 1e-4)
        assert all(len(alts) == 3 for _, _, alts in done["logprobs"])
    engine.detach(slot.name)


def test_stop_token_ids_end_a_row_and_tinker_keeps_the_token_that_ended_it(engine):
    """`stop_token_ids` end a row at that token: left out of the output (as EOS is) unless
    `keep_stop_token`, which keeps it with its logprob (the Tinker sampler's tokens, as vLLM's have it);
    `ignore_eos` lets a row run past EOS."""
    ids = engine.tokenizer("The quick brown fox jumps over").input_ids

    def run(**kw) -> dict:
        async def go():
            job = GenJob(prompt_ids=ids, max_tokens=10, sampler=Sampler(temperature=0.0), logprobs=0, **kw)
            async for event in engine.generate(job):
                if "done" in event:
                    return event["done"]
        return asyncio.run(go())

    free = run()
    tokens = [e[0] for e in free["logprobs"]]
    assert len(tokens) == 10 and free["finish_reason"] == "length"
    stop = tokens[3]
    upto = tokens.index(stop)
    kept = run(stop_token_ids=[stop], keep_stop_token=True)
    assert kept["finish_reason"] == "stop" and kept["logprobs"] == free["logprobs"][: upto + 1]
    dropped = run(stop_token_ids=[stop])
    assert dropped["finish_reason"] == "stop" and dropped["logprobs"] == free["logprobs"][:upto]
    # EOS: with the greedy 4th token made the EOS, the row stops there (kept), or runs on with ignore_eos
    saved = engine.eos_ids
    engine.eos_ids = {stop}
    try:
        assert [e[0] for e in run(keep_stop_token=True)["logprobs"]] == tokens[: upto + 1]
        assert run(ignore_eos=True)["logprobs"] == free["logprobs"]
    finally:
        engine.eos_ids = saved
