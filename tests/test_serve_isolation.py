"""No tenant can change another tenant's answers (the engine without Ray; the HTTP side is in
test_serve_api.py): whole-module copies apply to their own rows only, whatever is attached or
evicted; adapters that would write the shared base are refused; a failing row fails alone."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time

import pytest

from farm.catalog.adapter_rules import check_adapter
from farm.serve.engine import Engine
from farm.serve.engines.base import GenJob
from farm.serve.limits import ApiError
from farm.serve.sampling import Sampler
from tests.serve_helpers import peft_initializers, with_config
from tests.test_serve_support import make_adapter, stock_greedy

PROMPTS = ["Hello there", "The quick brown fox jumps over"]
N = 8  # tokens per answer


@pytest.fixture(scope="module")
def folders(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("iso")
    return {
        "p1": make_adapter(tiny_llama, root / "p1", seed=1),
        "p2": make_adapter(tiny_llama, root / "p2", seed=2),
        "p3": make_adapter(tiny_llama, root / "p3", seed=3),
        "head": make_adapter(tiny_llama, root / "head", seed=4, modules_to_save=["lm_head"]),
        "head2": make_adapter(tiny_llama, root / "head2", seed=5, modules_to_save=["lm_head"]),
    }


@pytest.fixture(scope="module")
def want(folders, tiny_llama):
    """Stock PEFT's solo greedy answer for every (adapter or base, prompt)."""
    from farm.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    out = {}
    for name in [None, *folders]:
        for p in PROMPTS:
            out[name, p] = stock_greedy(tiny_llama, folders[name] if name else None, tok(p).input_ids, N)
    return out


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(str(tiny_llama), max_batch_size=16, max_wait_ms=20, max_waiting=32)


async def _run(engine, slot, prompt, sampler=None, max_tokens=N):
    job = GenJob(prompt_ids=engine.tokenizer(prompt).input_ids, max_tokens=max_tokens,
                 sampler=sampler or Sampler(temperature=0.0), slot=slot)
    async for event in engine.generate(job):
        if "error" in event:
            raise event["error"]
        if "done" in event:
            return event["done"]["text"]


def _answers(engine, rows):
    """rows: [(slot or None, prompt)] all submitted at once (so they share batches)."""
    async def go():
        return await asyncio.gather(*[_run(engine, s, p) for s, p in rows])
    return asyncio.run(go())


def test_module_copies_apply_to_their_own_rows_only(engine, folders, want):
    assert want["head", PROMPTS[0]] != want[None, PROMPTS[0]]  # the lm_head copy really matters
    slots = {n: engine.attach(folders[n]).name for n in ("p1", "head", "p2")}
    rows = [(n, p) for n in (None, "p1", "head", "p2") for p in PROMPTS]
    got = _answers(engine, [(slots.get(n), p) for n, p in rows])
    assert got == [want[n, p] for n, p in rows]
    # detach the adapter PEFT holds active for lm_head and attach another copy: nobody's answer moves
    engine.detach(slots.pop("head"))
    slots["head2"] = engine.attach(folders["head2"]).name
    rows = [(n, p) for n in (None, "p1", "head2", "p2") for p in PROMPTS]
    assert _answers(engine, [(slots.get(n), p) for n, p in rows]) == [want[n, p] for n, p in rows]
    for s in slots.values():
        engine.detach(s)
    assert set(engine.slots) <= engine._doomed  # PEFT keeps one adapter until the next attach


def test_detaching_module_copy_adapters_in_any_order_leaves_the_engine_whole(tiny_llama, folders, want):
    """PEFT 0.21 empties a module copy's active list when an adapter without that copy becomes active;
    deleting another copy-holding adapter then raised IndexError mid-delete and broke every later
    attach (seen under `make test` load, where detaches happen in this order)."""
    eng = Engine(str(tiny_llama), max_batch_size=4, max_wait_ms=5, max_waiting=8)
    s0, s1 = eng.attach(folders["head"]).name, eng.attach(folders["p1"]).name
    s2, s3 = eng.attach(folders["head2"]).name, eng.attach(folders["head"]).name
    for name in (s0, s1, s3):  # s0 (active) goes, p1 becomes active; p1 goes, head2 does; then a head copy
        eng.detach(name)
    assert set(eng.slots) == {s2}
    s4 = eng.attach(folders["p2"]).name  # the engine still attaches and answers
    prompt = PROMPTS[0]
    assert _answers(eng, [(s2, prompt), (s4, prompt)]) == [want["head2", prompt], want["p2", prompt]]


