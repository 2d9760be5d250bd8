"""Shared setup of the multi-base serving tests (no tests here): adapters for any tiny base, deploying
an app and waiting for it to answer."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.waiting import wait_for

# LoRA targets per tiny architecture (farm/tiny.py): Llama's projections, GPT-2's fused Conv1D layers.
TARGETS = {"llama": [["q_proj", "v_proj", "o_proj", "up_proj"], ["q_proj", "k_proj", "down_proj"]],
           "gpt2": [["c_attn"], ["c_attn", "c_proj"]]}


def make_lora(base: Path, dest: Path, seed: int, arch: str) -> Path:
    """A LoRA adapter made with stock PEFT on `base`, with a large random B so greedy output changes."""
    import torch
    from peft import LoraConfig, get_peft_model

    from farm.modeling import load_base_model

    torch.manual_seed(seed)
    model = load_base_model(str(base), device="cpu")
    cfg = LoraConfig(r=4 + seed % 3, lora_alpha=32, target_modules=TARGETS[arch][seed % 2], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(40.0)
    peft_model.save_pretrained(dest)
    return dest


def wait_healthy(base_url: str, timeout: float = 180) -> None:
    def healthy():
        try:
            return httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=timeout, what="the deployment's /healthz", every=0.5)
