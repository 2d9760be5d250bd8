"""Whole trained modules on the training engine (farm.train.engine), in-process, no Ray: a seq_cls job's
classification head and `lora.modules_to_save` (what farm.train.loop once ran on a whole PEFT model).

The reference is stock PEFT trained exactly as that loop did: the same prepared base
(farm.train.modelops.build_base), get_peft_model after torch.manual_seed(seed), the same rows in the
same order (farm.train.schedule), farm.train.step.train_step (accumulate, clip, AdamW, LR schedule).
A pack of one runs the same arithmetic, so losses must agree to 1e-5 and weights to 5e-5 (the
tolerances of tests/test_pack_lora.py; here they agree to ~1e-7). LoRA dropout is 0 in the parity
runs (the engine draws its masks from counters, PEFT from the global RNG); GPT-2's own dropout layers
draw from the global RNG in both, so each run seeds it the same way first, as the worker does.

The engine's export must be what PEFT writes: the same tensor names and shapes
(`base_model.model.score.weight` beside the LoRA keys) and the same adapter_config fields that
serving and the catalog's allow-list read (task_type, modules_to_save, target_modules, fan_in_fan_out).
"""

from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict  # noqa: E402

from farm.errors import TrainingError  # noqa: E402
from farm.modeling import disable_cpu_repack  # noqa: E402
from farm.train.data import Collator  # noqa: E402
from farm.train.engine import Engine  # noqa: E402
from farm.train.modelops import build_base, evaluate, make_optimizer  # noqa: E402
from farm.train.schedule import batches_for_epoch, new_state, next_batch  # noqa: E402
from farm.train.spec import MemberSpec, OptimSpec  # noqa: E402
from farm.train.step import train_step  # noqa: E402

PAD, VOCAB, LABELS = 0, 600, ["negative", "neutral", "positive"]
LOSS_TOL, W_TOL = 1e-5, 5e-5


def _rows(seed: int, n: int, task: str) -> dict:
    """n tokenized rows (column -> list): a class id per row (seq_cls) or loss on each row's second half."""
    g = torch.Generator().manual_seed(seed)
    cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(torch.randint(6, 15, (1,), generator=g))
        ids = torch.randint(5, VOCAB, (length,), generator=g).tolist()
        cols["input_ids"].append(ids)
        cols["attention_mask"].append([1] * length)
        if task == "seq_cls":
            cols["labels"].append(int(torch.randint(0, len(LABELS), (1,), generator=g)))
        else:
            cols["labels"].append([-100] * (length // 2) + ids[length // 2:])
    return cols


def _model_cfg(path, task: str, quant: str = "nf4") -> dict:
    return {"source": str(path), "revision": None, "task": task,
            "num_labels": len(LABELS) if task == "seq_cls" else None,
            "id2label": dict(enumerate(LABELS)) if task == "seq_cls" else None,
            "quant": {"mode": quant, "double_quant": True, "compute_dtype": "auto"}}


def _base(path, task: str, quant: str = "nf4"):
    torch.manual_seed(0)  # a seq_cls head is new (drawn at load): the worker seeds before loading too
    return build_base(_model_cfg(path, task, quant), "cpu")


def _spec(job_id: str, lora: LoraConfig, *, task: str, seed: int = 3, steps: int = 4, accum: int = 2,
          eval_every: int | None = None, patience: int | None = None, lr: float = 5e-3,
          checkpoint_every: int | None = None) -> MemberSpec:
    optim = OptimSpec(optimizer="adamw", learning_rate=lr, weight_decay=0.01, max_grad_norm=1.0,
                      lr_scheduler="linear", warmup_ratio=0.1, batch_size=3, grad_accum=accum, seed=seed,
                      total_steps=steps, eval_every=eval_every, checkpoint_every=checkpoint_every,
                      early_stopping_patience=patience)
    return MemberSpec(job_id=job_id, lora=lora, optim=optim, pad_token_id=PAD, task=task)


def _seq_cls_lora(targets=("c_attn", "c_proj", "c_fc")) -> LoraConfig:  # jobs/customer_y.yaml's adapter
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets), task_type=TaskType.SEQ_CLS)


def _mts_lora() -> LoraConfig:  # tests/test_train.py's causal job: all-linear and a trained lm_head
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", modules_to_save=["lm_head"],
                      task_type=TaskType.CAUSAL_LM)


