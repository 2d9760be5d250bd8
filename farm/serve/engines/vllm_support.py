"""What the vLLM engine cannot serve, read from an adapter's adapter_config.json before vLLM sees
it (vLLM raises these inside its worker process). Mirrors vllm/lora/peft_helper.py of vLLM 0.32
(`_validate_features` + `validate_legal`); the worker runs vLLM's own check again before add_lora.
No heavy imports."""

from __future__ import annotations

import json
from pathlib import Path

# vLLM's max_lora_rank must be one of these (vllm/config/lora.py)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SUPPORTED_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}


def vllm_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")


def adapter_rank(cfg: dict) -> int:
    return max([int(cfg.get("r") or 8), *[int(v) for v in (cfg.get("rank_pattern") or {}).values()]])


def unsupported(path: Path, max_lora_rank: int) -> list[str]:
    """Why vLLM cannot serve this causal-LM LoRA adapter folder (empty: it can)."""
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    why = []
    extra = [m for m in cfg.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if extra:
        why.append(f"modules_to_save {extra} (vLLM takes only a classifier head: 'classifier' or 'score')")
    if cfg.get("use_dora"):
        why.append("DoRA (use_dora)")
    if cfg.get("lora_bias"):
        why.append("LoRA bias (lora_bias)")
    if (cfg.get("bias") or "none") != "none":
        why.append(f"bias={cfg['bias']!r}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SUPPORTED_INITS:
        why.append(f"init_lora_weights={init!r} (changes the base weights)")
    for key, what in (("alora_invocation_tokens", "Activated LoRA"), ("layer_replication", "layer_replication"),
                      ("use_bdlora", "block-diagonal LoRA"), ("use_qalora", "QALoRA")):
        if cfg.get(key):
            why.append(what)
    rank = adapter_rank(cfg)
    if rank > max_lora_rank:
        why.append(f"rank {rank} is above this replica's max_lora_rank {max_lora_rank}")
    return why
