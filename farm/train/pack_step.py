"""One training step of a pack: the micro-batches of several jobs in one forward and one backward.

Every job keeps its own optimizer, LR scheduler, gradient accumulation and clipping in a small
`JobTrainer`; `pack_step` concatenates one micro-batch per job into one right-padded batch, runs
the model once under `PackLoRA.rows`, computes each job's loss over its own rows with the model's
own loss function (so normalised by that job's label tokens only: the extra right padding other
jobs force is -100 in labels and masked in attention, and never changes it), sums
`loss_job / grad_accum_job` and backpropagates once. A job's parameters get gradients only from
its rows (the pack layers add its delta to its rows only). A job whose loss or gradient norm is
NaN/inf is flagged (`failed`), its gradients are dropped and it takes no optimizer step; the
others step as if it were not there. The caller (the pack driver) decides what a failed job does
next and feeds only live jobs. `pack_step_isolating_oom` runs a step so that running out of device
memory fails one member (the largest micro-batch) and the others step without it.

This mirrors the single-job loop's step exactly for one job: `(loss / accum).backward()` per
micro-batch, then `clip_grad_norm_`, `optimizer.step()`, `scheduler.step()`, `zero_grad`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from farm.errors import TrainingError


class PackOutOfMemory(TrainingError):
    """The device ran out of memory in a pack step's forward or backward (torch.OutOfMemoryError)."""

    def __init__(self, message: str, *, in_backward: bool):
        super().__init__(message)
        self.in_backward = in_backward


@dataclass
class JobTrainer:
    """What one job of a pack carries between steps, besides its weights (in the PackLoRA)."""

    job_id: str
    params: list
    optimizer: Any
    scheduler: Any
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches in the current step so far
    micro_total: int = 0  # micro-batches consumed in all (seeds dropout masks; checkpoint it)
    step_loss: float = 0.0  # mean loss of the step so far (sum of loss / accum)
    step_tokens: int = 0
    step_metrics: dict = field(default_factory=dict)  # the method's metrics, mean over the step so far
    failed: str | None = None  # why the job stopped (non-finite loss or gradients)

    def dropout_seed(self) -> int:
        return (self.seed * 1_000_003 + self.micro_total) % (2**63 - 1)

    def drop_grads(self) -> None:
        for p in self.params:
            p.grad = None


@dataclass
class JobStepResult:
    """What one pack step did for one job."""

    loss: float  # this micro-batch's loss (NaN/inf when that made the job fail)
    tokens: int  # attention-mask tokens of this micro-batch
    stepped: bool = False  # the job's optimizer stepped (its accumulation completed)
    step_loss: float | None = None  # when stepped: mean loss over the step's micro-batches
    step_tokens: int | None = None
    grad_norm: float | None = None  # when stepped: norm before clipping
    metrics: dict = field(default_factory=dict)  # this micro-batch's method metrics
    step_metrics: dict | None = None  # when stepped: their mean over the step's micro-batches
    failed: str | None = None
    out_of_memory: bool = False  # failed because the step ran out of device memory with it in the batch


def collate_pack(micro_batches: dict[str, dict], pad_token_id: int):
    """One right-padded batch of every job's micro-batch (each already collated, right-padded).

    Returns (batch, rows, widths): rows[job] is the job's block of rows (a slice), widths[job] its
    own width before the extra padding."""
    if not micro_batches:
        raise TrainingError("pack step: no micro-batches")
    width = max(b["input_ids"].shape[1] for b in micro_batches.values())
    fill = {"input_ids": int(pad_token_id), "attention_mask": 0, "labels": -100}
    parts: dict[str, list] = {k: [] for k in fill}
    rows, widths, start = {}, {}, 0
    for job_id, b in micro_batches.items():
        missing = [k for k in fill if k not in b]
        if missing:
            raise TrainingError(f"pack step: micro-batch of job {job_id!r} lacks {missing}")
        n, w = b["input_ids"].shape
        for k, v in fill.items():
            t = b[k]
            if w < width:
                t = torch.nn.functional.pad(t, (0, width - w), value=v)
            parts[k].append(t)
        rows[job_id], widths[job_id] = slice(start, start + n), w
        start += n
    return {k: torch.cat(v) for k, v in parts.items()}, rows, widths


PACKED_KEYS = ("input_ids", "attention_mask", "labels")


def _job_loss(model, logits, batch):
    # The model's own loss (transformers' ForCausalLMLoss: shifted, float, mean over label tokens):
    # what `model(**batch).loss` is for that job's micro-batch alone.
    return model.loss_function(logits=logits, labels=batch["labels"], vocab_size=model.config.vocab_size)


