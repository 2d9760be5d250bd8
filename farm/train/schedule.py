"""A job's training schedule, one owner (farm.train.engine, under both worker shells: farm.train.pack_loop
for packs, farm.train.loop for a job alone): the loop state a checkpoint
carries, the data order, and what happens after an optimizer step (eval cadence, best eval, early
stopping, checkpoint cadence, the end).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from farm.train.spec import OptimSpec


def new_state() -> dict:
    """A job's loop state at step 0 (what its checkpoint's trainer_state holds besides optimizer/schedule)."""
    return {"step": 0, "epoch": 0, "batch_index": 0, "tokens": 0, "history": [], "best_eval": None,
            "best_step": None, "bad_evals": 0, "train_seconds": 0.0, "stopped_early": False, "micro_total": 0}


def batches_for_epoch(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic shuffled batches for an epoch (so a resumed run sees the same order)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


def next_batch(state: dict, batches: list, n_rows: int, opt: OptimSpec) -> list[int]:
    """The row indices of the job's next micro-batch; moves `state`'s data position (and the epoch,
    refilling `batches` in place, when one ends)."""
    if state["batch_index"] >= len(batches):
        state["epoch"] += 1
        state["batch_index"] = 0
        batches[:] = batches_for_epoch(n_rows, opt.batch_size, opt.seed, state["epoch"])
    idx = batches[state["batch_index"]]
    state["batch_index"] += 1
    return idx


@dataclass(frozen=True)
class AfterStep:
    done: bool
    """The last step, or early stopping: the job ends (best weights back, final eval)."""
    checkpoint_due: bool
    """On the `checkpoint_every` cadence and not the end."""
    new_best: bool
    """This step's eval is the best so far and early stopping is on: keep a copy of the weights."""


def after_step(state: dict, opt: OptimSpec, metrics: dict, evaluate: Callable[[], dict]) -> AfterStep:
    """Book an optimizer step that `state["step"]` already counts: evaluate on the cadence (not at the
    last step: the end evaluates), track the best eval and early stopping, append `metrics` (with the
    eval's) to the history, and say whether the job ends or checkpoints."""
    last = state["step"] >= opt.total_steps
    new_best = False
    if opt.eval_every and state["step"] % opt.eval_every == 0 and not last:
        metrics.update(evaluate())
        if state["best_eval"] is None or metrics["eval_loss"] < state["best_eval"]:
            state["best_eval"], state["best_step"], state["bad_evals"] = metrics["eval_loss"], state["step"], 0
            new_best = bool(opt.early_stopping_patience)
        else:
            state["bad_evals"] += 1
            if opt.early_stopping_patience and state["bad_evals"] >= opt.early_stopping_patience:
                state["stopped_early"] = True
    state["history"].append(metrics)
    done = last or state["stopped_early"]
    due = bool(opt.checkpoint_every) and state["step"] % opt.checkpoint_every == 0 and not done
    return AfterStep(done=done, checkpoint_due=due, new_best=new_best)
