"""The Tinker step executor on the tiny Llama (NF4, in process, no Ray): logprobs equal stock
transformers / PEFT on the same weights, two models' grouped steps equal their solo runs, gradients
accumulate until optim_step, and a bad request fails alone."""

from __future__ import annotations

import numpy as np
import pytest

from farm.tinker.types import AdamParams
from farm.tinker.wire import Datum, ForwardBackward

A_TOKENS = [5, 17, 33, 40, 12, 9, 60, 3, 21, 8]
B_TOKENS = [7, 7, 19, 2, 44, 31]


def _request(model_id: str, seq: int, *rows: list[int], forward_only: bool = False) -> ForwardBackward:
    data = []
    for toks in rows:
        t = np.array(toks, np.int64)
        w = np.linspace(0.5, 1.5, len(t) - 1).astype(np.float32)  # weights matter: not all ones
        data.append(Datum(t[:-1], {"target_tokens": t[1:], "weights": w}))
    return ForwardBackward(model_id, seq, "cross_entropy", forward_only, data)


@pytest.fixture(scope="module")
def executor(tiny_llama):
    from farm.tinker.executor import Executor

    return Executor.load(str(tiny_llama), quantization="nf4", device="cpu")


def _stock_logprobs(model, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def test_logprobs_and_loss_equal_stock_transformers_and_peft_on_the_same_weights(executor, tiny_llama, tmp_path):
    from peft import PeftModel

    from farm.modeling import disable_cpu_repack, load_base_model

    executor.create("parity", "acme", rank=4, seed=11)
    first = executor.forward_backward([_request("parity", 1, A_TOKENS)])[0]
    stock = load_base_model(str(tiny_llama), device="cpu").eval()
    disable_cpu_repack(stock)  # the same bitsandbytes CPU kernel as the executor's (test_pack_lora does so too)
    # B starts at zero: a fresh model is the base
    np.testing.assert_allclose(first["logprobs"][0], _stock_logprobs(stock, A_TOKENS), atol=1e-5)
    w = np.linspace(0.5, 1.5, len(A_TOKENS) - 1)
    assert first["metrics"]["loss:sum"] == pytest.approx(-(first["logprobs"][0] * w).sum(), rel=1e-5)
    executor.optim_step("parity", AdamParams(learning_rate=5e-3))
    for seq in (2, 4):
        executor.forward_backward([_request("parity", seq, A_TOKENS)])
        executor.optim_step("parity", AdamParams(learning_rate=5e-3))
    after = executor.forward_backward([_request("parity", 6, A_TOKENS, forward_only=True)])[0]
    assert after["metrics"]["loss:sum"] < first["metrics"]["loss:sum"]
    # the trained LoRA as a stock PEFT folder on a freshly loaded base scores the same
    folder = executor.pack.export_adapter("parity", tmp_path / "parity")
    peft = PeftModel.from_pretrained(stock, str(folder)).eval()
    np.testing.assert_allclose(after["logprobs"][0], _stock_logprobs(peft, A_TOKENS), atol=1e-4)
    assert executor.models["parity"].pending == 0  # a forward() takes no gradient


def _weights(executor, model_id: str) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().copy() for p in executor.models[model_id].params]


def test_two_models_grouped_steps_equal_their_solo_runs(executor):
    # eps 1e-6, not Tinker's 1e-12: with 1e-12 Adam turns a gradient component at float-noise level (the
    # grouped batch is wider, so the base's matmuls round differently) into a full learning-rate step
    adam = AdamParams(learning_rate=1e-2, eps=1e-6, weight_decay=0.01, grad_clip_norm=1.0)
    # different ranks and targets: a LoRA on attention only, b everywhere
    for suffix in ("solo", "grouped"):
        executor.create(f"a-{suffix}", "acme", rank=4, seed=1, train_mlp=False, train_unembed=False)
        executor.create(f"b-{suffix}", "globex", rank=8, seed=2)
    solo: dict[str, list] = {"a": [], "b": []}
    for step in range(3):
        for m, rows in (("a", [A_TOKENS, B_TOKENS]), ("b", [B_TOKENS])):
            solo[m].append(executor.forward_backward([_request(f"{m}-solo", 2 * step + 1, *rows)])[0])
            executor.optim_step(f"{m}-solo", adam)
    for step in range(3):
        both = executor.forward_backward([_request("a-grouped", 2 * step + 1, A_TOKENS, B_TOKENS),
                                          _request("b-grouped", 2 * step + 1, B_TOKENS)])
        for m, res in zip("ab", both):
            s = solo[m][step]
            assert res["metrics"]["loss:sum"] == pytest.approx(s["metrics"]["loss:sum"], rel=1e-5, abs=1e-5)
            for got, want in zip(res["logprobs"], s["logprobs"]):
                np.testing.assert_allclose(got, want, atol=1e-5)
            executor.optim_step(f"{m}-grouped", adam)
    # Adam divides by the gradient's own scale, so where a gradient is tiny (A's, while B is still small) the
    # base's reassociated float noise (~1e-7 in a wider batch) moves a weight by up to ~1e-4 of the 3e-2
    # the steps move it; the scores above, every step, agree to 1e-5
    for m in "ab":
        for got, want in zip(_weights(executor, f"{m}-grouped"), _weights(executor, f"{m}-solo")):
            np.testing.assert_allclose(got, want, atol=1e-4)
    assert len(executor.models["a-solo"].targets) < len(executor.models["b-solo"].targets)
    # the same flags give the same layers, whoever came first (the LM head is wrapped once b-solo has it)
    assert executor.models["b-grouped"].targets == executor.models["b-solo"].targets
    assert executor.models["b-grouped"].targets[-1] == "lm_head"
    assert len(executor.models["b-grouped"].params) == 2 * len(executor.models["b-solo"].targets)


