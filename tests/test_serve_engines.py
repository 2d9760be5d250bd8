"""The engine interface without a model: the LoRA admission gate, what vLLM cannot serve, and the
engine choice. Fast (no torch, no Ray, no vLLM)."""

from __future__ import annotations

import asyncio
import inspect
import json
import random

import pytest

from farm.errors import FarmError
from farm.serve.engines import base
from farm.serve.engines.gate import AdapterGate, GateFull
from farm.serve.engines.vllm_support import unsupported, vllm_rank


def test_gate_never_lets_more_adapters_in_flight_than_slots_and_serves_everyone():
    async def run():
        gate = AdapterGate(slots=2, max_held=1000)
        seen_max = 0
        done = []

        async def request(key, i):
            nonlocal seen_max
            async with gate.hold(key):
                seen_max = max(seen_max, len(gate.active))
                await asyncio.sleep(random.random() / 200)
            done.append(i)

        keys = [None, "a", "b", "c", "d", None, "a", "e"] * 25
        await asyncio.gather(*[request(k, i) for i, k in enumerate(keys)])
        return gate, seen_max, done, len(keys)

    random.seed(0)
    gate, seen_max, done, n = asyncio.run(run())
    assert seen_max == 2 and gate.peak_adapters == 2
    assert sorted(done) == list(range(n))  # nobody starves
    assert gate.waited > 0 and gate.held == 0 and not gate.active


def test_gate_is_first_come_first_served_and_survives_cancellation():
    async def run():
        gate = AdapterGate(slots=1, max_held=3)
        order = []
        release = asyncio.Event()

        async def hold(key, tag):
            async with gate.hold(key):
                order.append(tag)
                await release.wait()

        first = asyncio.create_task(hold("a", "a1"))
        await asyncio.sleep(0)
        waiting_b = asyncio.create_task(hold("b", "b1"))
        await asyncio.sleep(0)
        late_a = asyncio.create_task(hold("a", "a2"))  # "a" is in flight, but b waited first
        await asyncio.sleep(0)
        with pytest.raises(GateFull):
            async with gate.hold("a"):
                pass
        assert order == ["a1"]
        waiting_b.cancel()  # a waiter that goes away frees its place in line
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, late_a, return_exceptions=True)
        return order, gate

    order, gate = asyncio.run(run())
    assert order == ["a1", "a2"] and gate.held == 0


def _adapter(tmp_path, **cfg):
    d = tmp_path / "a"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **cfg}))
    return d


def test_vllm_support_names_every_reason(tmp_path):
    assert unsupported(_adapter(tmp_path), 16) == []
    assert unsupported(_adapter(tmp_path, modules_to_save=["score"]), 16) == []
    why = unsupported(_adapter(tmp_path, modules_to_save=["lm_head"], use_dora=True, r=32), 16)
    assert any("modules_to_save ['lm_head']" in w for w in why)
    assert "DoRA (use_dora)" in why
    assert any("rank 32 is above this replica's max_lora_rank 16" in w for w in why)
    assert unsupported(_adapter(tmp_path, rank_pattern={"q_proj": 64}), 32)[0].startswith("rank 64")
    assert (vllm_rank(4), vllm_rank(8), vllm_rank(9), vllm_rank(300)) == (8, 8, 16, 320)


def test_engine_choice(monkeypatch):
    monkeypatch.setattr(base, "vllm_python", lambda: None)
    assert base.choose("auto", 1, "nf4") == "farm" and base.choose("auto", 0, "nf4") == "farm"
    with pytest.raises(FarmError, match="make vllm-env"):
        base.choose("vllm", 0, "none")
    monkeypatch.setattr(base, "vllm_python", lambda: "/x/python")
    assert base.choose("auto", 1, "nf4") == "vllm" and base.choose("auto", 0, "nf4") == "farm"
    with pytest.raises(FarmError, match="CUDA-only"):
        base.choose("vllm", 0, "nf4")
    with pytest.raises(FarmError, match="nf4 or none"):
        base.choose("vllm", 1, "int8")
    with pytest.raises(FarmError, match="engine must be one of"):
        base.choose("tgi", 1, "nf4")


def test_both_engines_have_the_interface():
    from farm.serve.engines.farm import FarmEngine
    from farm.serve.engines.vllm import VllmEngine, parse_metrics

    for cls in (FarmEngine, VllmEngine):
        for name in ("attach", "detach", "generate", "classify"):
            assert callable(getattr(cls, name)), (cls, name)
        assert inspect.isasyncgenfunction(cls.generate), cls
    text = 'vllm:num_requests_running{engine="0"} 2.0\nvllm:num_requests_running{engine="1"} 1.0\n# HELP x\n' \
           'vllm:ttft_seconds_bucket{le="1"} 3\nvllm:ttft_seconds_sum 1.5\nother 1\n'
    assert parse_metrics(text) == {"num_requests_running": 3.0, "ttft_seconds_sum": 1.5}