def test_tenant_bleed_over_random_interleavings(engine, folders, want):
    """Seeded random attach/evict churn with K=2 resident adapters (< the 5 in use), mixed with
    bare-base rows, concurrent batches; every greedy answer must be stock PEFT's solo answer."""
    rng = random.Random(1234)
    names = list(folders)
    resident: dict[str, str] = {}  # adapter -> slot, LRU order
    rounds, deadline = 0, time.monotonic() + 40  # bounded in count and (on a crowded machine) in time
    while rounds < 25 and time.monotonic() < deadline:
        rounds += 1
        wanted = rng.sample(names, 2)
        for n in wanted:
            if n not in resident:
                if len(resident) >= 2:
                    victim = next(iter(resident))
                    engine.detach(resident.pop(victim))
                resident[n] = engine.attach(folders[n]).name
            else:
                resident[n] = resident.pop(n)  # most recently used
        rows = [(rng.choice(wanted + [None]), rng.choice(PROMPTS)) for _ in range(rng.randint(2, 6))]
        got = _answers(engine, [(resident.get(n), p) for n, p in rows])
        assert got == [want[n, p] for n, p in rows], (rounds, rows)
    assert rounds >= 3
    for s in resident.values():
        engine.detach(s)


def _poison(src, dest, *, key=None, config=None):
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    if key:
        tensors = load_file(dest / "adapter_model.safetensors")
        tensors[key] = torch.zeros(128, 352)
        save_file(tensors, dest / "adapter_model.safetensors")
    if config:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return dest


POISON = [
    ({"key": "base_model.model.model.layers.0.mlp.down_proj.weight"}, "model.layers.0.mlp.down_proj.weight"),
    ({"config": {"bias": "all"}}, "bias 'all'"),
    ({"config": {"bias": "lora_only"}}, "bias 'lora_only'"),
    ({"config": {"layer_replication": [[0, 2], [1, 2]]}}, "layer_replication"),
    ({"config": {"peft_type": "IA3"}}, "peft_type is 'IA3'"),
]


@pytest.mark.parametrize("poison,named", POISON)
def test_poisoned_adapters_are_refused_at_import_and_attach(engine, folders, tmp_path, poison, named):
    import torch

    from farm.catalog import Catalog
    from farm.errors import CatalogError

    bad = _poison(folders["p1"], tmp_path / "bad", **poison)
    cat = Catalog((tmp_path / "catalog").as_uri())
    with pytest.raises(CatalogError, match="refused") as refused:
        cat.import_adapter(bad, "acme/bad")
    assert named in str(refused.value) and cat.list() == []
    ids = torch.tensor([engine.tokenizer(PROMPTS[1]).input_ids])
    with torch.inference_mode():
        before = engine._forward(["__base__"], input_ids=ids).logits.clone()
    with pytest.raises(ApiError) as exc:
        engine.attach(bad)
    assert exc.value.status == 422 and named in exc.value.message
    with torch.inference_mode():
        assert torch.equal(engine._forward(["__base__"], input_ids=ids).logits, before)


def _base_logits(engine):
    import torch

    ids = torch.tensor([engine.tokenizer(PROMPTS[1]).input_ids])
    with torch.inference_mode():
        return engine._forward(["__base__"], input_ids=ids).logits.clone()


@pytest.fixture(scope="module")
def plain_engine(tiny_llama):
    """An unquantized base: PiSSA/CorDA refuse to initialize on NF4, but rewrite an fp32 base."""
    return Engine(str(tiny_llama), quantization="none", max_batch_size=4)


