"""Checkpoint layout (farm.train.checkpoint), written and read back by the training engine, no Ray."""

from __future__ import annotations

import pytest

from farm.errors import TrainingError
from farm.train import checkpoint as ckpt


def _engine_and_spec(tiny_llama, identity: dict):
    import torch
    from peft import LoraConfig

    from farm.train.engine import Engine
    from farm.train.modelops import build_base
    from farm.train.spec import MemberSpec, OptimSpec

    quant = {"mode": "none", "double_quant": False, "compute_dtype": "fp32"}
    model, _ = build_base({"source": str(tiny_llama), "task": "causal_lm", "quant": quant}, "cpu")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    optim = OptimSpec(optimizer="adamw", learning_rate=1e-2, weight_decay=0.0, max_grad_norm=1.0,
                      lr_scheduler="linear", warmup_ratio=0.0, batch_size=2, grad_accum=1, seed=0, total_steps=10,
                      eval_every=2, early_stopping_patience=3)
    return Engine(model, torch.device("cpu")), MemberSpec("j1", lora, optim, pad_token_id=0, identity=identity)


def _rows(n: int) -> dict:
    import torch

    ids = torch.randint(5, 600, (n, 8), generator=torch.Generator().manual_seed(1)).tolist()
    return {"input_ids": ids, "attention_mask": [[1] * 8 for _ in ids], "labels": ids}


def test_a_resumed_run_gets_back_the_best_weights_and_its_identity(tiny_llama, tmp_path):
    """Early stopping after a restart must restore the best weights, so the checkpoint carries them."""
    import torch

    ident = {"job_id": "j1", "customer": "acme", "adapter": "a", "manifest_sha256": "abc"}
    engine, spec = _engine_and_spec(tiny_llama, ident)
    m = engine.admit(spec, _rows(6), _rows(2))
    for _ in range(3):  # eval at step 2 keeps the best weights; step 3 moves on from them
        engine.step()
    best, current = m.best_weights, engine.pack.state_dict("j1")
    assert m.state["best_step"] == 2 and any(not torch.equal(best[k], current[k]) for k in best)
    engine.write_checkpoint(m, tmp_path, final=False)

    fresh, _ = _engine_and_spec(tiny_llama, ident)
    back = fresh.admit(spec, _rows(6), _rows(2), resume=tmp_path)
    assert back.resumed_from == 3 and back.state["best_eval"] == m.state["best_eval"] and not back.finished
    assert back.best_weights is not None and set(back.best_weights) == set(best)
    assert all(torch.equal(back.best_weights[k], best[k]) for k in best), "the best weights, not the current ones"
    assert all(torch.equal(fresh.pack.state_dict("j1")[k], current[k]) for k in current), "training resumes from current"
    assert back.trainer.scheduler.last_epoch == m.trainer.scheduler.last_epoch

    from dataclasses import replace

    other, _ = _engine_and_spec(tiny_llama, ident)
    with pytest.raises(TrainingError, match="another job .*customer 'acme'.*pick a new one"):
        other.admit(replace(spec, identity={**ident, "customer": "globex"}), _rows(6), _rows(2), resume=tmp_path)


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