def _train_engine(path, spec: MemberSpec, train: dict, evals: dict, quant: str = "nf4"):
    """The member alone on the engine: (engine, member, per-step losses, final metrics)."""
    model, footprint = _base(path, spec.task, quant)
    engine = Engine(model, torch.device("cpu"), footprint=footprint, base_source=str(path))
    m = engine.admit(spec, train, evals)
    torch.manual_seed(spec.optim.seed)  # as the worker's seeding leaves the global RNG (GPT-2's dropout)
    losses, final = [], None
    while not m.finished:
        for up in engine.step():
            assert up.failed is None, up.failed
            losses.append(up.metrics["loss"])
            if up.done:
                final = engine.finish(m)
    return engine, m, losses, final


def _train_peft(path, spec: MemberSpec, train: dict, evals: dict, quant: str = "nf4"):
    """The same job on a whole PEFT model, as farm.train.loop trained it: (model, losses, final eval)."""
    from transformers import get_scheduler

    base, _ = _base(path, spec.task, quant)
    opt = spec.optim
    torch.manual_seed(opt.seed)
    model = get_peft_model(base, copy.deepcopy(spec.lora))
    disable_cpu_repack(model)  # as farm.train.modelops.peft_model does on CPU
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = make_optimizer(opt.optimizer, params, opt.learning_rate, opt.weight_decay, "cpu")
    sched = get_scheduler(opt.lr_scheduler, optimizer, num_warmup_steps=1, num_training_steps=opt.total_steps)
    collate, n = Collator(PAD), len(train["input_ids"])
    state, batches = new_state(), batches_for_epoch(n, opt.batch_size, opt.seed, 0)
    torch.manual_seed(opt.seed)
    losses = []
    for _ in range(opt.total_steps):
        micro = [collate([{k: train[k][j] for k in train} for j in next_batch(state, batches, n, opt)])
                 for _ in range(opt.grad_accum)]
        losses.append(train_step(model, optimizer, params, micro, device="cpu", max_grad_norm=opt.max_grad_norm,
                                 scheduler=sched).loss)
    return model, losses, evaluate(model, evals, collate, opt.batch_size, "cpu", spec.task)


def _assert_matches_peft(path, spec: MemberSpec, quant: str = "nf4"):
    train, evals = _rows(spec.optim.seed, 9, spec.task), _rows(spec.optim.seed + 1, 5, spec.task)
    engine, m, losses, final = _train_engine(path, spec, train, evals, quant)
    model, ref_losses, ref_final = _train_peft(path, spec, train, evals, quant)
    assert len(losses) == len(ref_losses) == spec.optim.total_steps
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= LOSS_TOL, (losses, ref_losses)
    ours, ref = engine.pack.state_dict(spec.job_id), get_peft_model_state_dict(model)
    assert sorted(ours) == sorted(ref)
    assert max(float((ours[k] - ref[k]).abs().max()) for k in ref) <= W_TOL
    for k, v in ref_final.items():
        assert final[k] == pytest.approx(v, abs=LOSS_TOL), k
    return engine, m, model, final


def _assert_exports_like_peft(engine, m, model, tmp_path, *, fan_in_fan_out: bool):
    from safetensors import safe_open

    ours = engine.write_checkpoint(m, tmp_path / "engine", final=True)
    model.save_pretrained(str(tmp_path / "peft"))
    shapes = {}
    for side in ("engine", "peft"):
        with safe_open(str(tmp_path / side / "adapter_model.safetensors"), "pt") as f:
            shapes[side] = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    assert shapes["engine"] == shapes["peft"]
    cfgs = {side: json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("engine", "peft")}
    for key in ("peft_type", "task_type", "r", "lora_alpha", "bias", "fan_in_fan_out", "modules_to_save", "use_dora"):
        assert cfgs["engine"][key] == cfgs["peft"][key], key
    assert sorted(cfgs["engine"]["target_modules"]) == sorted(cfgs["peft"]["target_modules"])
    assert cfgs["engine"]["fan_in_fan_out"] is fan_in_fan_out
    return ours


