"""The training engine: one resident base, the adapters of the jobs on it, stepped together.

A job alone is a pack of one, and this is the only training loop: every task and feature runs here.
The engine is plain Python on torch (no Ray, no storage, no queue): the pack worker
(farm.train.pack_loop) and the solo worker (farm.train.loop) wrap it with their run storage and
progress, and tests drive it directly (tests/test_engine.py: bit-exact resume of solo and packed
members; tests/test_engine_heads.py: seq_cls heads and modules_to_save against stock PEFT).

What it owns, per member, in one place:
  * the adapter (a `PackLoRA` slot: LoRA, plus a full copy of each module it trains whole, such as
    a seq_cls job's classification head), its optimizer, LR schedule and gradient accumulation
    (farm.train.pack_step.JobTrainer), stepped by one grouped forward/backward per engine step;
  * the data position: a deterministic shuffle per (seed, epoch) and the index in it;
  * the eval schedule (`eval_every`), early stopping (`early_stopping_patience`) with best-weights
    restore at the end, the final eval and the train/serve parity rows;
  * checkpoints: `write_checkpoint` / `admit(resume=...)` hold adapter, optimizer, scheduler, data
    position, micro-batch counter, history and best weights (farm.train.checkpoint's layout);
  * cost: a step's time is split between its members by their share of its tokens.

What a member learns is its *method* (farm.train.methods: a pass over its rows with no adapter on
the base, how micro-batches are built, the loss and its eval): SFT or DPO; the engine does not care
which, and members of different methods share one grouped forward. The task picks the method's class
(task seq_cls: `ClassifierSFT`); a seq_cls member has a label per row, not per token, so it trains as
a pack of one (admit refuses to put it beside another member).

Randomness: nothing here draws from a global RNG. Adapter init is seeded by the job's seed (PackLoRA),
data order by (seed, epoch), dropout masks by (seed, micro-batches consumed): so a member's run does
not depend on the other members of its pack, and a resumed member continues bit for bit (the
checkpoint carries the counters; the torch RNG state is saved as well, for methods that draw and for
a base whose own dropout layers draw from it, such as GPT-2's: the worker seeds it before loading).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.train import checkpoint as ckpt_io
from farm.train.methods import Method, method
from farm.train.modelops import make_optimizer, token_logprobs
from farm.train.schedule import after_step, batches_for_epoch, new_state, next_batch
from farm.train.spec import MemberSpec


@dataclass
class Member:
    """One job on the engine."""

    spec: MemberSpec
    method: Method
    trainer: Any  # farm.train.pack_step.JobTrainer
    train_rows: dict
    eval_rows: dict
    collate: Any
    state: dict = field(default_factory=new_state)
    batches: list = field(default_factory=list)
    best_weights: dict | None = None
    resumed_from: int | None = None
    finished: bool = False
    """Resumed from a FINAL checkpoint: nothing left to train (its final metrics are in `state`)."""
    opt_name: str = "adamw"
    info: dict = field(default_factory=dict)
    step_tokens: int = 0  # of the optimizer step in progress (its micro-batches so far)
    step_seconds: float = 0.0

    @property
    def job_id(self) -> str:
        return self.spec.job_id


@dataclass
class Update:
    """What one engine step did for one member."""

    job_id: str
    metrics: dict | None = None
    """When its optimizer stepped: the step's metrics (with eval metrics on its eval cadence)."""
    failed: str | None = None
    """Why it failed (non-finite loss/gradients, out of memory): release it; the others went on."""
    out_of_memory: bool = False
    tokens: int = 0
    seconds: float = 0.0
    checkpoint_due: bool = False
    """The step is on its `checkpoint_every` cadence (and not its last)."""
    done: bool = False
    """Its last step, or early stopping: call `finish`."""