@pytest.mark.parametrize("override", peft_initializers(), ids=lambda o: json.dumps(o))
def test_initializers_are_refused_and_never_run_even_past_the_allow_list(engine, plain_engine, folders, want,
                                                                         tmp_path, monkeypatch, override):
    import torch

    import farm.catalog.adapter_rules as rules

    bad = with_config(folders["p1"], tmp_path / "bad", **override)
    for e in (engine, plain_engine):
        before = _base_logits(e)
        with pytest.raises(ApiError) as exc:
            e.attach(bad)
        assert exc.value.status == 422 and "shared base weights" in exc.value.message
        assert torch.equal(_base_logits(e), before)
    # an option the allow-list missed: PEFT still builds the layers with every initializer off
    monkeypatch.setattr(rules, "check_config", lambda cfg: [])
    for e in (engine, plain_engine):
        before = _base_logits(e)
        slot = e.attach(bad).name
        assert torch.equal(_base_logits(e), before)
        if e is engine:  # the adapter itself answers as its weights say (stock PEFT, default init)
            assert _answers(e, [(slot, PROMPTS[0]), (None, PROMPTS[0])]) == [want["p1", PROMPTS[0]], want[None, PROMPTS[0]]]
        e.detach(slot)


def test_allow_list_shapes_need_the_served_base(engine, folders):
    from farm.catalog.peft_folder import safetensors_shapes

    cfg = json.loads((folders["head"] / "adapter_config.json").read_text())
    shapes = safetensors_shapes(folders["head"] / "adapter_model.safetensors")
    assert check_adapter(cfg, shapes, engine.base_modules) == []
    wide = {k: ([v[0], v[1] * 2] if k.endswith("lora_A.weight") else v) for k, v in shapes.items()}
    assert any("does not fit" in p for p in check_adapter(cfg, wide, engine.base_modules))
    assert check_adapter(cfg, wide) == []  # structure alone (the catalog) cannot see shapes
    ghost = {"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": [4, 128]}
    assert "no linear or embedding module" in check_adapter(cfg, ghost, engine.base_modules)[0]


class _Broken(Sampler):
    def sample(self, logits) -> int:
        raise RuntimeError("this row's sampler broke")


def test_a_failing_row_fails_alone(engine, folders, want):
    slot = engine.attach(folders["p1"]).name

    async def batch():
        return await asyncio.gather(
            _run(engine, slot, PROMPTS[0]), _run(engine, None, PROMPTS[1], sampler=_Broken(temperature=0.0)),
            _run(engine, None, PROMPTS[0]), return_exceptions=True)

    before = engine.stats["batches"]
    ok1, failed, ok2 = asyncio.run(batch())
    assert engine.stats["batches"] - before == 1  # really one shared decode step
    assert isinstance(failed, ApiError) and failed.status == 500 and "sampler broke" in failed.message
    assert (ok1, ok2) == (want["p1", PROMPTS[0]], want[None, PROMPTS[0]])
    for bad in (Sampler(temperature=1e-45), Sampler(temperature=1.0, seed=2**70), Sampler(temperature=1.0, top_p=0)):
        with pytest.raises(ApiError) as exc:
            asyncio.run(_run(engine, None, PROMPTS[0], sampler=bad))
        assert exc.value.status == 400
    engine.detach(slot)


def test_classification_heads_stay_with_their_adapters(engine, tiny_llama, tmp_path):
    """Each seq_cls adapter's own `score` copy, whatever PEFT holds active after attach/detach."""
    import torch
    from peft import PeftModel

    from farm.modeling import load_base_model

    dirs = [make_adapter(tiny_llama, tmp_path / f"cls{i}", seed=10 + i, task="seq_cls") for i in range(3)]
    ids = engine.tokenizer("great service").input_ids

    def stock(d):
        base = load_base_model(str(tiny_llama), task="seq_cls", num_labels=3, device="cpu")
        with torch.inference_mode():
            logits = PeftModel.from_pretrained(base, str(d)).eval()(input_ids=torch.tensor([ids])).logits[0]
        return torch.softmax(logits.float(), -1).tolist()

    want = [stock(d) for d in dirs]
    assert want[0] != pytest.approx(want[1], abs=1e-3)
    a, b = engine.attach(dirs[0]).name, engine.attach(dirs[1]).name
    for slot, w in ((a, want[0]), (b, want[1]), (a, want[0])):
        assert list(engine.classify(slot, ids)["probabilities"].values()) == pytest.approx(w, abs=1e-4)
    engine.detach(a)  # PEFT moves its active adapter; b and the newcomer keep their own heads
    c = engine.attach(dirs[2]).name
    for slot, w in ((b, want[1]), (c, want[2])):
        assert list(engine.classify(slot, ids)["probabilities"].values()) == pytest.approx(w, abs=1e-4)
    engine.detach(b)
    engine.detach(c)
