"""Which jobs can share a pack (one resident base, several adapters): the compatibility key.

Two jobs pack together when they need the same loaded base: base model source and revision,
quantization, double quant, compute dtype and task, and ask for the same GPUs (a pack holds
one slot, placed like its first job). LoRA rank, alpha, dropout and target modules may
differ per job (farm.train.pack_lora). Pure: no heavy imports (the queue computes it at submit).

What runs alone (key None, with the reason):
  * `resources.pack: false` (a customer who wants a dedicated slot);
  * task seq_cls: its classification head is a whole trained module per job (PEFT's
    modules_to_save), which one shared base cannot hold for several jobs; packing it correctly would
    need a per-job head, not built;
  * `lora.modules_to_save`: same reason, a whole module per job.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from farm.manifest import Manifest


def alone_reason(manifest: Manifest) -> str | None:
    """Why the job runs alone (not packed), or None when it can pack."""
    if not manifest.resources.pack:
        return "resources.pack is false"
    if manifest.task != "causal_lm":
        return f"task {manifest.task}: its head is a trained module per job; only causal_lm packs"
    if manifest.lora.modules_to_save:
        return f"lora.modules_to_save {list(manifest.lora.modules_to_save)}: whole trained modules run alone"
    return None


def base_spec(manifest: Manifest) -> dict:
    """What a pack's resident base is: the fields two jobs must share."""
    return {
        "base_model": manifest.base_model,
        "revision": manifest.revision,
        "quantization": manifest.quantization,
        "double_quant": manifest.double_quant,
        "compute_dtype": manifest.compute_dtype,
        "task": manifest.task,
        # Not the base, but the slot: a pack runs on the first job's placement (its GPUs).
        "gpus": manifest.resources.gpus,
    }


def pack_key(manifest: Manifest) -> str | None:
    """The compatibility key (a short hash of `base_spec`), or None for a job that runs alone."""
    if alone_reason(manifest) is not None:
        return None
    doc = json.dumps(base_spec(manifest), sort_keys=True)
    return "pk-" + hashlib.sha256(doc.encode()).hexdigest()[:16]