class Engine:
    """See the module docstring. `model` is the prepared base (farm.train.modelops.build_base)."""

    def __init__(self, model, device, *, footprint: int = 0, base_source: str | None = None,
                 base_revision: str | None = None, labels: dict | None = None):
        from farm.train.pack_lora import PackLoRA

        self.model, self.device = model, device
        self.kind = getattr(device, "type", str(device))
        self.pack = PackLoRA(model)
        self.footprint = footprint
        self.base_params = _param_count(model)
        self.base_source, self.base_revision = base_source, base_revision
        self.labels = dict(labels or {})  # added to every final metrics dict (the pack id)
        self.members: dict[str, Member] = {}
        model.train()

    # ---- membership ----------------------------------------------------------------------------
    def admit(self, spec: MemberSpec, train_rows: dict, eval_rows: dict, resume: str | Path | None = None) -> Member:
        """Add a job (from its checkpoint folder `resume` when given). Raises on a job that cannot
        join (its adapter does not fit this base, a checkpoint of another job); the others are untouched."""
        from transformers import get_scheduler

        from farm.train.data import Collator
        from farm.train.pack_step import JobTrainer

        job_id, opt = spec.job_id, spec.optim
        # an unknown method or option, or a method that cannot train the task: refused before anything
        meth = method(spec.method, spec.method_options, spec.task)
        alone = [f"job {j!r} is task {m.spec.task}" for j, m in self.members.items()
                 if "seq_cls" in (m.spec.task, spec.task)]
        if alone:  # a seq_cls micro-batch has a label per row, a causal one per token: one pack cannot mix them
            from farm.errors import TrainingError

            raise TrainingError(f"job {job_id!r} (task {spec.task}) cannot join this engine: {'; '.join(alone)}; "
                                f"a seq_cls job trains as a pack of one")
        try:
            params = self.pack.add_job(job_id, spec.lora, opt.seed)
            optimizer, opt_name = make_optimizer(opt.optimizer, params, opt.learning_rate, opt.weight_decay, self.kind)
            sched = get_scheduler(opt.lr_scheduler, optimizer,
                                  num_warmup_steps=int(math.ceil(opt.warmup_ratio * opt.total_steps)),
                                  num_training_steps=opt.total_steps)
            trainer = JobTrainer(job_id, params, optimizer, sched, grad_accum=opt.grad_accum,
                                 max_grad_norm=opt.max_grad_norm, seed=opt.seed)
            trainable = sum(p.numel() for p in params)
            collate = Collator(spec.pad_token_id)
            # the method's pass with no adapter on the base (DPO: the reference log-probabilities)
            with self.pack.rows({}):
                train_rows = meth.prepare(self.model, train_rows, collate, opt.batch_size, self.device)
                eval_rows = meth.prepare(self.model, eval_rows, collate, opt.batch_size, self.device)
            self.model.train()  # the engine owns the mode: whatever a method's pass left, steps train
            m = Member(spec, meth, trainer, train_rows, eval_rows, collate,
                       opt_name=opt_name, info={"params_trainable": trainable,
                                                "params_total": self.base_params + trainable,
                                                "base_footprint_bytes": self.footprint})
            if resume is not None:
                self._restore(m, Path(resume))
        except BaseException:
            if job_id in self.pack.jobs:
                self.pack.remove_job(job_id)
            raise
        m.batches = batches_for_epoch(len(train_rows["input_ids"]), opt.batch_size, opt.seed, m.state["epoch"])
        self.members[job_id] = m
        return m

    def _restore(self, m: Member, folder: Path) -> None:
        import torch

        state = ckpt_io.read_state(folder)
        ckpt_io.check_identity(state, m.spec.identity, f"job {m.job_id}")
        self.pack.load_adapter(m.job_id, folder)
        m.trainer.optimizer.load_state_dict(state.pop("optimizer"))
        m.trainer.scheduler.load_state_dict(state.pop("scheduler"))
        rng = state.pop("torch_rng", None)
        if rng is not None:
            torch.set_rng_state(rng)
        state.pop("cuda_rng", None)
        if (folder / ckpt_io.BEST_FILE).exists():
            from safetensors.torch import load_file

            m.best_weights = load_file(str(folder / ckpt_io.BEST_FILE))
        m.finished = bool(state.pop("final", False))
        m.state.update(state)
        m.trainer.step, m.trainer.micro_total = m.state["step"], m.state.get("micro_total", 0)
        m.resumed_from = m.state["step"]

    def release(self, job_id: str) -> bool:
        """Drop a job (done, failed, cancelled); True when it was a member."""
        was = self.members.pop(job_id, None) is not None
        if job_id in self.pack.jobs:
            self.pack.remove_job(job_id)
        return was

    # ---- one step ------------------------------------------------------------------------------
    def _micro_batch(self, m: Member) -> dict:
        idx = next_batch(m.state, m.batches, len(m.train_rows["input_ids"]), m.spec.optim)
        return m.method.micro_batch(m.train_rows, idx, m.collate)

    def step(self) -> list[Update]:
        """One micro-batch of every member in one grouped forward/backward; each member whose
        accumulation completes takes its optimizer step (and evaluates on its cadence)."""
        import torch

        from farm.train.pack_step import pack_step_isolating_oom

        if not self.members:
            return []
        micro = {j: self._micro_batch(m) for j, m in self.members.items()}
        pad = next(iter(self.members.values())).spec.pad_token_id
        cuda = self.kind == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # out of memory: the member with the largest micro-batch fails alone, the others step without it
        results = pack_step_isolating_oom(
            self.model, self.pack, {j: m.trainer for j, m in self.members.items()}, micro, pad, self.device,
            losses={j: m.method.loss for j, m in self.members.items()})
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        all_tokens = sum(r.tokens for r in results.values()) or 1
        updates = []
        for job_id, res in results.items():
            m = self.members[job_id]
            st = m.state
            share = dt * res.tokens / all_tokens
            st["train_seconds"] += share
            st["tokens"] += res.tokens
            st["micro_total"] = m.trainer.micro_total
            if res.failed:
                why = res.failed if res.out_of_memory else f"training diverged: {res.failed}"
                updates.append(Update(job_id, failed=why, out_of_memory=res.out_of_memory,
                                      tokens=res.tokens, seconds=share))
                continue
            m.step_tokens += res.tokens
            m.step_seconds += share
            if res.stepped:
                updates.append(self._after_step(m, res.step_loss, res.step_metrics or {}, n_members=len(results)))
        return updates

    def _after_step(self, m: Member, loss: float, method_metrics: dict, n_members: int) -> Update:
        st, opt = m.state, m.spec.optim
        st["step"] = m.trainer.step
        tokens, seconds = m.step_tokens, m.step_seconds
        m.step_tokens, m.step_seconds = 0, 0.0
        metrics = {
            "step": st["step"], "total_steps": opt.total_steps, "epoch": st["epoch"], "loss": loss,
            "learning_rate": m.trainer.scheduler.get_last_lr()[0], "tokens": st["tokens"],
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "train_seconds": st["train_seconds"], "step_tokens": tokens, "step_seconds": seconds,
            "attempt_resumed_from": m.resumed_from, "pack_jobs": n_members, **method_metrics,
        }
        after = after_step(st, opt, metrics, lambda: self.evaluate(m))
        if after.new_best:
            m.best_weights = {k: v.clone() for k, v in self.pack.state_dict(m.job_id).items()}
        return Update(m.job_id, metrics=metrics, tokens=tokens, seconds=seconds,
                      checkpoint_due=after.checkpoint_due, done=after.done)

    # ---- eval and the end ----------------------------------------------------------------------
    def evaluate(self, m: Member) -> dict:
        with self.pack.rows({m.job_id: slice(None)}):
            out = m.method.evaluate(self.model, m.eval_rows, m.collate, m.spec.optim.batch_size, self.device, m.spec.task)
        self.model.train()
        return out

    def finish(self, m: Member) -> dict:
        """The member's end: best weights back (early stopping), final eval, parity rows; its final metrics."""
        st, opt = m.state, m.spec.optim
        if st["stopped_early"] and m.best_weights is not None:
            self.pack.set_weights(m.job_id, m.best_weights, where="best weights")
        final = self.evaluate(m)
        if m.spec.parity_rows and m.spec.task == "causal_lm":  # the training side of the train/serve parity gate
            with self.pack.rows({m.job_id: slice(None)}):
                st["parity_rows"] = token_logprobs(self.model, m.eval_rows, m.spec.parity_rows, self.device)
            self.model.train()
        final.update({"step": st["step"], "total_steps": opt.total_steps, "tokens": st["tokens"],
                      "train_seconds": st["train_seconds"], "optimizer": m.opt_name,
                      "stopped_early": st["stopped_early"], "final": True, **self.labels, **m.info})
        st["history"].append(final)
        st["final_metrics"] = final
        m.finished = True
        return final

    def evaluate_baseline(self, m: Member, baseline: dict) -> dict:
        """The version an alias points at ({"catalog": url, "ref": ...}) scored on `m`'s eval rows: its
        adapter fetched (hashes verified), held beside the member's on the same base, evaluated,
        released. {"baseline_error": why} when it cannot be (another base shape, a deleted version,
        an adapter the engine cannot hold)."""
        from peft import LoraConfig

        from farm.catalog import Catalog

        slot = "farm_baseline"
        try:
            path = Catalog(baseline["catalog"]).fetch(baseline["ref"])
            self.pack.add_job(slot, LoraConfig.from_pretrained(str(path)), seed=0)
            self.pack.load_adapter(slot, path)
        except Exception as exc:  # noqa: BLE001 - a baseline that does not fit this base is no comparison
            if slot in self.pack.jobs:
                self.pack.remove_job(slot)
            return {"baseline_error": f"{type(exc).__name__}: {exc}"}
        try:
            with self.pack.rows({slot: slice(None)}):
                out = m.method.evaluate(self.model, m.eval_rows, m.collate, m.spec.optim.batch_size, self.device,
                                        m.spec.task)
            return {"baseline_" + k: v for k, v in out.items()}
        finally:
            self.pack.remove_job(slot)
            self.model.train()

    # ---- checkpoints ---------------------------------------------------------------------------
    def write_checkpoint(self, m: Member, folder: str | Path, *, final: bool) -> Path:
        """The member's checkpoint in farm.train.checkpoint's layout, its adapter a stock PEFT folder."""
        import torch
        from safetensors.torch import save_file

        folder = Path(folder)
        self.pack.export_adapter(m.job_id, folder, self.base_source, self.base_revision)
        state = {**m.state, "micro_total": m.trainer.micro_total, "identity": m.spec.identity,
                 "optimizer": m.trainer.optimizer.state_dict(), "scheduler": m.trainer.scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        torch.save(state, folder / ckpt_io.STATE_FILE)
        if m.best_weights is not None:
            save_file({k: v.detach().cpu().clone() for k, v in m.best_weights.items()}, str(folder / ckpt_io.BEST_FILE))
        if final:
            (folder / ckpt_io.FINAL_MARKER).touch()
        return folder


def _param_count(model) -> int:
    """Parameters of the base as PEFT counts them (a 4-bit weight packs two values a byte)."""
    n = 0
    for p in model.parameters():
        k = p.numel()
        if p.__class__.__name__ == "Params4bit":  # as peft.PeftModel.get_nb_trainable_parameters
            k *= 2 * (p.element_size() if hasattr(p, "element_size") else
                      getattr(getattr(p, "quant_storage", None), "itemsize", 1))
        n += k
    return n
