"""Packed LoRA training (farm.train.pack_lora + pack_step) against stock PEFT on the tiny NF4 Llama.

The reference for "a job trained alone" is PEFT's single-job training exactly as farm.train.loop
runs it: NF4 base from farm.modeling, prepare_model_for_kbit_training, get_peft_model right after
seeding, `(out.loss / accum).backward()` per micro-batch, clip, AdamW, LR schedule.

Tolerances, and why. One job alone in a pack runs the same batch with the same shapes and the same
arithmetic as PEFT (the base once, then `F.linear` for A and B, added to a copy of the output); on
this box it is bitwise equal, and we allow 1e-6 (float32 rounding, should a BLAS pick another
kernel). Packed with other jobs, a job's rows sit in a bigger batch, padded wider: the NF4 matmuls
and attention reduce in another order for another M and sequence length, so ops differ by float32
ulps, which a few AdamW steps carry into the weights: the largest difference measured here is
6e-7 on weights of size ~0.1 (losses 5e-7). We allow 5e-5 on weights and 1e-5 on losses: ~80×
that, and still ~100× below what a real mistake does (a job's loss normalised by ±10% off, or a
1% change of its learning rate, moves its weights by 4e-3 to 1e-2 in these runs).
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402

from farm.errors import TrainingError  # noqa: E402
from farm.modeling import Quantization, disable_cpu_repack, load_base_model  # noqa: E402
from farm.train.data import Collator  # noqa: E402
from farm.train.pack_lora import PackLinear, PackLoRA, read_adapter_config  # noqa: E402
from farm.train.pack_step import JobTrainer, pack_step  # noqa: E402

PAD = 0
VOCAB = 600  # the tiny tokenizer has 640 ids
W_TOL, LOSS_TOL, SOLO_TOL = 5e-5, 1e-5, 1e-6


def _base(path):
    """The NF4 base as the single-job loop prepares it on CPU."""
    from peft import prepare_model_for_kbit_training

    base = load_base_model(str(path), quant=Quantization(), device="cpu")
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def _rows(seed: int, n: int, lo: int, hi: int) -> list[dict]:
    """n tokenized rows of lengths in [lo, hi]; loss on the second half of each (prompt masked)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(5, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return out


class Job:
    """A job's spec and data; `micro(i)` is its i-th micro-batch (sequential batches, wrapping)."""

    def __init__(self, job_id, *, seed, r=4, alpha=8, targets=("q_proj", "v_proj"), dropout=0.0,
                 bs=2, accum=1, lr=5e-3, steps=5, lengths=(6, 14)):
        self.job_id, self.seed, self.bs, self.accum, self.lr, self.steps = job_id, seed, bs, accum, lr, steps
        self.config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                                 task_type="CAUSAL_LM")
        self.data = _rows(seed + 100, 12, *lengths)
        self.collate = Collator(PAD)

    def micro(self, i: int) -> dict:
        n = len(self.data)
        return self.collate([self.data[(i * self.bs + k) % n] for k in range(self.bs)])

    def optim(self, params):
        from transformers import get_scheduler

        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        return opt, get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=self.steps)


