"""Builders: turn a manifest into plain constructor arguments (LoraConfig, ...). Model code never
sees the manifest. Heavy libraries are imported inside the functions."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import peft

    from farm.manifest import Manifest


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
