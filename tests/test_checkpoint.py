"""Checkpoint layout (farm.train.checkpoint) and the training step, on a tiny real PEFT model, no Ray."""

from __future__ import annotations

import pytest

from farm.errors import TrainingError
from farm.train import checkpoint as ckpt


def _setup(tiny_llama):
    import torch
    from peft import LoraConfig
    from transformers import get_scheduler

    from farm.train.modelops import build_model, make_optimizer

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    quant = {"mode": "none", "double_quant": False, "compute_dtype": "fp32"}
    model, _ = build_model({"source": str(tiny_llama), "task": "causal_lm", "quant": quant}, lora, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = make_optimizer("adamw", params, 1e-2, 0.0, "cpu")
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    return model, params, optimizer, scheduler


def _batch(vocab: int = 64):
    import torch

    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _adapter(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_a_resumed_run_gets_back_the_best_weights_and_its_identity(tiny_llama, tmp_path):
    """Early stopping after a restart must restore the best weights, so the checkpoint carries them."""
    import torch

    from farm.train.step import train_step

    model, params, optimizer, scheduler = _setup(tiny_llama)
    res = train_step(model, optimizer, params, [_batch(), _batch()], device="cpu", max_grad_norm=1.0,
                     scheduler=scheduler)
    assert res.tokens == 32 and res.loss > 0 and res.seconds > 0
    best = _adapter(model)  # the "best eval" weights
    train_step(model, optimizer, params, [_batch()], device="cpu", max_grad_norm=1.0, scheduler=scheduler)
    current = _adapter(model)
    assert any(not torch.equal(best[k], current[k]) for k in best)
    ident = {"job_id": "j1", "customer": "acme", "adapter": "a", "manifest_sha256": "abc"}
    state = {"step": 2, "best_eval": 1.5, "history": [{"step": 1, "loss": 2.0}], "identity": ident}
    ckpt.write(tmp_path, model, optimizer, scheduler, state, final=False, best_weights=best)

    fresh, _, opt2, sched2 = _setup(tiny_llama)
    restored, best_back = ckpt.restore(tmp_path, fresh, opt2, sched2, ident)
    assert restored["step"] == 2 and restored["best_eval"] == 1.5 and restored["final"] is False
    assert best_back is not None and set(best_back) == set(best)
    assert all(torch.equal(best_back[k], best[k]) for k in best), "the best weights, not the current ones"
    assert all(torch.equal(_adapter(fresh)[k], current[k]) for k in current), "training resumes from current"
    assert sched2.last_epoch == scheduler.last_epoch

    other = {**ident, "customer": "globex"}
    with pytest.raises(TrainingError, match="another job .*customer 'acme'.*pick a new one"):
        ckpt.restore(tmp_path, fresh, opt2, sched2, other)


def test_checkpoint_state_loads_weights_only(tmp_path):
    """Shared run storage: a state file that needs arbitrary unpickling is refused, never executed."""
    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": 1, "evil": Payload()}, tmp_path / ckpt.STATE_FILE)
    with pytest.raises(TrainingError, match="cannot read trainer_state.pt"):
        ckpt.read_state(tmp_path)
    torch.save({"step": 3, "history": [{"loss": 1.0, "device": "cpu"}], "rng": torch.get_rng_state()},
               tmp_path / ckpt.STATE_FILE)
    (tmp_path / ckpt.FINAL_MARKER).touch()
    state = ckpt.read_state(tmp_path)
    assert state["step"] == 3 and state["final"] is True and state["history"][0]["device"] == "cpu"
