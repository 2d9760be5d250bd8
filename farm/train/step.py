"""One optimizer step of LoRA training: forward/backward over the micro-batches, clip, step.

The stock-PEFT reference that the engine (farm.train.engine, every job's loop) is measured and tested
against: bench/gpu_bench.py, bench/solo_engine.py and tests/test_engine_heads.py call it. It takes a
model, an optimizer and already-collated batches, nothing farm-specific.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean loss over the micro-batches of this step."""
    tokens: int
    """Non-padding tokens seen (attention_mask sum)."""
    seconds: float
    """Wall time of the step (synchronized on CUDA)."""


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, optimizer, params, micro_batches: Iterable[dict], *, device, max_grad_norm: float | None,
               scheduler=None) -> StepResult:
    """Accumulate gradients over `micro_batches` (collated, on any device), clip to `max_grad_norm`,
    step optimizer (and LR scheduler if given), zero the gradients."""
    import torch

    batches = list(micro_batches)
    cuda = getattr(device, "type", device) == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss, tokens = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        out = model(**batch)
        (out.loss / len(batches)).backward()
        loss += float(out.loss.detach()) / len(batches)
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return StepResult(loss=loss, tokens=tokens, seconds=time.perf_counter() - t0)