def test_seq_cls_on_the_engine_matches_stock_peft_and_exports_its_layout(tiny_gpt2, tmp_path):
    # NF4 GPT-2: its Conv1D projections are bitsandbytes Linear4bit; the head is PEFT's modules_to_save
    engine, m, model, final = _assert_matches_peft(tiny_gpt2, _spec("cls", _seq_cls_lora(), task="seq_cls"))
    assert set(final) >= {"eval_loss", "eval_accuracy"} and "parity_rows" not in m.state
    folder = _assert_exports_like_peft(engine, m, model, tmp_path, fan_in_fan_out=False)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier", "score"]
    # the catalog's allow-list takes it, and stock PEFT scores it as the engine does
    from safetensors import safe_open

    from farm.catalog.adapter_rules import check_adapter

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert check_adapter(cfg, tensors) == []
    base, _ = _base(tiny_gpt2, "seq_cls")
    stock = PeftModel.from_pretrained(base, str(folder))
    disable_cpu_repack(stock)
    evals = _rows(m.spec.optim.seed + 1, 5, "seq_cls")
    again = evaluate(stock, evals, Collator(PAD), 3, "cpu", "seq_cls")
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-5)
    # an alias's version as Engine.evaluate_baseline holds it: PEFT's own folder (head included) in a
    # second slot beside the member, on the same base, scores as stock PEFT does
    slot = "farm_baseline"
    engine.pack.add_job(slot, LoraConfig.from_pretrained(str(tmp_path / "peft")), seed=0)
    engine.pack.load_adapter(slot, tmp_path / "peft")
    with engine.pack.rows({slot: slice(None)}):
        got = m.method.evaluate(engine.model, evals, m.collate, 3, engine.device, "seq_cls")
    engine.pack.remove_job(slot)
    ref = evaluate(model, evals, Collator(PAD), 3, "cpu", "seq_cls")
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    assert got["eval_accuracy"] == ref["eval_accuracy"]


def test_seq_cls_on_unquantized_gpt2_adapts_conv1d_like_peft(tiny_gpt2, tmp_path):
    spec = _spec("conv", _seq_cls_lora(("c_attn",)), task="seq_cls", steps=3)
    engine, m, model, _ = _assert_matches_peft(tiny_gpt2, spec, quant="none")
    _assert_exports_like_peft(engine, m, model, tmp_path, fan_in_fan_out=True)


def test_modules_to_save_on_the_engine_matches_stock_peft(tiny_llama, tmp_path):
    engine, m, model, final = _assert_matches_peft(tiny_llama, _spec("mts", _mts_lora(), task="causal_lm", steps=3))
    assert "base_model.model.lm_head.weight" in engine.pack.state_dict("mts")
    _assert_exports_like_peft(engine, m, model, tmp_path, fan_in_fan_out=False)


def test_a_seq_cls_member_trains_as_a_pack_of_one(tiny_gpt2):
    model, footprint = _base(tiny_gpt2, "seq_cls")
    engine = Engine(model, torch.device("cpu"), footprint=footprint)
    engine.admit(_spec("a", _seq_cls_lora(), task="seq_cls"), _rows(1, 6, "seq_cls"), _rows(2, 3, "seq_cls"))
    with pytest.raises(TrainingError, match="seq_cls job trains as a pack of one"):
        engine.admit(_spec("b", _seq_cls_lora(), task="seq_cls"), _rows(1, 6, "seq_cls"), _rows(2, 3, "seq_cls"))
    assert sorted(engine.members) == ["a"] and sorted(engine.pack.jobs) == ["a"]


def _train_to_end(engine: Engine, folder, *, kill_after: int | None = None) -> dict:
    """Step the engine's only member to its end: {"bytes": its exported adapter, "final": metrics},
    checkpointing on its cadence into folder/ckpt-<step>; {} when stopped (killed) after `kill_after`."""
    for _ in range(200):
        for up in engine.step():
            assert up.failed is None, up.failed
            m = engine.members[up.job_id]
            if up.done:
                final = engine.finish(m)
                out = engine.write_checkpoint(m, folder / "final", final=True)
                return {"bytes": (out / "adapter_model.safetensors").read_bytes(), "final": final,
                        "history": m.state["history"]}
            if up.checkpoint_due:
                engine.write_checkpoint(m, folder / f"ckpt-{up.metrics['step']}", final=False)
            if kill_after is not None and up.metrics["step"] >= kill_after:
                return {}
    raise AssertionError("the member did not finish")


