"""Builders: turn a manifest into plain constructor arguments (LoraConfig, ...). Model code never
sees the manifest. Heavy libraries are imported inside the functions."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import peft

    from farm.manifest import Manifest
    from farm.train.spec import MemberSpec, OptimSpec


def lora_config(manifest: Manifest) -> peft.LoraConfig:
    """The PEFT LoraConfig for the manifest's `lora` section and task.

    For seq_cls, PEFT's PeftModelForSequenceClassification itself appends the head names
    ("classifier", "score") to modules_to_save, so the head is trained and saved with the adapter.
    """
    from peft import LoraConfig, TaskType

    lo = manifest.lora
    targets = lo.target_modules if isinstance(lo.target_modules, str) else list(lo.target_modules)
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=targets,
        bias=lo.bias,
        modules_to_save=list(lo.modules_to_save) if lo.modules_to_save else None,
        task_type=TaskType.SEQ_CLS if manifest.task == "seq_cls" else TaskType.CAUSAL_LM,
    )


def model_config(manifest: Manifest, label_names: list[str] | None = None) -> dict:
    """Plain arguments for farm.modeling.load_base_model (picklable, for the Ray Train worker)."""
    labels = label_names or manifest.class_labels
    return {
        "source": manifest.base_model,
        "revision": manifest.revision,
        "task": manifest.task,
        "num_labels": len(labels) if labels else None,
        "id2label": dict(enumerate(labels)) if labels else None,
        "quant": {
            "mode": manifest.quantization,
            "double_quant": manifest.double_quant,
            "compute_dtype": manifest.compute_dtype,
        },
    }


def total_steps(manifest: Manifest, train_rows: int) -> int:
    """Optimizer steps the job runs: max_steps, or epochs over the data in (batch × grad_accum) steps."""
    t = manifest.training
    if t.max_steps:
        return t.max_steps
    micro_batches = math.ceil(train_rows / t.batch_size)
    return max(1, math.ceil((t.epochs or 1.0) * micro_batches / t.grad_accum))


def data_config(manifest: Manifest, expect: dict | None = None) -> dict:
    """What a worker needs to read and tokenize the job's data itself (farm.train.data.load_worker_data):
    the dataset spec, the tokenizer's source and the options; `expect` is the driver's checked stats."""
    t = manifest.training
    return {
        "spec": manifest.dataset,
        "tokenizer": {"source": manifest.base_model, "revision": manifest.revision},
        "options": {"task": manifest.task, "max_seq_len": t.max_seq_len, "seed": t.seed, "labels": manifest.labels,
                    "num_labels": manifest.num_labels, "packing": t.packing, "method": manifest.method},
        "expect": expect,
    }


def member_spec(manifest: Manifest, job_id: str, train_rows: int, stats: dict | None, pad_token_id: int, *,
                identity: dict | None = None, parity_rows: int = 0) -> MemberSpec:
    """The job as the training engine takes it (the solo worker and the pack driver both build it here)."""
    from farm.train.spec import MemberSpec

    return MemberSpec(job_id=job_id, lora=lora_config(manifest), optim=optim_config(manifest, train_rows),
                      data=data_config(manifest, stats), pad_token_id=pad_token_id, task=manifest.task,
                      method=manifest.method, method_options=manifest.method_options, identity=identity,
                      parity_rows=parity_rows)


def optim_config(manifest: Manifest, train_rows: int) -> OptimSpec:
    """Optimizer, schedule and loop settings for the worker."""
    from farm.train.spec import OptimSpec

    t = manifest.training
    return OptimSpec(
        optimizer=t.optimizer,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler=t.lr_scheduler,
        warmup_ratio=t.warmup_ratio,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        seed=t.seed,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
        early_stopping_patience=t.early_stopping_patience,
        total_steps=total_steps(manifest, train_rows),
    )