def train_alone_peft(path, job: Job):
    """The single-job loop's arithmetic with stock PEFT: (state dict, per-step losses)."""
    torch.manual_seed(job.seed)
    model = get_peft_model(_base(path), copy.deepcopy(job.config))
    disable_cpu_repack(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = job.optim(params)
    losses, i = [], 0
    for _ in range(job.steps):
        step_loss = 0.0
        for _ in range(job.accum):
            out = model(**job.micro(i))
            i += 1
            (out.loss / job.accum).backward()
            step_loss += float(out.loss.detach()) / job.accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return get_peft_model_state_dict(model), losses, model


class Run:
    """A pack driver in miniature: each round, one micro-batch per live job; a job leaves when done."""

    def __init__(self, path):
        self.model = _base(path)
        self.model.train()
        self.pack = PackLoRA(self.model)
        self.trainers: dict[str, JobTrainer] = {}
        self.jobs: dict[str, Job] = {}
        self.losses: dict[str, list[float]] = {}
        self.done: dict[str, dict] = {}

    def add(self, job: Job) -> None:
        params = self.pack.add_job(job.job_id, job.config, seed=job.seed)
        opt, sched = job.optim(params)
        self.trainers[job.job_id] = JobTrainer(job.job_id, params, opt, sched, grad_accum=job.accum,
                                               max_grad_norm=1.0, seed=job.seed)
        self.jobs[job.job_id] = job
        self.losses[job.job_id] = []

    def round(self):
        live = {j: t for j, t in self.trainers.items() if not t.failed}
        micro = {j: self.jobs[j].micro(t.micro_total) for j, t in live.items()}
        res = pack_step(self.model, self.pack, self.trainers, micro, PAD)
        for j, r in res.items():
            if r.stepped:
                self.losses[j].append(r.step_loss)
            if self.trainers[j].step >= self.jobs[j].steps:  # finished: release it
                self.done[j] = self.pack.state_dict(j)
                self.pack.remove_job(j)
                del self.trainers[j]
        return res

    def until_done(self, joins: dict[int, Job] | None = None, max_rounds: int = 200):
        joins = dict(joins or {})
        for n in range(max_rounds):
            if n in joins:
                self.add(joins.pop(n))
            if not self.trainers and not joins:
                return
            if self.trainers:
                self.round()
        raise AssertionError("pack did not finish")


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_like_alone(path, run: Run, job: Job, tol=W_TOL, loss_tol=LOSS_TOL):
    ref, ref_losses, ref_model = train_alone_peft(path, job)
    d = _max_diff(run.done[job.job_id], ref)
    assert d <= tol, f"{job.job_id}: weights differ from training alone by {d:.2e}"
    assert len(run.losses[job.job_id]) == job.steps
    for a, b in zip(run.losses[job.job_id], ref_losses):
        assert abs(a - b) <= loss_tol, (job.job_id, run.losses[job.job_id], ref_losses)
    # the job learned something (so equality is not two untouched inits)
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-3
    return ref, ref_model


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return tiny_llama


def _eval_loss(model, batch, pack=None, job_id=None):
    model.eval()
    with torch.no_grad():
        if pack is None:
            loss = float(model(**batch).loss)
        else:
            with pack.rows({job_id: slice(0, batch["input_ids"].shape[0])}):
                loss = float(model(**batch).loss)
    model.train()
    return loss


def test_pack_of_one_job_equals_peft_single_job_training(llama):
    job = Job("solo", seed=11, accum=2, steps=5)
    run = Run(llama)
    run.add(job)
    # same seed, same init as PEFT's get_peft_model right after torch.manual_seed(seed)
    torch.manual_seed(job.seed)
    peft_init = get_peft_model_state_dict(get_peft_model(_base(llama), copy.deepcopy(job.config)))
    assert _max_diff(run.pack.state_dict("solo"), peft_init) == 0.0
    run.until_done()
    ref, ref_model = _assert_like_alone(llama, run, job, tol=SOLO_TOL, loss_tol=SOLO_TOL)
    # and the same eval loss on held-out rows
    evalb = Job("eval", seed=99, bs=4).micro(0)
    check = Run(llama)
    check.add(job)
    _set_weights(check.pack, "solo", run.done["solo"])
    assert abs(_eval_loss(ref_model, evalb) - _eval_loss(check.model, evalb, check.pack, "solo")) <= SOLO_TOL


def _set_weights(pack, job_id, weights):
    with torch.no_grad():
        for name in pack.jobs[job_id].targets:
            ad = pack.layers[name].adapter(job_id)
            ad.lora_A.copy_(weights[f"base_model.model.{name}.lora_A.weight"])
            ad.lora_B.copy_(weights[f"base_model.model.{name}.lora_B.weight"])


def _three_jobs():
    return [
        Job("a", seed=1, r=4, alpha=8, targets=("q_proj", "v_proj"), bs=2, accum=1, lr=5e-3, steps=5, lengths=(5, 10)),
        Job("b", seed=2, r=8, alpha=32, targets=("q_proj", "k_proj", "o_proj", "down_proj"), bs=3, accum=2,
            lr=3e-3, steps=3, lengths=(10, 20)),
        Job("c", seed=3, r=2, alpha=4, targets=("gate_proj", "up_proj"), bs=1, accum=1, lr=1e-2, steps=6,
            lengths=(4, 8)),
    ]


def test_three_packed_jobs_each_match_training_alone(llama):
    jobs = _three_jobs()
    run = Run(llama)
    for j in jobs:
        run.add(j)
    assert {n for n in run.pack.layers} >= {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"}
    run.until_done()
    for j in jobs:
        _assert_like_alone(llama, run, j)
    assert not any(isinstance(m, PackLinear) for m in run.model.modules()), "released jobs leave no wrapper"


def test_backward_of_one_job_leaves_every_other_jobs_grads_exactly_zero(llama):
    jobs = _three_jobs()
    run = Run(llama)
    for j in jobs:
        run.add(j)
    with torch.no_grad():  # non-zero B everywhere, so every job's delta reaches the activations
        for p in run.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    from farm.train.pack_step import collate_pack

    batch, rows, widths = collate_pack({j.job_id: j.micro(0) for j in jobs}, PAD)
    for target in ("a", "b", "c"):
        run.model.zero_grad(set_to_none=True)
        with run.pack.rows(rows, widths=widths):
            logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            r = rows[target]
            loss = run.model.loss_function(logits=logits[r], labels=batch["labels"][r], vocab_size=640)
            loss.backward()
        for j in jobs:
            grads = [p.grad for p in run.pack.parameters(j.job_id)]
            if j.job_id == target:
                assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
            else:
                assert all(g is None or bool((g == 0).all()) for g in grads), (target, j.job_id)


def test_jobs_joining_and_leaving_mid_run_do_not_change_the_others(llama):
    a = Job("a", seed=1, steps=8, bs=2, lengths=(5, 10))
    b = Job("b", seed=2, r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj"), steps=2, bs=3, lengths=(12, 24))
    c = Job("c", seed=3, r=2, alpha=4, targets=("v_proj", "up_proj"), accum=2, steps=3, bs=2, lengths=(8, 16))
    run = Run(llama)
    # a and b start; b finishes after 2 rounds and leaves; c joins at round 3 while a is mid-run
    run.until_done(joins={0: a, 1: b, 3: c})
    assert set(run.done) == {"a", "b", "c"}
    for j in (a, b, c):
        _assert_like_alone(llama, run, j)


def test_exported_adapter_loads_in_stock_peft_with_the_same_logits(llama, tmp_path):
    jobs = _three_jobs()[:2]
    run = Run(llama)
    for j in jobs:
        run.add(j)
    for _ in range(4):
        run.round()
    folder = run.pack.export_adapter("b", tmp_path / "b", base_model_name_or_path=str(llama))
    cfg = read_adapter_config(folder)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 32
    assert sorted(cfg["target_modules"]) == ["down_proj", "k_proj", "o_proj", "q_proj"]
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names <= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    stock = PeftModel.from_pretrained(_base(llama), str(folder))
    disable_cpu_repack(stock)
    batch = Job("x", seed=5, bs=3).micro(0)
    stock.eval()
    run.model.eval()
    with torch.no_grad():
        want = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with run.pack.rows({"b": slice(0, 3)}):
            got = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base_logits = _base(llama).eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float((got - want).abs().max()) <= 1e-4
    assert float((got - base_logits).abs().max()) > 1e-3  # the adapter changes the output
    # and it loads back into a pack (resume) to the same weights
    other = Run(llama)
    other.add(jobs[1])
    other.pack.load_adapter("b", folder)
    assert _max_diff(other.pack.state_dict("b"), run.pack.state_dict("b")) == 0.0


def test_a_job_with_nonfinite_loss_fails_alone(llama):
    def two_rounds(poison: bool):
        run = Run(llama)
        for j in _three_jobs():
            run.add(j)
        run.round()
        if poison:
            with torch.no_grad():
                run.pack.parameters("b")[1].fill_(float("inf"))  # b's first lora_B
        res = run.round()
        return run, res

    clean, _ = two_rounds(False)
    run, res = two_rounds(True)
    assert res["b"].failed and "non-finite" in res["b"].failed and run.trainers["b"].failed
    assert all(p.grad is None for p in run.pack.parameters("b"))
    for j in ("a", "c"):
        assert not res[j].failed
        assert _max_diff(run.pack.state_dict(j), clean.pack.state_dict(j)) <= W_TOL
    run.round()  # the pack goes on without b
    with pytest.raises(TrainingError, match="failed jobs"):
        pack_step(run.model, run.pack, run.trainers, {"b": _three_jobs()[1].micro(0)}, PAD)


def test_dropout_is_per_job_and_does_not_depend_on_the_pack(llama):
    def train(with_others: bool, dropout: float):
        run = Run(llama)
        run.add(Job("d", seed=4, dropout=dropout, steps=3, lengths=(6, 10)))
        if with_others:
            run.add(Job("o", seed=5, dropout=0.3, steps=5, bs=3, lengths=(12, 20)))
        run.until_done()
        return run.done["d"]

    alone, packed = train(False, 0.2), train(True, 0.2)
    assert _max_diff(alone, packed) <= W_TOL
    assert _max_diff(alone, train(False, 0.0)) > 10 * W_TOL  # dropout really applies


def test_unpackable_adapters_are_refused_with_every_reason(llama):
    pack = PackLoRA(_base(llama))
    bad = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, bias="all", modules_to_save=["lm_head"])
    with pytest.raises(TrainingError) as exc:
        pack.add_job("x", bad, seed=0)
    msg = str(exc.value)
    assert "use_dora" in msg and "lora.bias" in msg and "modules_to_save" not in msg  # a saved module is held
    with pytest.raises(TrainingError, match="matches no module"):
        pack.add_job("y", LoraConfig(r=4, target_modules=["nope_proj"]), seed=0)
    with pytest.raises(TrainingError, match="Linear layers only"):
        pack.add_job("z", LoraConfig(r=4, target_modules=["mlp"]), seed=0)
    pack.add_job("ok", LoraConfig(r=4, target_modules="all-linear"), seed=0)
    assert "lm_head" not in pack.jobs["ok"].targets and len(pack.jobs["ok"].targets) == 14
    with pytest.raises(TrainingError, match="already in this pack"):
        pack.add_job("ok", LoraConfig(r=4, target_modules=["q_proj"]), seed=0)
    with pytest.raises(TrainingError, match="outside"):
        pack.model(input_ids=torch.tensor([[5, 6, 7]]))