def pack_step(model, pack, trainers: dict[str, JobTrainer], micro_batches: dict[str, dict], pad_token_id: int, device=None,
              losses: dict[str, Callable] | None = None) -> dict[str, JobStepResult]:
    """One forward/backward over one micro-batch of each job; steps each job whose accumulation is complete.

    `losses[job]` (a training method's loss, farm.train.methods) maps `(model, logits, batch)` of the
    job's block (its micro-batch, labels padded to the pack's width, extra tensors on the device) to
    its loss or (loss, metrics); a job without one gets the causal-LM loss."""
    dead = [j for j in micro_batches if trainers[j].failed]
    if dead:
        raise TrainingError(f"pack step: micro-batches for failed jobs {dead}")
    batch, rows, widths = collate_pack(micro_batches, pad_token_id)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    seeds = {j: trainers[j].dropout_seed() for j in micro_batches}
    results: dict[str, JobStepResult] = {}
    backward = False
    try:
        with pack.rows(rows, widths=widths, dropout_seeds=seeds):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            total = None
            for j, r in rows.items():
                t = trainers[j]
                block = {k: (v.to(device) if device is not None and hasattr(v, "to") else v)
                         for k, v in micro_batches[j].items() if k not in PACKED_KEYS}
                block.update({k: batch[k][r] for k in PACKED_KEYS})
                loss = (losses or {}).get(j, _job_loss)(model, out.logits[r], block)
                loss, metrics = loss if isinstance(loss, tuple) else (loss, {})
                value = float(loss.detach())
                results[j] = JobStepResult(loss=value, tokens=int(batch["attention_mask"][r].sum()), metrics=metrics)
                if not math.isfinite(value):
                    results[j].failed = t.failed = f"non-finite loss {value} at step {t.step + 1}"
                    continue
                term = loss / t.grad_accum
                total = term if total is None else total + term
            if total is not None:
                backward = True
                total.backward()  # inside rows(): a gradient-checkpointing recompute reads the rows too
    except torch.OutOfMemoryError as exc:
        raise PackOutOfMemory(str(exc), in_backward=backward) from exc
    return _step_jobs(trainers, results)


def _step_jobs(trainers: dict[str, JobTrainer], results: dict[str, JobStepResult]) -> dict[str, JobStepResult]:
    """After the joint backward: each job's accumulation, clipping and optimizer step."""
    for j, res in results.items():
        t = trainers[j]
        t.micro_total += 1
        if t.failed:
            t.drop_grads()
            continue
        t.micro += 1
        t.step_loss += res.loss / t.grad_accum
        t.step_tokens += res.tokens
        for k, v in res.metrics.items():
            t.step_metrics[k] = t.step_metrics.get(k, 0.0) + v / t.grad_accum
        if t.micro < t.grad_accum:
            continue
        norm = float(torch.nn.utils.clip_grad_norm_(t.params, t.max_grad_norm))
        if not math.isfinite(norm):
            res.failed = t.failed = f"non-finite gradient norm {norm} at step {t.step + 1}"
            t.drop_grads()
            continue
        t.optimizer.step()
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.step += 1
        res.stepped, res.step_loss, res.step_tokens, res.grad_norm = True, t.step_loss, t.step_tokens, norm
        res.step_metrics = t.step_metrics
        t.micro, t.step_loss, t.step_tokens, t.step_metrics = 0, 0.0, 0, {}
    return results


def _free_device_memory() -> None:
    import gc

    gc.collect()  # the failed step's graph and activations
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pack_step_isolating_oom(model, pack, trainers: dict[str, JobTrainer], micro_batches: dict[str, dict],
                            pad_token_id: int, device=None, losses: dict[str, Callable] | None = None
                            ) -> dict[str, JobStepResult]:
    """`pack_step`, but an out-of-memory step fails one member, not the pack.

    One forward covers every member's rows, so torch cannot say whose rows did not fit: the member
    with the largest micro-batch (rows x tokens) fails (`out_of_memory`, retryable: it can run alone
    or in a pack it fits), its partial gradients are dropped, and the step is run again with the
    others, on the same micro-batches and dropout seeds, until it fits or no member is left. An OOM
    in the forward leaves no gradients, so the retry is exactly the step without that member; in the
    backward, the others' partial gradients are dropped too, and a member in the middle of gradient
    accumulation restarts its accumulation (the micro-batches already summed are skipped)."""
    live = dict(micro_batches)
    dropped: dict[str, JobStepResult] = {}
    while live:
        try:
            results = pack_step(model, pack, trainers, live, pad_token_id, device, losses)
            break
        except PackOutOfMemory as exc:
            culprit = max(live, key=lambda j: (live[j]["input_ids"].numel(), j))
            shape = tuple(live[culprit]["input_ids"].shape)
            t = trainers[culprit]
            t.failed = (f"out of device memory in a pack step with {len(live)} job(s) (this job's micro-batch, "
                        f"{shape[0]} rows x {shape[1]} tokens, was the largest): {str(exc).splitlines()[0][:200]}")
            t.micro_total += 1
            t.drop_grads()
            dropped[culprit] = JobStepResult(loss=float("nan"), tokens=int(live[culprit]["attention_mask"].sum()),
                                             failed=t.failed, out_of_memory=True)
            del live[culprit]
            for j in list(live):
                other = trainers[j]
                if other.failed:  # non-finite loss seen before the OOM: it fails as it would have
                    other.micro_total += 1
                    other.drop_grads()
                    dropped[j] = JobStepResult(loss=float("nan"), tokens=0, failed=other.failed)
                    del live[j]
                elif exc.in_backward or other.micro == 0:
                    other.drop_grads()  # partial gradients of the failed attempt
                    if exc.in_backward and other.micro:
                        other.micro, other.step_loss, other.step_tokens, other.step_metrics = 0, 0.0, 0, {}
            _free_device_memory()
    else:
        results = {}
    return {**results, **dropped}