@pytest.mark.parametrize("kind", ["seq_cls", "modules_to_save"])
def test_a_member_with_a_saved_module_resumes_bit_exact(kind, tiny_gpt2, tiny_llama, tmp_path):
    """Kill after the step-3 checkpoint, resume on a freshly loaded base: the same bytes as an
    uninterrupted run (head and optimizer state in the checkpoint; GPT-2's own dropout from the
    checkpoint's RNG state). Dropout, accumulation, epochs, evals and best-weights bookkeeping run."""
    if kind == "seq_cls":
        path, task, lora = tiny_gpt2, "seq_cls", _seq_cls_lora()
    else:
        path, task, lora = tiny_llama, "causal_lm", _mts_lora()
    lora.lora_dropout = 0.1
    spec = _spec("j", lora, task=task, steps=6, eval_every=2, patience=5, checkpoint_every=3)
    train, evals = _rows(5, 7, task), _rows(6, 4, task)

    def engine():
        model, footprint = _base(path, task)
        torch.manual_seed(spec.optim.seed)
        return Engine(model, torch.device("cpu"), footprint=footprint, base_source=str(path))

    whole = engine()
    whole.admit(spec, train, evals)
    uninterrupted = _train_to_end(whole, tmp_path / "whole")
    killed = engine()
    killed.admit(spec, train, evals)
    assert _train_to_end(killed, tmp_path / "killed", kill_after=4) == {}
    resumed = engine()
    m = resumed.admit(spec, train, evals, resume=tmp_path / "killed" / "ckpt-3")
    assert m.resumed_from == 3
    again = _train_to_end(resumed, tmp_path / "resumed")
    assert again["bytes"] == uninterrupted["bytes"]
    assert again["final"]["eval_loss"] == uninterrupted["final"]["eval_loss"]
    from safetensors.torch import load

    head = "base_model.model.score.weight" if task == "seq_cls" else "base_model.model.lm_head.weight"
    trained, original = load(uninterrupted["bytes"])[head], whole.pack.saved[head.split(".")[2]].original.weight
    assert float((trained - original.detach()).abs().max()) > 1e-4, "the saved module trained"


def test_early_stopping_restores_the_best_head(tiny_gpt2):
    """Too high a learning rate: eval loss stops improving, the member stops early, and its weights at
    the end (head included) are those of its best eval."""
    spec = _spec("es", _seq_cls_lora(), task="seq_cls", steps=40, accum=1, eval_every=1, patience=2, lr=0.5)
    model, footprint = _base(tiny_gpt2, "seq_cls")
    engine = Engine(model, torch.device("cpu"), footprint=footprint)
    m = engine.admit(spec, _rows(7, 9, "seq_cls"), _rows(8, 6, "seq_cls"))
    torch.manual_seed(7)
    while not m.finished:
        for up in engine.step():
            assert up.failed is None, up.failed
            if up.done:
                final = engine.finish(m)
    assert m.state["stopped_early"] and m.best_weights is not None
    assert "base_model.model.score.weight" in m.best_weights
    now = engine.pack.state_dict("es")
    assert all(torch.equal(now[k], m.best_weights[k]) for k in now)
    assert final["eval_loss"] == pytest.approx(m.state["best_eval"], abs=1e-6)


def test_members_with_saved_modules_share_a_pack_as_if_alone(tiny_llama):
    """The pack key keeps modules_to_save jobs alone today, but the engine holds them together: each
    member's rows go through its own lm_head copy, a plain member's through the frozen original, and
    each member's losses are those it has alone (the tolerance of tests/test_pack_lora.py)."""
    specs = [_spec("h1", _mts_lora(), task="causal_lm", seed=1, steps=3),
             _spec("h2", _mts_lora(), task="causal_lm", seed=2, steps=3, accum=1),
             _spec("plain", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"]),
                   task="causal_lm", seed=3, steps=3)]
    data = {s.job_id: (_rows(s.optim.seed, 9, "causal_lm"), _rows(s.optim.seed + 1, 3, "causal_lm")) for s in specs}
    alone = {s.job_id: _train_engine(tiny_llama, s, *data[s.job_id])[2] for s in specs}
    model, footprint = _base(tiny_llama, "causal_lm")
    engine = Engine(model, torch.device("cpu"), footprint=footprint)
    for s in specs:
        engine.admit(s, *data[s.job_id])
    assert sorted(engine.pack.saved) == ["lm_head"]
    packed: dict[str, list] = {s.job_id: [] for s in specs}
    while engine.members:
        for up in engine.step():
            assert up.failed is None, up.failed
            packed[up.job_id].append(up.metrics["loss"])
            if up.done:
                engine.finish(engine.members[up.job_id])
                engine.release(up.job_id)
    for s in specs:
        assert max(abs(a - b) for a, b in zip(packed[s.job_id], alone[s.job_id])) <= LOSS_TOL, s.job_id
    assert not engine.pack.saved and not engine.pack.layers, "released members leave no wrapper"