def test_gradients_accumulate_over_forward_backward_calls_until_optim_step(executor):
    adam = AdamParams(learning_rate=1e-2)
    executor.create("split", "acme", rank=4, seed=5)
    executor.create("whole", "acme", rank=4, seed=5)
    executor.forward_backward([_request("split", 1, A_TOKENS)])
    executor.forward_backward([_request("split", 2, B_TOKENS)])
    assert executor.models["split"].pending == 2
    executor.optim_step("split", adam)
    executor.forward_backward([_request("whole", 1, A_TOKENS, B_TOKENS)])
    executor.optim_step("whole", adam)
    for got, want in zip(_weights(executor, "split"), _weights(executor, "whole")):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_bad_request_fails_alone_and_the_others_of_its_group_run(executor):
    executor.create("good", "acme", rank=2, seed=3)
    out = executor.forward_backward([_request("good", 1, A_TOKENS), _request("good-missing", 1, A_TOKENS),
                                     _request("good", 2, [1, 2, executor.vocab_size + 5])])
    assert "logprobs" in out[0]
    assert out[1] == {"error": "model 'good-missing' not found", "status": 404}
    # two requests of one model never share a group (the worker sends one per model a cycle); here the
    # second is refused for its token, naming the field, before that matters
    assert out[2]["status"] == 400
    assert out[2]["error"].startswith("data[0].loss_fn_inputs.target_tokens: token id")


def test_save_then_load_state_resumes_with_the_same_next_losses(executor, tmp_path):
    adam = AdamParams(learning_rate=5e-3)
    executor.create("first", "acme", rank=4, seed=9, train_unembed=False)
    for seq in (1, 3):
        executor.forward_backward([_request("first", seq, A_TOKENS)])
        executor.optim_step("first", adam)
    folder = executor.save_state("first", tmp_path / "ckpt")
    state = executor.read_state(folder)
    assert (state["rank"], state["steps"], state["flags"]["train_unembed"]) == (4, 2, False)
    executor.create("resumed", "acme", rank=4, seed=123, train_unembed=False)  # another init: the load replaces it
    executor.load_state("resumed", folder, optimizer=True)
    for seq in (5, 7):
        a = executor.forward_backward([_request("first", seq, B_TOKENS)])[0]
        b = executor.forward_backward([_request("resumed", seq, B_TOKENS)])[0]
        assert a["metrics"]["loss:sum"] == pytest.approx(b["metrics"]["loss:sum"], rel=1e-6)
        executor.optim_step("first", adam)
        executor.optim_step("resumed", adam)
    for got, want in zip(_weights(executor, "resumed"), _weights(executor, "first")):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # a checkpoint of another LoRA shape is refused naming the path, the model untouched
    executor.create("other", "acme", rank=2, seed=1)
    with pytest.raises(Exception) as err:
        executor.load_state("other", folder, optimizer=False)
    assert getattr(err.value, "status", None) == 400 and "rank 4" in err.value.message


def _rl_request(model_id: str, seq: int, loss: str, sampling: np.ndarray, advantages: np.ndarray,
                config: dict | None = None) -> ForwardBackward:
    t = np.array(A_TOKENS, np.int64)
    inputs = {"target_tokens": t[1:], "logprobs": sampling.astype(np.float32), "advantages": advantages.astype(np.float32)}
    return ForwardBackward(model_id, seq, loss, False, [Datum(t[:-1], inputs)], config or {})


def test_importance_sampling_and_ppo_follow_tinkers_definitions(executor):
    adam = AdamParams(learning_rate=5e-3)
    for name in ("is", "ce", "ppo"):
        executor.create(name, "acme", rank=4, seed=21)
    current = executor.forward_backward([_request("is", 1, A_TOKENS, forward_only=True)])[0]["logprobs"][0]
    adv = np.linspace(-1.0, 2.0, len(current))
    # on-policy (sampling logprobs = the model's), the importance-sampling gradient is cross_entropy's with
    # the advantages as weights: the same optimizer step
    res = executor.forward_backward([_rl_request("is", 2, "importance_sampling", current, adv)])[0]
    assert res["metrics"]["loss:sum"] == pytest.approx(-adv.sum(), rel=1e-5)
    t = np.array(A_TOKENS, np.int64)
    executor.forward_backward([ForwardBackward("ce", 1, "cross_entropy", False,
                                               [Datum(t[:-1], {"target_tokens": t[1:], "weights": adv.astype(np.float32)})])])
    executor.optim_step("is", adam)
    executor.optim_step("ce", adam)
    for got, want in zip(_weights(executor, "is"), _weights(executor, "ce")):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # off-policy ratios on both sides of the clip range: -sum(min(r * A, clip(r, 0.8, 1.2) * A))
    sampling = current + np.linspace(-0.6, 0.6, len(current))
    res = executor.forward_backward([_rl_request("ppo", 1, "ppo", sampling, adv,
                                                 {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})])[0]
    ratio = np.exp(res["logprobs"][0] - sampling)
    want = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv).sum()
    assert res["metrics"]["loss:sum"] == pytest.approx(want, rel=1e-5)
    assert np.any(ratio < 0.8) and np.any(ratio > 1.2)  # the clip mattered
