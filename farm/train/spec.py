"""Typed contracts between the training driver and the training engine: what a member of a pack is.

The driver (farm.train.pack_run / run) builds these from a validated manifest once
(farm.train.builders); the worker and the engine (farm.train.engine, farm.train.loop) read fields,
never `dict["..."]` keys, so a renamed or missing setting fails where it is built, not deep inside
a Ray Train worker. Plain frozen dataclasses: picklable for Ray, no heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OptimSpec:
    """Optimizer, schedule and loop cadence of one job (farm.train.builders.optim_config)."""

    optimizer: str
    learning_rate: float
    weight_decay: float
    max_grad_norm: float
    lr_scheduler: str
    warmup_ratio: float
    batch_size: int
    grad_accum: int
    seed: int
    total_steps: int
    eval_every: int | None = None
    checkpoint_every: int | None = None
    early_stopping_patience: int | None = None


@dataclass(frozen=True)
class MemberSpec:
    """One job as the engine trains it: its adapter, its optimizer and how its rows are batched."""

    job_id: str
    lora: Any
    """peft.LoraConfig (farm.train.builders.lora_config)."""
    optim: OptimSpec
    pad_token_id: int
    task: str = "causal_lm"
    method: str = "sft"
    """The training method (farm.train.methods): how batches are built and the loss computed."""
    method_options: dict | None = None
    """The method's settings (DPO: beta, label_smoothing, loss_type)."""
    identity: dict | None = None
    """What its checkpoints are stamped with (farm.train.checkpoint.check_identity)."""
    parity_rows: int = 0
    """Eval rows whose per-token logprobs the engine records at the end (train/serve parity gate)."""
    data: dict | None = None
    """What the worker needs to read and tokenize the job's data (farm.train.builders.data_config)."""
